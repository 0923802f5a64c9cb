"""Read, check and write crop CSVs.

Box form:   path,x0,y0,x1,y1,label[,split]   half-open pixel ranges; x is the column, y the row.
Strip form: path,start,end,label[,split]     columns [start, end) over the full height.

Every row is checked before any pixel is decoded (sizes come from file headers), and all problems are
reported at once, each with its CSV line number; or, with on_bad_rows=skip, left out and handed back.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from datasets.base import decode_problem, problem_list
from datasets.transforms import DECODE_ERRORS, image_size
from errors import UserError

BOX_COLUMNS = ("path", "x0", "y0", "x1", "y1", "label")
STRIP_COLUMNS = ("path", "start", "end", "label")
SPLITS = ("train", "val")
BAD_ROW_POLICIES = ("error", "skip")


@dataclass(frozen=True, slots=True)  # slots: ~100 bytes less per row, which adds up over 50k-row CSVs
class Crop:
    """One example: a half-open region [y0, y1) x [x0, x1) of a file; y1 = None means the full height."""

    line: int  # 1-based line number in the CSV, for messages
    path: Path  # dataset.root / the CSV's path, as written (not resolved)
    x0: int
    y0: int
    x1: int
    y1: int | None
    label: str
    split: str | None


def _form(header: list[str], csv_path: Path) -> tuple[str, ...]:
    columns = set(header)
    for form in (BOX_COLUMNS, STRIP_COLUMNS):
        if set(form) <= columns:
            return form
    # Name what is missing from the form the header is closest to: start/end mean strip form.
    closest = STRIP_COLUMNS if {"start", "end"} & columns else BOX_COLUMNS
    missing = [c for c in closest if c not in columns]
    raise UserError(
        f"{csv_path}: missing column(s) {', '.join(missing)} (header is {','.join(header)!r}); "
        f"box form is {','.join(BOX_COLUMNS)}[,split], strip form is {','.join(STRIP_COLUMNS)}[,split]"
    )


def _int(text: str, column: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{column}={text!r} is not an integer") from None
    if not math.isfinite(value) or value != int(value):  # NaN and inf included
        raise ValueError(f"{column}={text!r} is not an integer")
    if value < 0:
        raise ValueError(f"{column}={text!r} is negative")
    return int(value)


class _Paths:
    """One Path per distinct file the CSV names, shared by its rows and checked against the root once:
    resolving it for every row took ~60 us, most of the time of reading a 20k-row CSV."""

    def __init__(self, root: Path, allow_outside_root: bool):
        self.root, self.resolved_root, self.allow_outside_root = root, root.resolve(), allow_outside_root
        self.known: dict[str, Path | str] = {}  # the CSV's text -> its Path, or why it is refused

    def __call__(self, text: str) -> Path:
        if text not in self.known:
            path = self.root / text
            resolved = path.resolve()
            # A CSV from elsewhere must not make the trainer read any file it names ("../", absolute, symlinks).
            if not self.allow_outside_root and not resolved.is_relative_to(self.resolved_root):
                self.known[text] = (
                    f"resolves to {resolved}, outside the root {self.resolved_root}: move it under dataset.root, "
                    "point dataset.root at a folder holding it, or set dataset.allow_outside_root=true"
                )
            else:
                self.known[text] = path
        found = self.known[text]
        if isinstance(found, str):
            raise ValueError(found)
        return found


def _parse_row(record: dict[str, str], form: tuple[str, ...], line: int, paths: _Paths) -> Crop:
    """Rows of one class share one label string, and rows of one file one Path, not copies."""
    text = {k: (record.get(k) or "").strip() for k in (*form, "split")}
    if any(c in (record.get("path") or "") for c in "\r\n\t\0"):
        # Not trimmed silently: 'a.png\n' names another file than 'a.png' would on disk.
        raise ValueError(f"path {record['path']!r} holds a line break or control character: remove it from the CSV")
    if not text["path"]:
        raise ValueError("path is blank")
    if not text["label"] or text["label"].lower() == "nan":
        raise ValueError("label is blank")
    split = text["split"].lower() or None
    if split is not None and split not in SPLITS:
        raise ValueError(f"split={text['split']!r} must be train or val (or empty)")
    if form is BOX_COLUMNS:
        x0, y0, x1, y1 = (_int(text[c], c) for c in ("x0", "y0", "x1", "y1"))
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"empty box: need x0 < x1 and y0 < y1, got x {x0}..{x1}, y {y0}..{y1}")
    else:
        x0, x1 = _int(text["start"], "start"), _int(text["end"], "end")
        y0, y1 = 0, None
        if x1 <= x0:
            raise ValueError(f"empty strip: need start < end, got {x0}..{x1}")
    return Crop(line, paths(text["path"]), x0, y0, x1, y1, sys.intern(text["label"]), split)


def require_csv(csv_path: str | Path) -> Path:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"dataset.csv: file not found: {csv_path.resolve()}")
    return csv_path


def _require_utf8(csv_path: Path) -> None:
    """Name the first line that is not UTF-8 (decoding while parsing knows only its buffer, not the line)."""
    data = csv_path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{csv_path}: line {line} is not UTF-8 (byte 0x{data[e.start]:02x}): the crop CSV must be "
                        "saved as UTF-8 (in a spreadsheet: CSV UTF-8)") from None


def read_crops(
    csv_path: str | Path,
    root: str | Path | None = None,
    on_bad_rows: str = "error",
    allow_outside_root: bool = False,
) -> tuple[list[Crop], list[str]]:
    """Parse and check every row; returns the good rows and, with on_bad_rows=skip, one line per bad row.

    With on_bad_rows=error, one UserError lists every bad row (the first 20, then a count).
    """
    if on_bad_rows not in BAD_ROW_POLICIES:
        raise UserError(f"dataset.on_bad_rows must be one of {', '.join(BAD_ROW_POLICIES)}, got {on_bad_rows!r}")
    csv_path = require_csv(csv_path)
    root = Path(root) if root is not None else csv_path.parent
    if not root.is_dir():
        raise UserError(f"dataset.root: folder not found: {root.resolve()}")
    _require_utf8(csv_path)
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        form = _form(header, csv_path)
        parsed, problems, paths = [], {}, _Paths(root, allow_outside_root)  # problems: CSV line -> what is wrong
        for record in reader:
            try:
                parsed.append(_parse_row(record, form, reader.line_num, paths))
            except ValueError as e:
                problems[reader.line_num] = f"{(record.get('path') or '').strip()}: {e}"
    problems.update(_check_files(parsed))
    crops = [crop for crop in parsed if crop.line not in problems]
    bad = [f"line {line}: {problem}" for line, problem in sorted(problems.items())]
    if bad and on_bad_rows == "error":
        raise UserError(
            f"{csv_path}: {len(bad)} bad row(s); fix or remove them, or set dataset.on_bad_rows=skip:"
            + problem_list(bad)
        )
    if not crops:
        raise UserError(f"{csv_path}: no usable rows; add one row per example under the header")
    return crops, bad


def _check_files(crops: Iterable[Crop]) -> dict[int, str]:
    """Every region must lie inside its file: CSV line -> problem. Sizes come from PIL's header read or the
    .npy header (memory-mapped), so validating a large data set decodes no pixels."""
    sizes: dict[Path, tuple[int, int] | str] = {}
    problems = {}
    for crop in crops:
        if crop.path not in sizes:
            try:
                sizes[crop.path] = image_size(crop.path)
            except FileNotFoundError:
                sizes[crop.path] = "file not found"
            except (*DECODE_ERRORS, UserError) as e:
                sizes[crop.path] = f"unreadable ({decode_problem(e)})"
        size = sizes[crop.path]
        if isinstance(size, str):
            problems[crop.line] = f"{crop.path}: {size}"
            continue
        height, width = size
        y1 = height if crop.y1 is None else crop.y1
        if crop.x1 > width or y1 > height:
            problems[crop.line] = (
                f"{crop.path}: region x {crop.x0}..{crop.x1}, y {crop.y0}..{y1} "
                f"is outside the {width}x{height} (width x height) file"
            )
    return problems


def write_crops(csv_path: str | Path, rows: Iterable[dict], strip: bool = False) -> Path:
    """Write a crop CSV (box form by default) from dicts with the form's keys and optional `split`."""
    csv_path = Path(csv_path)
    rows = list(rows)
    columns = list(STRIP_COLUMNS if strip else BOX_COLUMNS)
    if any("split" in row for row in rows):
        columns.append("split")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return csv_path
