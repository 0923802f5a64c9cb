"""Crop CSV validation on files the tests break on purpose: every bad row named at once, before decoding."""

import csv
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import training
from datasets import crop_csv
from datasets.crop_csv import read_crops
from datasets.crops import extract
from errors import UserError
from tests import files
from tests.test_train import train_py

HEADER = ["path", "x0", "y0", "x1", "y1", "label"]


def write_csv(path: Path, rows, header=HEADER) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def scene_root(tmp_path):
    """root/ with a 40x30 (width x height) PNG, a truncated PNG, a text file named .png and a 20x50 array."""
    root = tmp_path / "root"
    files.write_png(root / "scene.png", files.random_image(np.random.default_rng(0), 30, 40))
    files.write_truncated_png(root / "truncated.png", height=48, width=64)
    (root / "text.png").write_text("not an image")
    files.write_npy(root / "strip.npy", np.zeros((20, 50), dtype=np.float32))
    return root


def test_every_bad_row_is_named_with_its_line_and_reason(scene_root):
    rows = [
        ["scene.png", 0, 0, 16, 16, "a"],  # line 2: good
        ["gone.png", 0, 0, 16, 16, "a"],  # 3
        ["text.png", 0, 0, 16, 16, "a"],  # 4
        ["scene.png", 1.5, 0, 16, 16, "a"],  # 5
        ["scene.png", -1, 0, 16, 16, "a"],  # 6
        ["scene.png", 16, 0, 16, 16, "a"],  # 7: empty box
        ["scene.png", 0, 0, 41, 16, "a"],  # 8: one column past the 40-wide image
        ["scene.png", 0, 0, 16, 16, " "],  # 9
        ["scene.png", 0, "NaN", 16, 16, "a"],  # 10
        ["scene.png", 0, 0, "inf", 16, "a"],  # 11
        ["strip.npy", 0, 0, 16, 21, "a"],  # 12: one row past the 20-high array
        ["truncated.png", 0, 0, 16, 16, "b"],  # 13: its header is fine; only decoding finds the damage
    ]
    csv_path = write_csv(scene_root / "crops.csv", rows)
    with pytest.raises(UserError) as caught:
        read_crops(csv_path)
    message = str(caught.value)
    assert "10 bad row(s)" in message and "dataset.on_bad_rows=skip" in message
    expected = {
        3: "file not found",
        4: "unreadable",
        5: "x0='1.5' is not an integer",
        6: "x0='-1' is negative",
        7: "empty box",
        8: "outside the 40x30",
        9: "label is blank",
        10: "y0='NaN' is not an integer",
        11: "x1='inf' is not an integer",
        12: "outside the 50x20",
    }
    lines = message.splitlines()[1:]
    assert [int(line.split(":")[0].removeprefix("  line ")) for line in lines] == list(expected)
    for line, (number, reason) in zip(lines, expected.items()):
        assert reason in line, (number, line)
    assert "truncated.png" not in message


def _row_by_row(csv_path: Path, root: Path) -> tuple[list[tuple], list[str]]:
    """The reference: csv.DictReader and crop_csv._parse_row on each record, as the reader once worked."""
    good, bad = [], []
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        reader.fieldnames = [h.strip() for h in reader.fieldnames]
        form, paths = crop_csv._form(reader.fieldnames, csv_path), crop_csv._Paths(root, False)
        for record in reader:
            try:
                crop = crop_csv._parse_row(record, form, reader.line_num, paths)
                good.append((crop.line, crop.path, crop.x0, crop.y0, crop.x1, crop.y1, crop.label, crop.split))
            except ValueError as e:
                bad.append(f"line {reader.line_num}: {(record.get('path') or '').strip()}: {e}")
    return good, bad


@pytest.mark.parametrize("header", [HEADER + ["split"], [" path", "start ", "end", "label", "x0", "label"]])
def test_column_reader_agrees_with_the_row_parser_on_odd_rows(scene_root, header):
    """Rows the column-at-once reader cannot vouch for go to the row parser: same rows, values, lines, messages."""
    odd = [" 3 ", "1.0", "-0", "1e1", "abc", "", "-2", "٣", "99999999999", "+4", "1_0", "²"]
    labels = ["a", "", "NaN", "b,c", " d "]  # a line break in a label is refused by both (test_guards)
    splits = ["", "VAL", "train ", "test"]
    rows = [[" scene.png " if i % 5 == 0 else "scene.png", odd[i % len(odd)], odd[(i * 7) % len(odd)],
             str(20 + i % 7), odd[(i * 5) % len(odd)] if i % 3 == 0 else "25", labels[i % len(labels)],
             splits[i % len(splits)]][: len(header)] for i in range(60)]
    rows[7] = rows[7][:3]  # too few fields
    rows[8] = rows[8] + ["extra"]  # too many
    rows[9] = []  # a blank line
    csv_path = write_csv(scene_root / "odd.csv", rows, header=header)
    expected_good, expected_bad = _row_by_row(csv_path, scene_root)
    crops, bad, _ = read_crops(csv_path, on_bad_rows="skip")
    assert [(c.line, c.path, c.x0, c.y0, c.x1, c.y1, c.label, c.split) for c in crops] == expected_good
    assert bad == expected_bad
    assert len(expected_good) >= 5 and len(expected_bad) >= 20  # both paths were taken


def test_sizes_come_from_headers_so_truncated_pixels_fail_only_at_decode(scene_root):
    csv_path = write_csv(scene_root / "crops.csv", [["truncated.png", 0, 0, 64, 48, "a"]])
    crops, skipped, _ = read_crops(csv_path)  # validation read the 64x48 header without decoding the pixels
    assert len(crops) == 1 and skipped == []
    with pytest.raises(UserError, match=r"truncated\.png.*CSV line\(s\) 2"):
        extract(crops, torch.empty((1, 3, 8, 8), dtype=torch.uint8), desc="test")


def test_bad_rows_are_capped_at_20_with_a_count(scene_root):
    csv_path = write_csv(scene_root / "crops.csv", [["gone.png", 0, 0, 4, 4, "a"]] * 25)
    with pytest.raises(UserError) as caught:
        read_crops(csv_path)
    message = str(caught.value)
    assert message.count("file not found") == 20
    assert message.splitlines()[-1].strip() == "... and 5 more"


def test_missing_columns_are_named(scene_root):
    csv_path = write_csv(scene_root / "crops.csv", [["scene.png", 0, 0, 4, "a"]], header=["path", "x0", "y0", "x1", "label"])
    with pytest.raises(UserError, match="missing column.s. y1 "):
        read_crops(csv_path)


def test_skip_leaves_bad_rows_out_and_the_run_lists_them(make_cfg, crop_csv, tmp_path):
    with open(crop_csv, "a", newline="") as f:
        csv.writer(f).writerows([["gone.png", 0, 0, 16, 16, "dark"], ["scene0.png", 0, 0, 99, 16, "dark"]])
    cfg = make_cfg(f"dataset.csv={crop_csv}", "dataset.on_bad_rows=skip", "loader.batch_size=16")
    training.run(cfg)
    skipped = (Path(cfg.run_dir) / "skipped_rows.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in skipped] == ["line 66", "line 67"]
    assert "file not found" in skipped[0] and "outside" in skipped[1]
    assert "skipped 2 bad row(s)" in (Path(cfg.run_dir) / "train.log").read_text()


def test_paths_outside_the_root_are_refused(tmp_path):
    root = tmp_path / "root"
    elsewhere = files.write_png(tmp_path / "elsewhere.png", np.zeros((16, 16, 3), dtype=np.uint8))
    files.write_png(root / "inside.png", np.zeros((16, 16, 3), dtype=np.uint8))
    os.symlink(elsewhere, root / "link.png")
    rows = [[name, 0, 0, 16, 16, "a"] for name in ("inside.png", "../elsewhere.png", str(elsewhere), "link.png")]
    csv_path = write_csv(root / "crops.csv", rows)
    with pytest.raises(UserError) as caught:
        read_crops(csv_path)
    message = str(caught.value)
    assert "3 bad row(s)" in message
    for line in (3, 4, 5):
        assert f"line {line}: " in message
    assert message.count("outside the root") == 3 and "dataset.allow_outside_root=true" in message
    crops, _, _ = read_crops(csv_path, allow_outside_root=True)
    assert len(crops) == 4


def test_object_npy_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pickle_ran"

    class Payload:
        def __reduce__(self):  # what a hostile file would carry: a call made when it is unpickled
            return Path.touch, (marker,)

    root = tmp_path / "root"
    root.mkdir()
    np.save(root / "hostile.npy", np.array([Payload()], dtype=object), allow_pickle=True)
    csv_path = write_csv(root / "crops.csv", [["hostile.npy", 0, 0, 1, 1, "a"]])
    with pytest.raises(UserError, match=r"line 2: .*hostile\.npy.*object arrays are refused"):
        read_crops(csv_path)
    assert not marker.exists()


@pytest.mark.slow
def test_train_py_prints_the_bad_rows_as_lines(tmp_path):
    """The dataset is built by Hydra's instantiate, which wraps the UserError: train.py still prints it plainly."""
    csv_path = write_csv(tmp_path / "crops.csv", [["gone.png", 0, 0, 4, 4, "a"], ["gone.png", 0, 0, 4, 4, ""]])
    result = train_py(f"dataset.csv={csv_path}", "trainer.device=cpu", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "Traceback" not in output and "Error in call to target" not in output
    assert "2 bad row(s)" in output
    assert "\n  line 2: " in output and "\n  line 3: gone.png: label is blank" in output


def test_read_rows_are_held_as_columns_of_a_few_dozen_bytes_a_row(scene_root):
    """The rows stay alive through a cache=memory build: as Python objects (a Crop and its ints, ~230 bytes a
    row) 192k of them were over a fifth of the 32x32 grey array being filled. Held as columns, they are
    33 bytes a row."""
    n = 20_000
    rows = [["scene.png", i % 24, i % 14, 16 + i % 24, 16 + i % 14, f"c{i % 10}"] for i in range(n)]
    csv_path = write_csv(scene_root / "many.csv", rows)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        crops, _, _ = read_crops(csv_path)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(crops) == n and crops[n - 1].line == n + 1
    assert held < 50 * n, f"{held / n:.0f} bytes a row"


def test_huge_indices_are_bad_rows_not_an_overflow(scene_root):
    """Python ints past int64 (and 1e20 as a float) once crashed the int64 bounds check with OverflowError."""
    rows = [["scene.png", 0, 0, 16, 16, "a"], ["scene.png", 0, 0, "99999999999999999999", 16, "a"],
            ["scene.png", 0, 0, "1e20", 16, "a"], ["scene.png", 0, 0, 16, 16, "b"]]
    crops, bad, _ = read_crops(write_csv(scene_root / "huge.csv", rows), on_bad_rows="skip")
    assert [c.line for c in crops] == [2, 5]
    assert bad == ["line 3: scene.png: x1='99999999999999999999' is too large", "line 4: scene.png: x1='1e20' is too large"]


def test_rows_short_of_the_header_read_as_before(scene_root):
    """A header with a split column over rows that leave it out: no row of the chunk has the header's field
    count, and each is read as csv.DictReader did (the missing field empty)."""
    rows = [["scene.png", 0, 0, 16, 16, "a"], ["scene.png", 8, 8, 24, 24, "b"]]
    crops, bad, _ = read_crops(write_csv(scene_root / "short.csv", rows, header=[*HEADER, "split"]))
    assert bad == [] and [(c.line, c.label, c.split) for c in crops] == [(2, "a", None), (3, "b", None)]


@pytest.mark.parametrize("character", ["\x0b", "\x0c", "\x1c", "\x1f", "\x7f", "\x85", "\u2028"])
def test_a_path_holding_a_control_character_is_a_bad_row_on_either_reader(scene_root, character):
    """str.strip() drops these from a path's ends without a word, yet 'scene.png\\x1f' is another file on disk.
    A row with the header's field count is judged column by column; a short one goes to the row parser."""
    rows = [["scene.png", 0, 0, 16, 16, "a", "train"],
            [f"scene.png{character}", 0, 0, 16, 16, "a", "train"],  # line 3: the column reader
            [f"{character}scene.png", 0, 0, 16, 16, "b"],  # line 4: too few fields, the row parser
            ["scene.png", 0, 0, 16, 16, "b"]]
    crops, bad, _ = read_crops(write_csv(scene_root / "control.csv", rows, header=[*HEADER, "split"]), on_bad_rows="skip")
    assert [c.line for c in crops] == [2, 5]
    message = "holds a line break or control character: remove it from the CSV"
    assert bad == [f"line {line}: {path.strip()}: path {path!r} {message}"
                   for line, path in ((3, f"scene.png{character}"), (4, f"{character}scene.png"))]
