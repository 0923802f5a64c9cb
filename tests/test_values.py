"""How values become pixels: non-finite arrays refused, high-depth images scaled, dataset.value_range
(per_file, global, [low, high]) and dataset.mean/std=auto, from the data set through checkpoints to predict."""

import functools
import logging
import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import training
from datasets import cifar
from datasets.crop_csv import write_crops
from datasets.folders import build_datasetfolder, build_imagefolder
from errors import UserError
from tests import files
from training.build import build_data, build_model, saved_mapping
from commands.evaluation import run_evaluation
from training.loop import Normalizer


build = functools.partial(files.build_crops, channels=1)  # grey crops


def items_by_label(bundle) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    for split in (bundle.train, bundle.val):
        for i in range(len(split)):
            image, label = split[i]
            out.setdefault(bundle.classes[label], []).append(image.clone())
    return out


def strips(name: str, count: int, label: str, width: int = 16) -> list[dict]:
    return [{"path": name, "start": width * i, "end": width * (i + 1), "label": label}
            for i in range(count)]


@pytest.fixture
def levels(tmp_path):
    """Two classes told apart only by level: `quiet` is noise, `loud` is the same noise times 16 (float32,
    outside [0, 1], as raw sensor values or amplitudes are; a power of two, so per-file scaling gives
    bit-identical pixels). Two files per class, 4 strips each."""
    rng = np.random.default_rng(0)
    rows = []
    for n in range(2):
        noise = rng.normal(0.0, 1.0, size=(16, 64)).astype(np.float32)
        files.write_npy(tmp_path / f"quiet{n}.npy", noise)
        files.write_npy(tmp_path / f"loud{n}.npy", noise * 16)
        rows += strips(f"quiet{n}.npy", 4, "quiet") + strips(f"loud{n}.npy", 4, "loud")
    return write_crops(tmp_path / "levels.csv", rows, strip=True)


@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
def test_per_file_erases_level_and_global_keeps_it(levels, tmp_path, cache):
    kwargs = dict(cache=cache, cache_dir=str(tmp_path / "cache"))
    per_file = items_by_label(build(levels, value_range="per_file", **kwargs))
    # Per file, a loud strip becomes exactly the quiet strip it amplifies: no model can tell them apart.
    assert {t.numpy().tobytes() for t in per_file["quiet"]} == {t.numpy().tobytes() for t in per_file["loud"]}

    bundle = build(levels, value_range="global", **kwargs)
    every = np.concatenate([np.load(p).ravel() for p in sorted(levels.parent.glob("*.npy"))])
    assert bundle.value_range == (float(every.min()), float(every.max()))
    spread = {label: [float(t.float().std()) for t in images] for label, images in items_by_label(bundle).items()}
    # One range for all: every loud strip spreads over more grey levels than any quiet one.
    assert min(spread["loud"]) > 5 * max(spread["quiet"])


def test_disk_cache_keys_on_the_value_range_and_keeps_the_global_range(levels, tmp_path):
    kwargs = dict(cache="disk", cache_dir=str(tmp_path / "cache"))
    per_file = build(levels, value_range="per_file", **kwargs)
    first, again = build(levels, value_range="global", **kwargs), build(levels, value_range="global", **kwargs)
    assert not torch.equal(per_file.train.store.images, first.train.store.images)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2  # one cache per setting
    assert again.value_range == first.value_range and torch.equal(again.train.store.images, first.train.store.images)


def test_a_given_range_over_images_alone_logs_no_empty_count(tmp_path, caplog):
    csv = files.write_crop_scenes(tmp_path)  # PNG sources only: no array file for the range to clip
    with caplog.at_level(logging.INFO, logger="datasets.values"):
        bundle = files.build_crops(csv, value_range=[0, 1])
    assert bundle.value_range == (0.0, 1.0)
    assert not [r.getMessage() for r in caplog.records if r.name == "datasets.values"]


def test_given_range_clips_and_reports_the_count_once(tmp_path, caplog):
    values = np.linspace(-1.0, 2.0, 16 * 32, dtype=np.float32).reshape(16, 32)
    files.write_npy(tmp_path / "a.npy", values)
    csv = write_crops(tmp_path / "c.csv", strips("a.npy", 2, "x") * 2, strip=True)
    outside = int(np.count_nonzero((values < 0) | (values > 1)))
    with caplog.at_level(logging.INFO, logger="datasets.values"):
        bundle = build(csv, value_range=[0, 1])
    (message,) = [r.getMessage() for r in caplog.records if "lie outside" in r.getMessage()]
    assert f"{outside} of {values.size} values" in message
    assert bundle.value_range == (0.0, 1.0)
    left = bundle.train.store.images[0, 0].numpy()  # the strip of columns 0..15, in CSV order
    expected = np.rint(np.clip(values[:, :16].astype(np.float64), 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(left, expected)


@pytest.mark.parametrize("setting", ["everywhere", [1, 0], [0, "x"], [0]])
def test_bad_value_range_is_refused_before_reading(tmp_path, setting):
    csv = write_crops(tmp_path / "c.csv", strips("missing.npy", 1, "a"), strip=True)
    with pytest.raises(UserError, match=r"^dataset\.value_range"):
        build(csv, value_range=setting)


@pytest.mark.parametrize("bad, cache, setting", [(np.nan, "none", "per_file"), (np.inf, "memory", "global"),
                                                (-np.inf, "disk", [0, 1]), (np.nan, "memory", [0, 1])])
def test_non_finite_arrays_are_refused_naming_file_and_count(tmp_path, bad, cache, setting):
    array = np.random.default_rng(1).random((16, 32), dtype=np.float32) * 4
    array[3, 5:8] = bad
    files.write_npy(tmp_path / "bad.npy", array)
    files.write_npy(tmp_path / "good.npy", np.full((16, 32), 0.5, dtype=np.float32))
    csv = write_crops(tmp_path / "c.csv", strips("bad.npy", 2, "bad") + strips("good.npy", 2, "good"), strip=True)
    with pytest.raises(UserError, match=r"bad\.npy: 3 of 512 values are NaN or infinite") as error:
        build(csv, cache=cache, cache_dir=str(tmp_path / "cache"), value_range=setting)
    assert "good.npy" not in str(error.value)


def test_datasetfolder_refuses_non_finite_arrays_per_file(tmp_path):
    for cls in ("a", "b"):
        for i in range(2):
            files.write_npy(tmp_path / "arrays" / cls / f"{i}.npy", np.full((8, 8), 2.0 + i, dtype=np.float32))
    files.write_npy(tmp_path / "arrays" / "a" / "0.npy", np.full((8, 8), np.nan, dtype=np.float32))
    with pytest.raises(UserError, match=r"a/0\.npy: 64 of 64 values are NaN or infinite"):
        build_datasetfolder(root=str(tmp_path / "arrays"), extensions=[".npy"], width=8, height=8, channels=1,
                            cache="memory", val_fraction=0.5, mean=[0.5], std=[0.5], seed=0, value_range="per_file")


def test_datasetfolder_global_range_spans_every_file_of_both_splits(tmp_path):
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for cls, amplitude in (("quiet", 1.0), ("loud", 10.0)):
            for i in range(2):
                files.write_npy(tmp_path / "arrays" / split / cls / f"{i}.npy",
                                (rng.normal(size=(8, 8)) * amplitude).astype(np.float32))
    every = np.concatenate([np.load(p).ravel() for p in sorted((tmp_path / "arrays").rglob("*.npy"))])
    bundle = build_datasetfolder(root=str(tmp_path / "arrays"), extensions=[".npy"], width=8, height=8, channels=1,
                                 cache="none", val_fraction=0.5, mean=[0.5], std=[0.5], seed=0)
    assert bundle.value_range == (float(every.min()), float(every.max()))
    path, _ = bundle.val.samples[0]
    expected = np.clip(np.rint((np.load(path) - every.min()) * (255 / (every.max() - every.min()))), 0, 255)
    assert np.array_equal(bundle.val[0][0][0].numpy(), expected.astype(np.uint8))


def sixteen_bit_ramp() -> np.ndarray:
    return (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0..65472


@pytest.mark.parametrize("channels", [1, 3])
def test_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped(tmp_path, channels):
    ramp = sixteen_bit_ramp()
    path = files.write_png(tmp_path / "deep.png", ramp)
    assert Image.open(path).mode == "I;16"
    csv = write_crops(tmp_path / "c.csv", [{"path": "deep.png", "x0": 0, "y0": 0, "x1": 32, "y1": 32, "label": c}
                                           for c in "aabb"])
    image = build(csv, width=32, height=32, channels=channels).train[0][0]
    expected = np.rint(ramp / 257.0).astype(np.uint8)  # 65535 / 255 = 257
    assert all(np.array_equal(image[c].numpy(), expected) for c in range(channels))
    assert float((image == 255).float().mean()) < 0.01  # clipping made 99.6% of this ramp 255


def test_thirty_two_bit_images_are_scaled_by_depth_or_range(tmp_path):
    """Mode I (32-bit integers: older Pillow's 16-bit PNGs, TIFFs) by 16-bit depth when it fits, else its
    range; mode F (floats) by its range, NaN refused."""
    ramp = sixteen_bit_ramp().astype(np.int32)
    files.write_png(tmp_path / "cls" / "a" / "i16.tiff", ramp)
    files.write_png(tmp_path / "cls" / "a" / "wide.tiff", ramp * 100 - 5)
    files.write_png(tmp_path / "cls" / "b" / "float.tiff", ramp.astype(np.float32) / 1000)
    files.write_png(tmp_path / "cls" / "b" / "float2.tiff", ramp.astype(np.float32) / 1000)
    assert Image.open(tmp_path / "cls" / "a" / "i16.tiff").mode == "I"
    bundle = build_imagefolder(root=str(tmp_path / "cls"), width=32, height=32, channels=1, cache="none",
                               val_fraction=0.5, mean=[0.5], std=[0.5], seed=0)
    folder = bundle.train.dataset
    loaded = {p.split("/")[-1]: folder.loader(p)[0].numpy() for p, _ in folder.samples}
    assert np.array_equal(loaded["i16.tiff"], np.rint(ramp / 257.0).astype(np.uint8))
    by_range = np.rint((ramp - ramp.min()) * (255.0 / (ramp.max() - ramp.min()))).astype(np.uint8)
    assert np.array_equal(loaded["wide.tiff"], by_range)
    assert np.array_equal(loaded["float.tiff"], by_range)
    broken = ramp.astype(np.float32)
    broken[0, 0] = np.nan
    files.write_png(tmp_path / "cls" / "b" / "float2.tiff", broken)
    with pytest.raises(UserError, match=r"float2\.tiff: 1 of 1024 values are NaN"):
        folder.loader(str(tmp_path / "cls" / "b" / "float2.tiff"))


def pixel_mean_std(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per channel, in 0..1 units, over uint8 (N, C, H, W): numpy's own mean and population std."""
    scaled = images.astype(np.float64) / 255.0
    return list(scaled.mean(axis=(0, 2, 3))), list(scaled.std(axis=(0, 2, 3)))


@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
def test_auto_mean_std_come_from_the_training_split_only(tmp_path, cache):
    """Training crops are dark noise, validation crops white: the statistics must not see the white."""
    scene = np.random.default_rng(4).integers(0, 100, (16, 128, 3), dtype=np.uint8)
    scene[:, 64:] = 255
    files.write_png(tmp_path / "scene.png", scene)
    rows = [{**row, "split": "train" if row["start"] < 64 else "val"} for row in strips("scene.png", 8, "a")]
    csv = write_crops(tmp_path / "c.csv", rows, strip=True)
    bundle = build(csv, channels=3, cache=cache, cache_dir=str(tmp_path / "cache"), mean="auto", std="auto")
    mean, std = pixel_mean_std(scene[None, :, :64].transpose(0, 3, 1, 2))
    assert bundle.mean == pytest.approx(mean, abs=1e-6) and bundle.std == pytest.approx(std, abs=1e-6)
    assert max(bundle.mean) < 0.4


def test_auto_mean_alone_keeps_the_given_std(crop_csv):
    bundle = build(crop_csv, channels=3, mean="auto", std=[0.25])
    assert bundle.std == (0.25, 0.25, 0.25) and bundle.mean != (0.5, 0.5, 0.5)


@pytest.mark.parametrize("value", ["mean", ["a"], []])
def test_bad_mean_is_a_user_error(crop_csv, value):
    with pytest.raises(UserError, match=r"^dataset\.mean must be auto or a list of numbers"):
        build(crop_csv, mean=value)


def test_auto_std_of_a_constant_channel_is_refused(tmp_path):
    files.write_npy(tmp_path / "flat.npy", np.full((16, 64), 7, dtype=np.uint8))
    csv = write_crops(tmp_path / "c.csv", strips("flat.npy", 4, "a") * 2, strip=True)
    with pytest.raises(UserError, match=r"dataset\.std=auto: channel\(s\) \[0\]"):
        build(csv, std="auto")


def test_auto_mean_std_for_cifar10_use_the_training_batches(cifar_root):
    bundle = cifar.build(root=str(cifar_root), download=False, mean="auto", std="auto", seed=0)
    batches = []
    for i in range(1, 6):
        with open(cifar_root / "cifar-10-batches-py" / f"data_batch_{i}", "rb") as f:
            batches.append(pickle.load(f, encoding="latin1")["data"].reshape(-1, 3, 32, 32))
    mean, std = pixel_mean_std(np.concatenate(batches))
    assert bundle.mean == pytest.approx(mean, abs=1e-6) and bundle.std == pytest.approx(std, abs=1e-6)


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_auto_mean_std_for_imagefolder(tmp_path, cache):
    rng = np.random.default_rng(3)
    for cls, level in (("dark", 40), ("light", 200)):
        for i in range(4):
            files.write_png(tmp_path / "img" / cls / f"{i}.png", rng.integers(0, 50, (16, 16, 3), np.uint8) + level)
    bundle = build_imagefolder(root=str(tmp_path / "img"), width=16, height=16, channels=3, cache=cache,
                               val_fraction=0.25, mean="auto", std="auto", seed=0)
    train = np.stack([bundle.train[i][0].numpy() for i in range(len(bundle.train))])
    assert bundle.mean == pytest.approx(pixel_mean_std(train)[0], abs=1e-6)


def test_checkpoint_keeps_the_mapping_and_evaluation_uses_it(levels, make_cfg, make_eval_cfg, tmp_path):
    """Train with a global range and auto statistics; a file holding one loud strip is predicted exactly as the
    model scores that strip in training, though the file's own range differs from the data set's."""
    cfg = make_cfg(f"dataset.csv={levels}", "dataset.width=16", "dataset.height=16", "dataset.channels=1",
                   "dataset.mean=auto", "dataset.std=auto", "loader.batch_size=4")
    training.run(cfg)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    bundle = build(levels, value_range="global", mean="auto", std="auto", val_fraction=0.2)
    assert checkpoint["value_range"] == list(bundle.value_range)
    assert checkpoint["normalization"] == {"mean": list(bundle.mean), "std": list(bundle.std)}

    np.save(tmp_path / "strip.npy", np.load(levels.parent / "loud0.npy")[:, 16:32])  # CSV line 7: loud0, strip 1
    result = run_evaluation(make_eval_cfg(f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}",
                                          f"predict=[{tmp_path / 'strip.npy'}]"))
    model = build_model(checkpoint["config"]["model"], (1, 16, 16), 2, torch.device("cpu"))
    model.load_state_dict(checkpoint["model"])
    item = bundle.train.store.images[5]  # row order of the CSV
    with torch.no_grad():
        normalize = Normalizer(bundle.mean, bundle.std, torch.device("cpu"))
        probabilities = torch.softmax(model.eval()(normalize(item[None])), 1)[0]
    (prediction,) = result["predictions"]
    assert prediction["probability"] == pytest.approx(float(probabilities.max()), abs=1e-6)

    # Rebuilding the run's data from its checkpoint (resume, evaluate.py) takes the saved mapping, not a new scan.
    files.write_npy(levels.parent / "loud1.npy", np.load(levels.parent / "loud1.npy") * 3)
    rebuilt = build_data(cfg.dataset, cfg.loader, 0, torch.device("cpu"), fixed=saved_mapping(checkpoint, cfg.dataset))
    assert list(rebuilt.bundle.value_range) == checkpoint["value_range"]
    assert list(rebuilt.bundle.mean) == checkpoint["normalization"]["mean"]
    assert OmegaConf.select(cfg, "dataset.value_range") == "global"
