"""benchmarks/real_photos.py: the ten photographs reach disk as PNGs, the held-out CSV keeps training boxes in
left halves and validation boxes in right halves, and a wheel that cannot be had is one line."""

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import real_photos
from errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # pip download on first use (then the wheel is cached under .cache/)
def test_photo_crops_hold_out_right_halves(tmp_path):
    made = real_photos.make_photo_crops(tmp_path / "photos", seed=3, boxes_per_half=20, box_range=(16, 40))
    assert len(made.classes) == 10
    held, whole = _rows(made.held_out_csv), _rows(made.whole_csv)
    assert len(held) == len(whole) == 10 * 40 and "split" not in whole[0]
    for row in held + whole:
        with Image.open(made.root / row["path"]) as image:
            width, height = image.size
            assert image.mode == "L"
        x0, y0, x1, y1 = (int(row[k]) for k in ("x0", "y0", "x1", "y1"))
        assert x1 - x0 == y1 - y0 and 16 <= x1 - x0 <= 40 and 0 <= y0 and y1 <= height
        if row.get("split") == "train":
            assert x1 <= width // 2
        elif row.get("split") == "val":
            assert x0 >= width // 2
    # The same seed writes the same boxes.
    again = real_photos.make_photo_crops(tmp_path / "again", seed=3, boxes_per_half=20, box_range=(16, 40))
    assert _rows(again.whole_csv) == whole


@pytest.mark.skipif(importlib.util.find_spec("skimage") is not None, reason="photos come from installed skimage")
def test_a_file_that_is_not_the_wheel_is_one_line(tmp_path):
    (tmp_path / f"scikit_image-{real_photos.SKIMAGE_VERSION}-cp311-x.whl").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="is not a scikit-image wheel") as e:
        real_photos.make_photo_crops(tmp_path / "photos", wheel_cache=tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("skimage") is not None, reason="photos come from installed skimage")
def test_no_wheel_to_download_is_one_line(tmp_path):
    links = tmp_path / "links"
    links.mkdir()
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(links))
    done = subprocess.run([sys.executable, "-m", "benchmarks.real_photos", str(tmp_path / "out"),
                           "--wheel-cache", str(tmp_path / "cache")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "could not fetch scikit-image" in done.stderr
    assert not (tmp_path / "out" / "whole.csv").exists()
