"""predict.py: a trained model slid over whole images (PNG, .npy) gives class maps, probabilities and overlays,
with windows cut and resized exactly as training cut its crops."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from commands import windows
from commands.palette import colours
from commands.prediction import run_prediction
from datasets.regions import FileSource, open_regions
from errors import UserError
from tests import composing, files
from tests.conftest import CONFIGS
from tests.helpers import ROOT, in_child, run_python

RUN = ("loader.batch_size=8", "trainer.epochs=2")  # the run test_evaluate shares: 100% on the crop scenes
# scene0.png of the crop scenes: 16x16 squares, the odd columns bright (files.write_crop_scenes).
COLUMNS = np.array([[1, 0, 1, 0]] * 4)  # class index per square: bright 0, dark 1


@pytest.fixture
def make_predict_cfg(tmp_path):
    def make(*overrides: str):
        return composing.compose(CONFIGS, "predict", [f"run_dir={tmp_path / 'predict'}", "device=cpu", *overrides])
    return make


@pytest.fixture
def best(shared_run):
    return shared_run(*RUN).dir / "checkpoints" / "best.pt"


def test_a_png_scene_is_mapped_square_by_square(best, make_predict_cfg, shared_crop_csv, tmp_path):
    scene = shared_crop_csv.parent / "scene0.png"
    result = run_prediction(make_predict_cfg(f"checkpoint={best}", f"inputs=[{scene}]", "stride=16"))
    out = tmp_path / "predict"
    assert json.loads((out / "predictions.json").read_text()) == result
    item = result["inputs"][0]
    # The checkpoint's median training box (16x16) is the window; the stride given; a 4x4 grid from (0, 0).
    assert (item["window"], item["stride"], item["origin"], item["rows"], item["cols"]) == ([16, 16], [16, 16],
                                                                                              [0, 0], 4, 4)
    assert item["fractions"] == {"bright": 0.5, "dark": 0.5} and result["classes"] == ["bright", "dark"]
    probabilities = np.load(out / "scene0.png" / "probabilities.npy")
    assert probabilities.dtype == np.float16 and probabilities.shape == (2, 4, 4)
    assert np.allclose(probabilities.astype(np.float32).sum(0), 1, atol=2e-3)
    assert (probabilities.argmax(0) == COLUMNS).all()
    # classmap.png: the class colours preview.py draws with, one square per window (its top left: the map).
    classmap = np.asarray(Image.open(out / "scene0.png" / "classmap.png").convert("RGB"))
    side = 1024 // 4  # 64 source pixels grow by whole factors to 1024
    palette = colours(2)
    for (r, c), k in np.ndenumerate(COLUMNS):
        assert tuple(classmap[r * side + side // 2, c * side + side // 2]) == palette[k]
    overlay = Image.open(out / "scene0.png" / "overlay.png")
    assert overlay.width == 1024 and overlay.height > 1024  # the legend below it


def test_npy_and_tiled_tiff_inputs_give_the_probabilities_of_the_same_pixels_as_png(best, make_predict_cfg,
                                                                                   shared_crop_csv, tmp_path):
    """The region readers (a memory-mapped .npy, a tiled TIFF read tile by tile) give the PNG's windows."""
    scene = shared_crop_csv.parent / "scene0.png"
    pixels = np.asarray(Image.open(scene))
    array = files.write_npy(tmp_path / "scene0.npy", pixels)
    tiled = files.write_tiff(tmp_path / "scene0.tif", pixels, tile=(16, 16), compression="zstd")
    result = run_prediction(make_predict_cfg(f"checkpoint={best}", f"inputs=[{scene},{array},{tiled}]", "window=24",
                                             "stride=[8,12]"))
    png = result["inputs"][0]
    # 64 px, window 24, stride 8: 6 rows from row 0 (none left over); stride 12: 4 columns, 4 px shared.
    assert (png["rows"], png["cols"], png["origin"]) == (6, 4, [0, 2])
    a, b, c = (np.load(tmp_path / "predict" / name / "probabilities.npy")
               for name in ("scene0.png", "scene0.npy", "scene0.tif"))
    assert np.array_equal(a, b) and np.array_equal(a, c)
    overlays = [np.asarray(Image.open(tmp_path / "predict" / name / "overlay.png")) for name in ("scene0.png", "scene0.tif")]
    assert np.array_equal(overlays[0][:1024], overlays[1][:1024])  # above the legend, which names the file


def test_windows_are_the_crops_training_cuts(monkeypatch, shared_crop_csv):
    """Every batch, across blocks and batch boundaries, equals cutting each window alone with training's code."""
    monkeypatch.setattr(windows, "BLOCK_BYTES", 3 * 64 * 20)  # blocks of one grid row and a few columns
    path = shared_crop_csv.parent / "scene1.png"
    g = windows.grid((64, 64), (20, 13), (7, 5), path)
    got = torch.empty((len(g), 3, 32, 32), dtype=torch.uint8)
    seen = []
    for index, batch in windows.batches(open_regions(path, channels=3), g, (3, 32, 32), batch_size=7):
        assert len(batch) == 7 or len(seen) + len(batch) == len(g)
        got[torch.from_numpy(index)] = batch
        seen += index.tolist()
    assert sorted(seen) == list(range(len(g)))
    source = FileSource(path, 3)
    for i in range(len(g)):
        top, left = g.tops(np.array(i // g.cols)), g.lefts(np.array(i % g.cols))
        crop = source.region(slice(top, top + 20), slice(left, left + 13), 32, 32)  # crops.cut's call
        assert torch.equal(got[i], crop), i


def test_the_grid_is_centred_and_covers_all_but_less_than_a_stride():
    g = windows.grid((100, 70), (32, 32), (16, 16), "x.png")
    assert (g.rows, g.cols, g.origin) == (5, 3, (2, 3))  # 100 = 2 + 32 + 4*16 + 2; 70 = 3 + 32 + 2*16 + 3
    strip = windows.grid((40, 100), (None, 20), (None, 10), "x.npy")
    assert (strip.rows, strip.cols, strip.window, strip.origin) == (1, 9, (40, 20), (0, 0))


def test_background_reading_passes_errors_on_and_stops_when_the_consumer_does():
    def broken():
        yield 1
        raise ValueError("unreadable block")

    got = []
    with pytest.raises(ValueError, match="unreadable block"):
        for item in windows.in_background(broken()):
            got.append(item)
    assert got == [1]
    produced = []

    def endless():
        n = 0
        while True:
            produced.append(n)
            yield n
            n += 1

    for item in windows.in_background(endless(), depth=2):
        if item == 3:
            break
    assert len(produced) <= 3 + 2 + 2  # stopped a queue's depth after the consumer left, not running on


def test_bad_inputs_are_one_line(best, make_predict_cfg, shared_crop_csv, tmp_path):
    scene = shared_crop_csv.parent / "scene0.png"
    with pytest.raises(UserError, match=r"window=80x80 \(width x height\) is larger than .*scene0.png, which is "
                                         r"64x64: give a smaller window="):
        run_prediction(make_predict_cfg(f"checkpoint={best}", f"inputs=[{scene}]", "window=80"))
    two = files.write_npy(tmp_path / "two.npy", np.zeros((40, 40, 2), dtype=np.uint8))
    with pytest.raises(UserError, match=r"inputs: .*two.npy has 2 channels, the model takes 3"):
        run_prediction(make_predict_cfg(f"checkpoint={best}", f"inputs=[{two}]"))
    with pytest.raises(UserError, match=r"window=\[0, 4\]: give a whole number of source pixels"):
        run_prediction(make_predict_cfg(f"checkpoint={best}", f"inputs=[{scene}]", "window=[0,4]"))
    with pytest.raises(UserError, match=r"inputs: file not found: .*missing.png"):
        run_prediction(make_predict_cfg(f"checkpoint={best}", f"inputs=[{tmp_path / 'missing.png'}]"))


def test_a_checkpoint_without_a_stored_window_needs_window(best, make_predict_cfg, shared_crop_csv, tmp_path):
    old = torch.load(best, weights_only=True)
    del old["box_size"]  # as checkpoints written before predict.py
    torch.save(old, tmp_path / "old.pt")
    scene = shared_crop_csv.parent / "scene0.png"
    with pytest.raises(UserError, match=r"checkpoint=.*old.pt stores no training box size .*give window=N"):
        run_prediction(make_predict_cfg(f"checkpoint={tmp_path / 'old.pt'}", f"inputs=[{scene}]"))
    result = run_prediction(make_predict_cfg(f"checkpoint={tmp_path / 'old.pt'}", f"inputs=[{scene}]", "window=16",
                                             "stride=16"))
    assert result["inputs"][0]["fractions"] == {"bright": 0.5, "dark": 0.5}


def test_tta_needs_the_runs_augmentation_unless_forced(best, make_predict_cfg, shared_crop_csv):
    scene = shared_crop_csv.parent / "scene0.png"
    with pytest.raises(UserError, match=r"tta=hflip: the run trained without augment.hflip"):
        run_prediction(make_predict_cfg(f"checkpoint={best}", f"inputs=[{scene}]", "tta=hflip"))
    result = run_prediction(make_predict_cfg(f"checkpoint={best}", f"inputs=[{scene}]", "stride=16", "tta=dihedral",
                                             "tta_force=true"))
    assert result["tta"] == "dihedral" and result["inputs"][0]["fractions"] == {"bright": 0.5, "dark": 0.5}
    with pytest.raises(UserError, match=r"tta_scales: the run trained without zooms"):
        run_prediction(make_predict_cfg(f"checkpoint={best}", f"inputs=[{scene}]", "tta_scales=[1.0,0.8]"))
    # Zoomed windows of uniform halves: still one class each (the uint8 path of the zoom).
    zoomed = run_prediction(make_predict_cfg(f"checkpoint={best}", f"inputs=[{scene}]", "stride=16", "tta=dihedral",
                                             "tta_scales=[1.0,0.8]", "tta_force=true"))
    assert zoomed["tta_scales"] == [1.0, 0.8] and zoomed["inputs"][0]["fractions"] == {"bright": 0.5, "dark": 0.5}


def test_the_median_training_box_is_stored_whatever_the_cache(build_crops, tmp_path):
    """The window predict.py defaults to comes from the training rows' boxes, also when a disk cache holds them."""
    rows = ["path,x0,y0,x1,y1,label,split"]
    files.write_png(tmp_path / "a.png", np.zeros((64, 64), dtype=np.uint8))
    for i, (h, w) in enumerate([(10, 20), (12, 24), (14, 30), (40, 40)]):
        rows.append(f"a.png,0,0,{w},{h},{'xy'[i % 2]},train")
    rows.append("a.png,0,0,64,64,x,val")  # validation boxes do not count
    rows.append("a.png,0,0,64,64,y,val")
    (tmp_path / "boxes.csv").write_text("\n".join(rows) + "\n")
    for cache in ("memory", "disk", "disk"):  # the second disk build reads the cache
        bundle = build_crops(f"dataset.csv={tmp_path / 'boxes.csv'}", f"dataset.cache={cache}")
        assert bundle.box_size == (13, 27), cache  # medians: (12 + 14) / 2 and (24 + 30) / 2
    strips = ["path,start,end,label,split", "a.png,0,8,x,train", "a.png,8,20,y,train", "a.png,0,64,x,val",
              "a.png,0,64,y,val"]
    (tmp_path / "strips.csv").write_text("\n".join(strips) + "\n")
    assert build_crops(f"dataset.csv={tmp_path / 'strips.csv'}").box_size == (None, 10)


@pytest.mark.slow
def test_predict_py_prints_a_line_per_input(best, shared_crop_csv, tmp_path):
    scene = shared_crop_csv.parent / "scene2.png"
    # -X importtime lists every module the program imported (lazily imported ones too) on stderr.
    result = run_python("-X", "importtime", ROOT / "predict.py", f"checkpoint={best}", f"inputs=[{scene}]",
                        "stride=16", "device=cpu", f"hydra.run.dir={tmp_path / 'out'}", cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    # Neither torchvision nor torch._dynamo (which importing torchvision loads): ~1.2 CPU-s of a 3.5 s start.
    assert "torch" in imported and not {"torchvision", "torch._dynamo"} & imported
    assert f"{scene}: 4x4 windows -> {tmp_path / 'out' / 'scene2.png'} (bright 50.0%, dark 50.0%)" in result.stdout
    assert {p.name for p in (tmp_path / "out" / "scene2.png").iterdir()} == {"classmap.png", "overlay.png",
                                                                             "probabilities.npy"}
    bad = run_python(ROOT / "predict.py", f"checkpoint={best}", f"inputs=[{scene}]", "window=100", "device=cpu",
                     f"hydra.run.dir={tmp_path / 'bad'}", cwd=ROOT)
    said = bad.stdout + bad.stderr  # Hydra's log goes to stdout
    assert bad.returncode == 1 and "is larger than" in said and "Traceback" not in said


def _strip_signal(rng, labels, width=16, height=24):
    """A float 'spectrogram' (height, len(labels) * width): a loud column band per 1, quiet per 0."""
    columns = np.repeat(np.array(labels, dtype=np.float32), width) * 4.0
    return (columns[None, :] + rng.normal(0, 0.5, size=(height, len(columns)))).astype(np.float32)


@pytest.fixture(scope="session")
def strip_run(tmp_path_factory):
    """A run trained on strip-form crops (full-height column ranges of float .npy arrays), made once."""
    def make(folder):
        rng = np.random.default_rng(0)
        rows = []
        for n in range(8):
            labels = rng.integers(0, 2, size=20)
            files.write_npy(folder / f"rec{n}.npy", _strip_signal(rng, labels))
            rows += [dict(path=f"rec{n}.npy", start=16 * i, end=16 * i + 16, label=["quiet", "loud"][k])
                     for i, k in enumerate(labels.tolist())]
        from datasets.crop_csv import write_crops
        csv = write_crops(folder / "strips.csv", rows, strip=True)
        from tests.conftest import compose_train
        import training
        training.run(compose_train(folder / "run", f"dataset.csv={csv}", "dataset.channels=1", "dataset.width=16",
                                   "dataset.height=24", "trainer.epochs=5", "loader.batch_size=8"))
    from tests import shared_runs
    return shared_runs.once(tmp_path_factory, "strip-run", make) / "run"


def test_a_strip_form_run_gives_one_class_track(strip_run, make_predict_cfg, tmp_path):
    assert torch.load(strip_run / "checkpoints" / "best.pt", weights_only=True)["box_size"] == [None, 16]
    labels = [0] * 6 + [1] * 6 + [0] * 4
    recording = files.write_npy(tmp_path / "recording.npy", _strip_signal(np.random.default_rng(5), labels))
    result = run_prediction(make_predict_cfg(f"checkpoint={strip_run / 'checkpoints' / 'best.pt'}",
                                             f"inputs=[{recording}]", "stride=16"))
    item = result["inputs"][0]
    assert result["strip"] and (item["window"], item["stride"], item["rows"], item["cols"]) == ([24, 16], [24, 16],
                                                                                                 1, 16)
    track = np.load(tmp_path / "predict" / "recording.npy" / "probabilities.npy").argmax(0)
    assert track.shape == (1, 16) and (track[0] == [1 - k for k in labels]).mean() >= 0.9  # classes: loud, quiet
    classmap = Image.open(tmp_path / "predict" / "recording.npy" / "classmap.png")
    assert classmap.width == 1024  # 16 windows of 16 px, grown by 4 to 1024
    with pytest.raises(UserError, match=r"window=\[24, 16\]: the run was trained on strip-form crops"):
        run_prediction(make_predict_cfg(f"checkpoint={strip_run / 'checkpoints' / 'best.pt'}",
                                        f"inputs=[{recording}]", "window=[24,16]"))


@pytest.mark.slow  # writes and reads a 576 MB image: seconds, not a program
def test_peak_memory_follows_the_blocks_not_the_image(best, make_predict_cfg, tmp_path):
    """A 24,000 x 24,000 grey tiled TIFF (576 MB decoded) is mapped with a fraction of that in memory: blocks,
    batches and the output grid, never the whole image (~90 MB in a fresh process, up to ~200 MB where the
    allocator keeps what it freed)."""
    import tifffile

    side, tile = 24_000, 256
    ramp = np.add.outer(np.arange(tile), np.arange(tile)).astype(np.uint8)  # compresses: the file stays small
    per_side = -(-side // tile)
    tiles = (ramp if (i + i // per_side) % 2 else 255 - ramp for i in range(per_side ** 2))
    path = tmp_path / "large.tif"
    tifffile.imwrite(path, tiles, shape=(side, side), dtype=np.uint8, tile=(tile, tile), compression="zstd",
                     photometric="minisblack", bigtiff=True)
    cfg = make_predict_cfg(f"checkpoint={best}", f"inputs=[{path}]", "window=256", "stride=256")

    def status(key):
        return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key))) * 1024

    def body():
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the resident size now
        before = status("VmRSS:")
        result = run_prediction(cfg)
        assert result["inputs"][0]["windows"] == (side // 256) ** 2
        assert status("VmHWM:") - before < side * side // 2, (status("VmHWM:") - before) / 2**20

    in_child(body)
