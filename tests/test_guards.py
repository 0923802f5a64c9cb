"""What the data names, checked before it is opened or allocated: FIFOs, devices and folders where a file
should be, labels that break log lines or are megabytes long, class counts whose confusion matrix would not
fit, and .npy regions over max_image_pixels."""

import csv
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import ImageFont

from datasets import guards, transforms, values
from errors import UserError
from tests import files
from tests.helpers import in_child, returns_within
from training.board import fit_text


def _scene_csv(folder: Path, rows: list[list]) -> Path:
    """Two grey-noise scenes (the crop fixture's classes) plus `rows`, as a box-form CSV."""
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        files.write_png(folder / name, files.random_image(rng, 32, 32))
    path = folder / "crops.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "x0", "y0", "x1", "y1", "label", "split"])
        writer.writerows([["a.png", 0, 0, 16, 16, "cat", "train"], ["b.png", 0, 0, 16, 16, "dog", "train"],
                          ["a.png", 16, 16, 32, 32, "cat", "val"], ["b.png", 16, 16, 32, 32, "dog", "val"], *rows])
    return path


def test_a_fifo_named_by_a_csv_row_is_a_bad_row_not_a_hang(build_crops, tmp_path):
    csv_path = _scene_csv(tmp_path, [["pipe.png", 0, 0, 8, 8, "cat", "train"]])
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(UserError, match=r"line 6: .*pipe.png is a FIFO \(named pipe\)"):
        returns_within(20, lambda: build_crops(f"dataset.csv={csv_path}"))


def _image_folder(root: Path, classes: tuple[str, ...]) -> Path:
    """An ImageFolder root: four noise PNGs per class folder."""
    rng = np.random.default_rng(0)
    for label in classes:
        for i in range(4):
            files.write_png(root / label / f"{i}.png", files.random_image(rng, 32, 32))
    return root


def test_a_fifo_in_an_image_folder_is_named_not_a_hang(make_cfg, tmp_path):
    import training

    root = _image_folder(tmp_path / "folder", ("cat", "dog"))
    os.mkfifo(root / "dog" / "pipe.png")
    cfg = make_cfg("dataset=imagefolder", f"dataset.root={root}")
    with pytest.raises(UserError, match=r"pipe.png is a FIFO"):
        returns_within(30, lambda: training.run(cfg))


def test_the_csv_itself_as_a_fifo_is_named(build_crops, tmp_path):
    os.mkfifo(tmp_path / "crops.csv")
    with pytest.raises(UserError, match=r"dataset.csv: .*crops.csv is a FIFO"):
        returns_within(10, lambda: build_crops(f"dataset.csv={tmp_path / 'crops.csv'}"))


def test_a_megabyte_field_is_one_line_naming_its_line(build_crops, tmp_path):
    csv_path = _scene_csv(tmp_path, [["a.png", 0, 0, 8, 8, "x" * (1 << 20), "train"]])
    with pytest.raises(UserError, match=r"crops.csv: line 6: field larger than field limit") as error:
        build_crops(f"dataset.csv={csv_path}")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("label", "said"), [("x" * 3_000, "3,000 characters"), ("ca\x00t", "control character"),
                                             ("two\nlines", "line break"), ("tab\there", "control character")])
def test_a_label_that_would_break_logs_or_captions_is_a_bad_row(build_crops, tmp_path, label, said):
    csv_path = _scene_csv(tmp_path, [["a.png", 0, 0, 8, 8, label, "train"]])
    with pytest.raises(UserError, match=rf"line \d+: .*{said}"):
        build_crops(f"dataset.csv={csv_path}")
    kept = build_crops(f"dataset.csv={csv_path}", "dataset.on_bad_rows=skip")
    assert kept.classes == ["cat", "dog"]


def test_more_classes_than_the_limit_stop_before_any_crop_is_cut(build_crops, tmp_path, monkeypatch):
    monkeypatch.setattr(guards, "MAX_CLASSES", 3)  # the rule, not the number: 1,001 classes need 1,001 rows
    csv_path = _scene_csv(tmp_path, [["a.png", 0, 0, 8, 8, name, "train"] for name in ("emu", "fox")])
    with pytest.raises(UserError, match=r"4 classes, more than the 3 this trainer takes"):
        build_crops(f"dataset.csv={csv_path}")


def test_a_class_folder_whose_name_holds_a_line_break_is_refused(make_cfg, tmp_path):
    import training

    root = _image_folder(tmp_path / "folder", ("cat", "do\ng"))
    with pytest.raises(UserError, match=r"class label .* holds a line break"):
        training.run(make_cfg("dataset=imagefolder", f"dataset.root={root}"))


def test_an_all_val_csv_asks_for_training_rows(build_crops, tmp_path):
    rng = np.random.default_rng(0)
    files.write_png(tmp_path / "a.png", files.random_image(rng, 32, 32))
    path = tmp_path / "crops.csv"
    path.write_text("path,x0,y0,x1,y1,label,split\na.png,0,0,8,8,cat,val\na.png,8,8,16,16,dog,val\n")
    with pytest.raises(UserError, match=r"0 training and 2 validation items: mark some for training"):
        build_crops(f"dataset.csv={path}")


def test_caption_fitting_is_not_quadratic_in_the_label():
    """A 3,000-character label: cutting one character at a time measured it ~3,000 times (6-8 s a caption);
    bisection measures ~7 prefixes of at most the tile's width, and cuts where the old loop did."""
    font = ImageFont.load_default()
    label = "a-long-class-name " * 170
    started = time.perf_counter()
    fitted = fit_text(label, font, 96)
    assert time.perf_counter() - started < 0.1
    assert font.getlength(fitted) <= 96 < font.getlength(label[:len(fitted) + 1])
    assert fit_text("cat", font, 96) == "cat" and fit_text("W" * 50, font, 1) == "W"


def _peak_growth(work) -> int:
    """Bytes the process's resident peak (VmHWM, file pages a memory map touched included) rose by during
    `work()`; the peak is reset to the current size first (/proc/self/clear_refs), so call it in a child."""
    def status(key: str) -> int:
        return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024

    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    work()
    return status("VmHWM") - before


def test_a_crop_of_a_large_npy_reads_its_window_not_the_file(build_crops, tmp_path):
    """Two 10x10 crops of a 64 MiB array (a sparse file): the value-range scan and the cut touch the rows the
    crops cover, ~1 MiB, where the scan read every value before. Measured beside a whole-file scan, in a
    forked child (resetting the peak is process-wide)."""
    source = files.write_sparse_npy(tmp_path / "big.npy", (2048, 8192))
    rng = np.random.default_rng(0)
    files.write_png(tmp_path / "a.png", files.random_image(rng, 32, 32))
    (tmp_path / "crops.csv").write_text("path,x0,y0,x1,y1,label,split\n"
                                        "big.npy,0,0,10,10,cat,train\nbig.npy,100,100,110,110,dog,train\n"
                                        "a.png,0,0,10,10,cat,val\na.png,10,10,20,20,dog,val\n")

    def measure():
        build = lambda: build_crops(f"dataset.csv={tmp_path / 'crops.csv'}", "dataset.width=16", "dataset.height=16")
        build()  # warm: imports and first-use allocations are not the data's
        windowed = _peak_growth(build)
        whole = _peak_growth(lambda: values.array_stats(transforms.open_array(source), source))
        assert whole > 48 * 2**20 and windowed < 8 * 2**20, (windowed, whole)

    in_child(measure)


def test_values_outside_every_crop_window_do_not_count(build_crops, tmp_path):
    """What the window scan means: NaN and an outlier where no crop reads neither refuse the file nor stretch
    dataset.value_range=global (the whole-file scan refused this file)."""
    array = np.zeros((64, 64), dtype=np.float32)
    array[:16, :16] = np.linspace(0, 1, 256).reshape(16, 16)
    array[40, 40], array[50, 50] = np.nan, 1e6  # outside both crops
    files.write_npy(tmp_path / "a.npy", array)
    (tmp_path / "crops.csv").write_text("path,x0,y0,x1,y1,label,split\na.npy,0,0,8,8,cat,train\n"
                                        "a.npy,8,8,16,16,dog,train\na.npy,0,8,8,16,cat,val\na.npy,8,0,16,8,dog,val\n")
    bundle = build_crops(f"dataset.csv={tmp_path / 'crops.csv'}", "dataset.width=16", "dataset.height=16")
    assert bundle.value_range == (0.0, 1.0)


