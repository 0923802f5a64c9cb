"""preview.py: sources drawn with their CSV rows, classes.png as the model receives items, counts, bad rows."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.base import labels_of
from datasets.crop_csv import write_crops
from datasets.regions import LoadItem
from errors import UserError
from tests import files
from tests.helpers import ROOT, run_python
from commands.palette import TAB10
from commands.preview import report, run_preview



def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _find_tile(picture: np.ndarray, tile: np.ndarray) -> bool:
    """Whether `tile` (h, w, 3) appears in `picture` at some position, pixel for pixel."""
    h, w = tile.shape[:2]
    for y in range(picture.shape[0] - h + 1):
        for x in range(picture.shape[1] - w + 1):
            if picture[y, x, 0] == tile[0, 0, 0] and np.array_equal(picture[y:y + h, x:x + w], tile):
                return True
    return False


def _counts(bundle) -> dict:
    return {name: torch.bincount(labels_of(split), minlength=len(bundle.classes)).tolist()
            for name, split in (("train", bundle.train), ("val", bundle.val))}


def test_box_form_sources_classes_and_counts(make_preview_cfg, build_crops, crop_csv, tmp_path):
    result = run_preview(make_preview_cfg(f"dataset.csv={crop_csv}", "per_class=4"))

    assert [p.name for p in result["sources"]] == [f"scene{n}.png" for n in range(4)]
    scene0 = _png(tmp_path / "preview" / "sources" / "scene0.png")
    assert scene0.shape[1] == 1024  # 64 px scaled up 16x to max_side
    # Row 2 of the CSV: x 0..16 of scene0, "dark" (class 1); row 3: x 16..32, "bright" (class 0). Their left
    # edges, halfway down the box, carry their class's colour.
    assert tuple(scene0[128, 1]) == TAB10[1] and tuple(scene0[128, 257]) == TAB10[0]
    # Inside a box the scene itself, scaled up by whole pixels.
    source = _png(crop_csv.parent / "scene0.png")
    assert np.array_equal(scene0[128:144:16, 64:80:16], source[8:9, 4:5])

    trained = build_crops(f"dataset.csv={crop_csv}", "dataset.split_by=auto")  # what train.py builds (cache=memory)
    assert result["counts"] == _counts(trained) and result["classes"] == trained.classes == ["bright", "dark"]
    assert result["problems"] == []
    classes_png = _png(result["classes_png"])
    first_bright = trained.train.store.images[int(np.flatnonzero(labels_of(trained.train) == 0)[0])]
    tile = first_bright.permute(1, 2, 0).repeat_interleave(2, 0).repeat_interleave(2, 1).numpy()  # 32 px shown at 2x
    assert _find_tile(classes_png, tile)


def test_bad_rows_are_all_listed_as_train_py_lists_them_and_good_rows_still_drawn(make_preview_cfg, build_crops,
                                                                                  crop_csv):
    with open(crop_csv, "a") as f:
        f.write("scene0.png,0,0,100,16,dark\n")  # outside the 64x64 file
        f.write("missing.png,0,0,16,16,dark\n")
        f.write("scene1.png,0,zero,16,16,bright\n")
    with pytest.raises(UserError) as stopped:
        build_crops(f"dataset.csv={crop_csv}")  # train.py's data set stops on them

    result = run_preview(make_preview_cfg(f"dataset.csv={crop_csv}"))

    assert [p.split(":")[0] for p in result["problems"]] == ["line 66", "line 67", "line 68"]
    for problem in result["problems"]:
        assert f"\n  {problem}" in str(stopped.value)
    text = report(result, str(crop_csv))
    assert all(f"\n  {problem}\n" in text for problem in result["problems"])
    assert len(result["sources"]) == 4  # the good rows of every file are drawn
    assert sum(sum(c) for c in result["counts"].values()) == 64


def test_strip_form_npy_sources_and_grey_classes(make_preview_cfg, tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "spectra"
    rows = []
    for n in range(2):
        # dB-like values, min-max scaled per file by the data set: floats from -80 to 0
        files.write_npy(root / f"rec{n}.npy", rng.uniform(-80, 0, size=(40, 300)).astype(np.float32))
        rows += [{"path": f"rec{n}.npy", "start": s, "end": s + 40, "label": "call" if s % 80 else "noise"}
                 for s in range(0, 240, 40)]
    csv = write_crops(root / "strips.csv", rows, strip=True)

    result = run_preview(make_preview_cfg(f"dataset.csv={csv}", "dataset.channels=1", "dataset.width=32",
                                          "dataset.height=32", "max_side=600"))

    assert [p.name for p in result["sources"]] == ["rec0.npy.png", "rec1.npy.png"]
    drawn = _png(result["sources"][0]).astype(int)
    assert drawn.shape[1] == 600  # 300 columns scaled up 2x
    inside, beyond = drawn[40, 100], drawn[40, 540]  # strip 40..80 ("call"); columns 240.. have no row
    assert inside[0] != inside[1] or inside[1] != inside[2]  # tinted by its class colour
    assert beyond[0] == beyond[1] == beyond[2]  # the grey rendering of the array itself
    assert result["counts"]["train"][0] + result["counts"]["val"][0] == 6  # "call": 3 of each file's 6 rows
    assert _png(result["classes_png"]).shape[0] > 2 * 64  # two rows of tiles under the caption


def test_folder_dataset_gets_classes_and_counts(make_preview_cfg, tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        for i in range(5):
            files.write_png(tmp_path / "images" / cls / f"{i}.png", files.random_image(rng, 20, 24))
    result = run_preview(make_preview_cfg("dataset=imagefolder", f"dataset.root={tmp_path / 'images'}",
                                          "dataset.width=16", "dataset.height=16"))
    assert result["sources"] == [] and not (tmp_path / "preview" / "sources").exists()
    assert result["counts"] == {"train": [4, 4], "val": [1, 1]}  # val_fraction 0.2 of 5 per class
    # The 24x20 file as the model receives it: resized to 16x16 by the data set's loader, shown at 4x.
    item = LoadItem(16, 16, 3)(str(tmp_path / "images" / "cat" / "0.png"))
    assert _find_tile(_png(result["classes_png"]), item.permute(1, 2, 0).repeat_interleave(4, 0)
                      .repeat_interleave(4, 1).numpy())


def test_cifar10_gets_classes_and_counts(make_preview_cfg, cifar_root):
    result = run_preview(make_preview_cfg("dataset=cifar10", f"dataset.root={cifar_root}", "dataset.download=false",
                                          "per_class=2"))
    assert result["classes"] == files.CIFAR_CLASSES
    assert sum(result["counts"]["train"]) == 100 and sum(result["counts"]["val"]) == 20
    assert result["sources"] == []
    assert _png(result["classes_png"]).shape[0] > 10 * 64  # a row of 64 px tiles (32 px shown at 2x) per class


@pytest.mark.slow
def test_preview_py_prints_counts_and_bad_rows(crop_csv, tmp_path):
    with open(crop_csv, "a") as f:
        f.write("missing.png,0,0,16,16,dark\n")
    done = run_python(ROOT / "preview.py", f"dataset.csv={crop_csv}", "sources=1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"line 66: {crop_csv.parent / 'missing.png'}: file not found" in done.stdout
    assert "bright" in done.stdout and "all" in done.stdout
    (run_dir,) = (tmp_path / "outputs" / "preview").glob("*/*")
    assert (run_dir / "classes.png").is_file() and len(list((run_dir / "sources").iterdir())) == 1
