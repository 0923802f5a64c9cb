"""Grey sources trained as 3 channels are stored once, (N, 1, H, W), and repeated on the training device: the
model sees exactly what a 3-channel store gave, in both loader modes, with either cache."""

import json
import shutil

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

import training
from datasets.crop_csv import write_crops
from errors import UserError
from tests import files
from tests.helpers import assert_same_state
from commands.evaluation import run_evaluation
from training.loaders import DeviceLoader, EpochSeededDataLoader, device_bytes

CPU = torch.device("cpu")


@pytest.fixture
def grey_csv(tmp_path):
    """The crop scenes drawn in grey and saved as grey (L) PNGs."""
    return files.write_crop_scenes(tmp_path / "grey", channels=1)


@pytest.fixture
def rgb_copy_csv(tmp_path):
    """The same grey scenes saved as RGB PNGs (each value in all three channels): stored as 3 channels."""
    return files.write_crop_scenes(tmp_path / "rgb", channels=1, mode="RGB")


def items(split) -> torch.Tensor:
    return torch.stack([split[i][0] for i in range(len(split))])


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_grey_sources_are_stored_once_and_seen_as_three_channels(build_crops, grey_csv, rgb_copy_csv, cache,
                                                                  tmp_path):
    grey = build_crops(f"dataset.csv={grey_csv}", f"dataset.cache={cache}", "dataset.mean=auto", "dataset.std=auto")
    rgb = build_crops(f"dataset.csv={rgb_copy_csv}", f"dataset.cache={cache}", "dataset.mean=auto",
                      "dataset.std=auto")
    lazy = build_crops(f"dataset.csv={grey_csv}", "dataset.cache=none")
    store = grey.train.store
    assert store.images.shape == (64, 1, 32, 32) and store.stored_channels == 1 and store.channels == 3
    assert rgb.train.store.images.shape == (64, 3, 32, 32)
    assert grey.input_shape == rgb.input_shape == (3, 32, 32)  # what the model takes
    # The same pixels as the 3-channel store, and as decoding each crop from its file.
    assert torch.equal(store.expand(store.images), rgb.train.store.images)
    for split, lazy_split in ((grey.train, lazy.train), (grey.val, lazy.val)):
        assert torch.equal(items(split), items(lazy_split))
    # mean/std=auto: counted once, the same statistics in each channel as the 3-channel store's.
    assert grey.mean == rgb.mean and grey.std == rgb.std and len(set(grey.mean)) == 1
    if cache == "disk":
        manifests = [json.loads(path.read_text()) for path in (tmp_path / "cache").glob("*.json")]
        arrays = {tuple(entry["shape"]): entry["array_bytes"] for entry in manifests}
        assert sorted(arrays) == [(64, 1, 32, 32), (64, 3, 32, 32)]  # the grey cache and its RGB copy's
        assert arrays[64, 1, 32, 32] < 64 * 32 * 32 + 1024  # one channel (plus the .npy header)
        reused = build_crops(f"dataset.csv={grey_csv}", "dataset.cache=disk")
        assert reused.train.store.images.shape == (64, 1, 32, 32) and torch.equal(items(reused.val), items(lazy.val))


def test_every_grey_kind_counts_and_one_colour_file_keeps_three_channels(build_crops, tmp_path):
    """Grey PIL modes, 16-bit images and (H, W) or (H, W, 1) arrays are grey; a palette or RGB file among them
    makes the store 3 channels. Either way the items equal decoding each crop alone."""
    rng = np.random.default_rng(7)
    root = tmp_path / "kinds"
    for mode in ("L", "LA", "1"):
        files.write_png(root / f"{mode}.png", files.random_image(rng, 40, 40, channels=1), mode=mode)
    files.write_png(root / "deep.png", rng.integers(0, 65536, size=(40, 40), dtype=np.uint16))  # I;16
    files.write_npy(root / "flat.npy", rng.random((40, 40), dtype=np.float32))
    files.write_npy(root / "one.npy", files.random_image(rng, 40, 40, channels=1)[:, :, None])
    grey_names = ["L.png", "LA.png", "1.png", "deep.png", "flat.npy", "one.npy"]
    files.write_png(root / "palette.png", files.random_image(rng, 40, 40), mode="P")
    files.write_png(root / "rgb.png", files.random_image(rng, 40, 40))

    def rows(names):
        return [{"path": name, "x0": 3 * i, "y0": 2 * i, "x1": 3 * i + 13 + i, "y1": 2 * i + 21, "label": "ab"[i % 2]}
                for name in names for i in range(4)]

    for name, extra, stored in (("grey", [], 1), ("palette", ["palette.png"], 3), ("rgb", ["rgb.png"], 3)):
        csv = write_crops(root / f"{name}.csv", rows(grey_names + extra))
        held = build_crops(f"dataset.csv={csv}", "dataset.width=24", "dataset.height=12", "dataset.val_fraction=0.5")
        lazy = build_crops(f"dataset.csv={csv}", "dataset.width=24", "dataset.height=12", "dataset.val_fraction=0.5",
                           "dataset.cache=none")
        assert held.train.store.images.shape[1] == stored, name
        assert torch.equal(items(held.train), items(lazy.train)) and torch.equal(items(held.val), items(lazy.val))
        assert items(held.train).shape[1:] == (3, 12, 24)


@pytest.mark.parametrize("cache", ["memory", "disk"])
@pytest.mark.parametrize("mode", ["device", "dataloader"])
def test_grey_batches_travel_as_one_channel_and_equal_decoding_per_item(make_cfg, build_crops, grey_csv, cache,
                                                                        mode):
    held = build_crops(f"dataset.csv={grey_csv}", f"dataset.cache={cache}")
    lazy = build_crops(f"dataset.csv={grey_csv}", "dataset.cache=none")
    make_loader = instantiate(make_cfg("loader.batch_size=8").loader)
    loader = make_loader(held.train, device=CPU, seed=3, train=True, mode=mode)
    expected = make_loader(lazy.train, device=CPU, seed=3, train=True, mode="dataloader", num_workers=0)
    assert isinstance(loader, DeviceLoader if mode == "device" else EpochSeededDataLoader)
    if mode == "dataloader":
        assert loader.dataset[0][0].shape == (1, 32, 32)  # batched, pinned and copied as stored
    else:
        assert loader.images.shape[1] == 1  # on the device as stored
    for epoch in (0, 1):
        loader.set_epoch(epoch), expected.set_epoch(epoch)
        for (images, labels), (images_expected, labels_expected) in zip(loader, expected, strict=True):
            assert images.shape[1] == 3 and images.stride(1) == 0  # a view of the one stored channel
            assert torch.equal(images, images_expected) and torch.equal(labels, labels_expected)


def test_memory_checks_count_the_bytes_stored(build_crops, grey_csv):
    """64 grey crops at 200000 x 200000 are 2384.2 GiB stored once (7152.6 GiB three times): refused either
    way, naming what would be held; the GPU's free-memory check counts the stored bytes too."""
    for cache, where in (("memory", "in memory"), ("disk", "on disk")):
        with pytest.raises(UserError, match=rf"needs 2384\.2 GiB {where}"):
            build_crops(f"dataset.csv={grey_csv}", f"dataset.cache={cache}", "dataset.width=200000",
                        "dataset.height=200000")
    bundle = build_crops(f"dataset.csv={grey_csv}")
    assert device_bytes(bundle.train, CPU, train=True) == 64 * (32 * 32 + 8)  # uint8 pixels + an int64 label


def test_training_on_grey_data_equals_training_on_its_rgb_copy_and_resumes(make_cfg, make_eval_cfg, grey_csv,
                                                                           rgb_copy_csv, tmp_path):
    """The model sees the same batches whichever way they are stored, through augmentation (cutout fills with
    the auto mean) and normalisation, in either loader mode: the weights are bit for bit the same, a resumed
    grey run continues exactly, and evaluate.py scores its checkpoint as the run did."""

    def run(name, csv, *overrides):
        cfg = make_cfg(f"dataset.csv={csv}", "loader.batch_size=8", "augment=dihedral", "augment.cutout=4",
                       "dataset.mean=auto", "dataset.std=auto", *overrides, run_dir=tmp_path / name)
        return training.run(cfg), torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)

    grey_metrics, grey = run("grey", grey_csv, "trainer.epochs=2", "loader.mode=dataloader")
    _, rgb = run("rgb", rgb_copy_csv, "trainer.epochs=2", "loader.mode=device")
    run("broken", grey_csv, "trainer.epochs=1", "loader.mode=device")
    folder = tmp_path / "broken" / "checkpoints"
    shutil.copy(folder / "last.pt", folder / "epoch1.pt")
    _, resumed = run("broken", grey_csv, "trainer.epochs=2", f"resume={folder / 'epoch1.pt'}")
    for name, stored in (("grey", "(1, 32, 32)"), ("broken", "(1, 32, 32)"), ("rgb", "(3, 32, 32)")):
        assert f"crops: 64 x {stored} uint8" in (tmp_path / name / "train.log").read_text(), name
    assert grey["input_shape"] == [3, 32, 32] and grey["normalization"] == rgb["normalization"]
    assert_same_state(grey, rgb)
    assert_same_state(resumed, rgb)
    result = run_evaluation(make_eval_cfg(f"checkpoint={tmp_path / 'grey' / 'checkpoints' / 'last.pt'}"))
    assert result["acc"] == grey_metrics["val/acc"] and result["loss"] == grey["metrics"]["val/loss"]
