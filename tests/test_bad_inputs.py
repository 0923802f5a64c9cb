"""Inputs a careless or hostile user gives, on real files: each is refused in one line naming the file, row
or key, or handled as the README says."""

import csv
import os
from pathlib import Path

import numpy as np
import pytest

import training
from errors import UserError
from tests import files


def write_scene_csv(folder: Path, labels: list[str], splits: list[str] | None = None, paths=None) -> Path:
    """One 64x64 PNG and a 16x16 box per label (the boxes tile the image row by row)."""
    files.write_png(folder / "scene.png", files.random_image(np.random.default_rng(0), 64, 64))
    csv_path = folder / "crops.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "x0", "y0", "x1", "y1", "label"] + (["split"] if splits else []))
        for i, label in enumerate(labels):
            y, x = divmod(i % 16, 4)
            path = paths[i] if paths else "scene.png"
            writer.writerow([path, x * 16, y * 16, x * 16 + 16, y * 16 + 16, label] + ([splits[i]] if splits else []))
    return csv_path


def test_labels_that_only_look_like_integers_are_names(build_crops, tmp_path):
    """'--5' and '²' passed the old digit test and then crashed int(); they are class names."""
    csv_path = write_scene_csv(tmp_path, ["--5", "²", "1"] * 4)
    assert build_crops(f"dataset.csv={csv_path}").classes == ["--5", "1", "²"]
    numbers = write_scene_csv(tmp_path / "numbers", ["10", "2", "-1"] * 4)
    assert build_crops(f"dataset.csv={numbers}").classes == ["-1", "2", "10"]  # still sorted as numbers


def test_a_csv_that_is_not_utf8_names_its_line(build_crops, tmp_path):
    csv_path = write_scene_csv(tmp_path, ["cafe", "tea"] * 4)
    lines = csv_path.read_bytes().split(b"\n")
    lines[3] = lines[3].replace(b"cafe", "café".encode("latin-1"))
    csv_path.write_bytes(b"\n".join(lines))
    with pytest.raises(UserError, match=r"crops.csv: line 4 is not UTF-8 \(byte 0xe9\): the crop CSV must be saved as UTF-8"):
        build_crops(f"dataset.csv={csv_path}")


def test_a_path_with_a_trailing_newline_is_a_bad_row_not_trimmed(build_crops, tmp_path):
    csv_path = write_scene_csv(tmp_path, ["a", "b"] * 4, paths=["scene.png\n"] + ["scene.png"] * 7)
    with pytest.raises(UserError, match=r"1 bad row\(s\).*\n  line 3: scene.png: path 'scene.png\\n' holds a line break"):
        build_crops(f"dataset.csv={csv_path}")


def test_a_training_split_with_a_single_class_is_an_error(make_cfg, tmp_path):
    csv_path = write_scene_csv(tmp_path, ["a"] * 6 + ["b"] * 2, splits=["train"] * 6 + ["val"] * 2)
    with pytest.raises(UserError, match=r"training split holds only class \['a'\] of \['a', 'b'\]"):
        training.run(make_cfg(f"dataset.csv={csv_path}"))


def test_a_class_only_in_validation_is_warned_about(make_cfg, tmp_path, caplog):
    csv_path = write_scene_csv(tmp_path, ["a", "b"] * 4 + ["c"], splits=["train"] * 8 + ["val"])
    training.run(make_cfg(f"dataset.csv={csv_path}"))
    assert "class(es) ['c'] have validation items but no training items" in caplog.text


@pytest.mark.parametrize("family, suffix", [("imagefolder", ".png"), ("datasetfolder", ".npy")])
def test_a_folder_symlink_leaving_the_root_is_refused(make_cfg, tmp_path, family, suffix):
    root, outside = tmp_path / "root", tmp_path / "outside"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        for i in range(3):
            item = root / name / f"{i}{suffix}"
            if suffix == ".png":
                files.write_png(item, files.random_image(rng, 8, 8))
            else:
                files.write_npy(item, files.random_image(rng, 8, 8))
    secret = files.write_npy(outside / f"secret{suffix}", np.zeros((8, 8), np.uint8)) if suffix == ".npy" else \
        files.write_png(outside / f"secret{suffix}", np.zeros((8, 8), np.uint8))
    os.symlink(secret, root / "a" / f"link{suffix}")
    os.symlink(outside, root / "b" / "linked_folder")
    with pytest.raises(UserError, match=rf"2 file\(s\) resolve outside it.*allow_outside_root=true:\n.*link{suffix}"):
        training.run(make_cfg(f"dataset={family}", f"dataset.root={root}"))
    metrics = training.run(make_cfg(f"dataset={family}", f"dataset.root={root}", "dataset.allow_outside_root=true"))
    assert metrics["val/acc"] >= 0
