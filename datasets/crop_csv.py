"""Read, check and write crop CSVs.

Box form:   path,x0,y0,x1,y1,label[,split]   half-open pixel ranges; x is the column, y the row.
Strip form: path,start,end,label[,split]     columns [start, end) over the full height.

Every row is checked before any pixel is decoded (sizes come from file headers), and all problems are
reported at once, each with its CSV line number; or, with on_bad_rows=skip, left out and handed back.
"""

from __future__ import annotations

import codecs
import csv
import gc
import io
import math
import re
from operator import is_not
import sys
from collections.abc import Iterable, Iterator
from typing import NamedTuple
from contextlib import contextmanager
from itertools import compress, repeat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets import guards
from datasets.base import decode_problem, problem_list
from datasets.regions import open_regions, scale_boxes
from datasets.transforms import DECODE_ERRORS, image_header
from errors import UserError

BOX_COLUMNS = ("path", "x0", "y0", "x1", "y1", "label")
STRIP_COLUMNS = ("path", "start", "end", "label")
SPLITS = ("train", "val")
BAD_ROW_POLICIES = ("error", "skip")
# What a path may not hold: control characters (C0, DEL, C1) and Unicode's line and paragraph separators.
# str.strip() would drop them from either end without a word ('a.png\x1f' -> 'a.png'), yet on disk they name
# another file, and inside a path they are almost always an export's mistake.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
ROWS_PER_CHUNK = 2_048  # rows parsed at once: ~1 MB of fields at a time (16,384 held ~10 MB, 0.16x of a 20k-crop
# cache=memory array), and no slower on 20k rows


# slots: ~100 bytes less per row, which adds up over 50k-row CSVs. Not frozen: a frozen dataclass sets each
# field through object.__setattr__, which made creating 192k rows 4x slower (0.18 s against 0.04 s).
@dataclass(slots=True)
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


SPLIT_CODES = (None, "train", "val")  # CropTable.split holds a row's split as its index here


@dataclass
class CropTable:
    """The good rows of a crop CSV, column by column: 33 bytes a row, where a Crop per row (with an int
    object per field) took ~230, 42 MiB for 192k rows, more than a fifth of the 32x32 grey array a
    cache=memory build fills from them. Indexing or iterating gives Crop objects, made on the fly (cache=none
    items, preview, messages); the builds read the columns."""

    files: list[Path]  # the distinct files the CSV names (bad rows' included), in order of first appearance
    labels: list[str]  # the distinct labels, likewise; `file` and `label` index these
    line: np.ndarray  # int64 (n,): 1-based CSV line, for messages
    file: np.ndarray  # int32 (n,)
    x0: np.ndarray  # int32 (n,): half-open ranges, as in Crop
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray  # -1: the full height (strip form)
    label: np.ndarray  # int32 (n,)
    split: np.ndarray  # int8 (n,): index into SPLIT_CODES

    def __len__(self) -> int:
        return len(self.line)

    def __getitem__(self, index: int) -> Crop:
        y1 = int(self.y1[index])
        return Crop(int(self.line[index]), self.files[self.file[index]], int(self.x0[index]), int(self.y0[index]),
                    int(self.x1[index]), None if y1 < 0 else y1, self.labels[self.label[index]],
                    SPLIT_CODES[self.split[index]])

    def __iter__(self) -> Iterator[Crop]:
        return map(self.__getitem__, range(len(self)))

    def take(self, indices: np.ndarray) -> CropTable:
        """The rows at `indices` (int positions or a boolean mask), in that order."""
        return CropTable(self.files, self.labels, *(getattr(self, name)[indices] for name in _ROW_COLUMNS))

    def boxes(self) -> np.ndarray:
        """int32 (n, 4): each row's x0, y0, x1, y1; a strip spans rows 0..1, so strips of one file always meet
        in y (what datasets/splits.py needs to tell which crops overlap). 16 bytes a row, held through the build."""
        strip = self.y1 < 0
        return np.stack([self.x0, np.where(strip, 0, self.y0), self.x1, np.where(strip, 1, self.y1)],
                        axis=1).astype(np.int32, copy=False)

    def used_files(self) -> list[Path]:
        """The files the rows name, each once, in order of first appearance."""
        codes, first = np.unique(self.file, return_index=True)
        return [self.files[code] for code in codes[np.argsort(first)].tolist()]

    def windows(self) -> dict[Path, np.ndarray]:
        """{file: its distinct regions as int64 rows (y0, y1, x0, x1)}, y1 -1 for the full height: what the
        value-range scan of a .npy file reads, instead of the whole file."""
        boxes = np.stack([self.y0, self.y1, self.x0, self.x1], axis=1).astype(np.int64)
        order = np.argsort(self.file, kind="stable")
        codes, starts = np.unique(self.file[order], return_index=True)
        return {self.files[code]: np.unique(boxes[rows], axis=0)
                for code, rows in zip(codes.tolist(), np.split(order, starts[1:]))}

    def row_labels(self) -> list[str]:
        """Each row's label (the strings are shared, one per class)."""
        return list(map(self.labels.__getitem__, self.label.tolist()))

    def row_splits(self) -> list[str | None]:
        return list(map(SPLIT_CODES.__getitem__, self.split.tolist()))


_ROW_COLUMNS = ("line", "file", "x0", "y0", "x1", "y1", "label", "split")
_COLUMN_TYPES = {"line": np.int64, "split": np.int8}  # int32 for the rest: _int keeps every value below 2**31


class _Columns:
    """The good rows' columns, gathered chunk by chunk, with one code per distinct file and label."""

    def __init__(self):
        self.files: dict[Path, int] = {}
        self.labels: dict[str, int] = {}
        self.chunks: list[dict[str, np.ndarray]] = []

    def file_code(self, path: Path) -> int:
        return self.files.setdefault(path, len(self.files))

    def label_code(self, label: str) -> int:
        return self.labels.setdefault(label, len(self.labels))

    def chunk(self, n: int) -> dict[str, np.ndarray]:
        """Zeroed columns for a chunk of n rows: the caller fills them, then keep() adds the good ones."""
        return {name: np.zeros(n, dtype=_COLUMN_TYPES.get(name, np.int32)) for name in _ROW_COLUMNS}

    def keep(self, columns: dict[str, np.ndarray], good: np.ndarray) -> None:
        self.chunks.append({name: column[good] for name, column in columns.items()})

    def table(self) -> CropTable:
        chunks = self.chunks or [self.chunk(0)]
        return CropTable(list(self.files), list(self.labels),
                         *(np.concatenate([chunk[name] for chunk in chunks]) for name in _ROW_COLUMNS))


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
    if value >= 2**31:  # no image is that large, and the bounds are checked as int64 arrays
        raise ValueError(f"{column}={text!r} is too large")
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
    if CONTROL_CHARACTERS.search(record.get("path") or ""):
        # Not trimmed silently: 'a.png\n' names another file than 'a.png' would on disk.
        raise ValueError(f"path {record['path']!r} holds a line break or control character: remove it from the CSV")
    if not text["path"]:
        raise ValueError("path is blank")
    if not text["label"] or text["label"].lower() == "nan":
        raise ValueError("label is blank")
    if (problem := guards.label_problem(text["label"])) is not None:
        raise ValueError(problem)
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


def _chunks(reader, size: int):
    """(rows, lines) of up to `size` non-blank records at a time, with the CSV line each record ends on (a
    quoted field may span lines), as csv.DictReader counts them. Chunks bound the memory parsing takes:
    the fields of a row cost ~10x the Crop made of them."""
    rows, lines = [], []
    for row in reader:
        if row:  # DictReader skips blank lines too
            rows.append(row)
            lines.append(reader.line_num)
            if len(rows) == size:
                yield rows, lines
                rows, lines = [], []
    if rows:
        yield rows, lines


@contextmanager
def _collector_paused():
    """Python's cyclic garbage collector runs every few hundred new objects and, as they age, walks all of
    them: while 192k rows were parsed it took ~2/3 of the time. Rows make no reference cycles."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _record(header: list[str], row: list[str]) -> dict:
    """A row as csv.DictReader gives it: the last of repeated columns wins, missing fields are None."""
    record = dict(zip(header, row))
    for key in header[len(row):]:
        record[key] = None
    return record


def _plain_ints(texts) -> np.ndarray:
    """int64 values of texts Python's int() reads (it ignores surrounding spaces, as _int does) as
    0 <= value < 2**31, else -1 (for _int to judge)."""
    try:
        values = np.fromiter(map(int, texts), dtype=np.int64, count=len(texts))
    except (ValueError, OverflowError):  # a bad row somewhere: look at each text
        values = np.array([_plain_int(text) for text in texts], dtype=np.int64)
    values[(values < 0) | (values >= 2**31)] = -1
    return values


def _plain_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        return -1
    return value if 0 <= value < 2**31 else -1  # an int64 array cannot hold any Python int


def _parse_rows(header: list[str], rows: list[list[str]], lines: list[int], form: tuple[str, ...],
                paths: _Paths, table: _Columns) -> dict[int, str]:
    """Add the good rows' columns to `table` (in CSV order); returns CSV line -> problem for the bad ones.

    Column by column, what every row of a clean CSV looks like is checked at once (~1 us a row, against ~20 us
    for _parse_row); rows that fail any check, or have too few or many fields, go through _parse_row, so a bad
    row gets the same message, and a row _parse_row accepts (x0=1.0) the same values, as row by row.
    """
    n, column = len(rows), {name: i for i, name in enumerate(header)}  # last of repeated names, as DictReader
    regular = (np.fromiter(map(len, rows), dtype=np.int64, count=n) == len(header)).tolist()
    fields = list(zip(*(compress(rows, regular) if not all(regular) else rows)))
    m = sum(regular)

    def texts(name: str, strip: bool = True) -> list[str]:
        if name not in column or not fields:  # no row of the chunk has the header's field count
            return [""] * m
        return list(map(str.strip, fields[column[name]])) if strip else fields[column[name]]

    def check(values) -> np.ndarray:
        return np.fromiter(values, dtype=bool, count=m)

    path_text, label_text, split_text = texts("path"), texts("label"), texts("split")
    resolved = {}
    for text in dict.fromkeys(path_text):
        try:
            resolved[text] = paths(text) if text else None
        except ValueError:
            resolved[text] = None
    found = list(map(resolved.get, path_text))
    labels = {text: sys.intern(text) for text in dict.fromkeys(label_text)
              if text and text.lower() != "nan" and guards.label_problem(text) is None}
    split_of = {"": None, "train": "train", "val": "val"}
    split_lower = list(map(str.lower, split_text))
    # A path holding a line break or control character goes to _parse_row, which refuses it: stripped here it
    # would name another file.
    raw_paths = texts("path", strip=False)
    plain = {text: CONTROL_CHARACTERS.search(text) is None for text in dict.fromkeys(raw_paths)}  # once per file
    plain_path = check(map(plain.__getitem__, raw_paths))
    ok = (plain_path & check(map(is_not, found, repeat(None))) & check(map(labels.__contains__, label_text))
          & check(map(split_of.__contains__, split_lower)))
    if form is BOX_COLUMNS:
        x0, y0, x1, y1 = (_plain_ints(texts(c, strip=False)) for c in ("x0", "y0", "x1", "y1"))
        ok &= (x0 >= 0) & (y0 >= 0) & (x1 > x0) & (y1 > y0)
        y0_values, y1_values = y0, y1
    else:
        x0, x1 = _plain_ints(texts("start", strip=False)), _plain_ints(texts("end", strip=False))
        ok &= (x0 >= 0) & (x1 > x0)
        y0_values, y1_values = 0, -1  # the full height
    columns, at = table.chunk(len(rows)), np.flatnonzero(regular)  # at: the regular rows' places in the chunk
    file_code = {text: table.file_code(path) for text, path in resolved.items() if path is not None}
    label_code = {text: table.label_code(label) for text, label in labels.items()}
    split_code = {text: SPLIT_CODES.index(split) for text, split in split_of.items()}

    def codes(code: dict, keys: list[str]) -> np.ndarray:  # -1 where the text is refused (the row is not ok)
        return np.fromiter(map(code.get, keys, repeat(-1)), dtype=np.int32, count=m)

    for name, values in (("x0", x0), ("y0", y0_values), ("x1", x1), ("y1", y1_values),
                         ("file", codes(file_code, path_text)), ("label", codes(label_code, label_text)),
                         ("split", codes(split_code, split_lower))):
        columns[name][at] = values
    columns["line"][:] = lines
    good = np.zeros(len(rows), dtype=bool)
    good[at] = ok
    problems = {}
    for i in np.flatnonzero(~good).tolist():
        record = _record(header, rows[i])
        try:
            crop = _parse_row(record, form, lines[i], paths)
        except ValueError as e:
            problems[lines[i]] = f"{(record.get('path') or '').strip()}: {e}"
            continue
        for name, value in (("file", table.file_code(crop.path)), ("x0", crop.x0), ("y0", crop.y0), ("x1", crop.x1),
                            ("y1", -1 if crop.y1 is None else crop.y1), ("label", table.label_code(crop.label)),
                            ("split", SPLIT_CODES.index(crop.split))):
            columns[name][i] = value
        good[i] = True
    table.keep(columns, good)
    return problems


def require_csv(csv_path: str | Path) -> Path:
    return guards.require_file(csv_path, "dataset.csv")


def _decode(csv_path: Path, data: bytes) -> str:
    """The CSV's text (a leading byte-order mark dropped), or one line naming the first line that is not UTF-8."""
    data = data.removeprefix(codecs.BOM_UTF8)  # as utf-8-sig would, keeping the error's offset in `data`
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{csv_path}: line {line} is not UTF-8 (byte 0x{data[e.start]:02x}): the crop CSV must be "
                        "saved as UTF-8 (in a spreadsheet: CSV UTF-8)") from None


class CropRows(NamedTuple):
    crops: CropTable  # the good rows, in CSV order
    skipped: list[str]  # one line per bad row (on_bad_rows=skip)
    grey: bool  # every good row's file holds one value per pixel (transforms.image_header), from headers alone


def read_crops(
    csv_path: str | Path,
    root: str | Path | None = None,
    on_bad_rows: str = "error",
    allow_outside_root: bool = False,
    content: bytes | None = None,
    level: int = 0,
) -> CropRows:
    """Parse and check every row; returns the good rows, with on_bad_rows=skip one line per bad row, and
    whether all the good rows' files are grey (read in the same header pass as their sizes).
    `content`: the CSV's bytes when the caller read them already (the disk cache keys its file by exactly the
    rows parsed); by default the file is read once here. `level`: the pyramid level crops will be cut from
    (every file must have it); boxes stay level-0 pixels, checked against level 0.

    With on_bad_rows=error, one UserError lists every bad row (the first 20, then a count).
    """
    if on_bad_rows not in BAD_ROW_POLICIES:
        raise UserError(f"dataset.on_bad_rows must be one of {', '.join(BAD_ROW_POLICIES)}, got {on_bad_rows!r}")
    csv_path = require_csv(csv_path)
    root = Path(root) if root is not None else csv_path.parent
    if not root.is_dir():
        raise UserError(f"dataset.root: folder not found: {root.resolve()}")
    data = csv_path.read_bytes() if content is None else content
    # newline="": line breaks inside quoted fields reach the csv module as written, as open(newline="") gives them.
    with io.StringIO(_decode(csv_path, data), newline="") as f, _collector_paused():
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader, [])]
            form = _form(header, csv_path)
            problems, paths = {}, _Paths(root, allow_outside_root)  # problems: CSV line -> what is wrong
            columns = _Columns()
            for rows, lines in _chunks(reader, ROWS_PER_CHUNK):
                problems.update(_parse_rows(header, rows, lines, form, paths, columns))
        except csv.Error as e:  # a field over the csv module's limit (128 KiB): no label or path is that long
            raise UserError(f"{csv_path}: line {reader.line_num}: {e}; is a quote left open, or a field pasted in "
                            "by mistake?") from None
    parsed = columns.table()
    outside, bad_files, grey = _check_files(parsed, level)
    problems.update(bad_files)
    crops = parsed.take(~outside) if outside.any() else parsed
    bad = [f"line {line}: {problem}" for line, problem in sorted(problems.items())]
    if bad and on_bad_rows == "error":
        raise UserError(
            f"{csv_path}: {len(bad)} bad row(s); fix or remove them, or set dataset.on_bad_rows=skip:"
            + problem_list(bad)
        )
    if not crops:
        raise UserError(f"{csv_path}: no usable rows; add one row per example under the header")
    return CropRows(crops, bad, all(grey[path] for path in crops.used_files()))


def _check_files(crops: CropTable, level: int = 0) -> tuple[np.ndarray, dict[int, str], dict[Path, bool]]:
    """Every region must lie inside its file: which rows do not (a mask), CSV line -> problem for each of them,
    and whether each readable file is grey. Sizes and modes come from PIL's header read, the .npy header
    (memory-mapped) or the TIFF's (tiled), so validating a large data set decodes no pixels. The bounds of all
    rows are compared at once; only the rows found outside are looked at one by one, for their messages."""
    sizes: dict[Path, tuple[int, int, int, int] | str] = {}  # level 0's height and width, then the level's
    grey: dict[Path, bool] = {}
    for path in crops.used_files():
        try:
            h, w, grey[path] = image_header(path)
            sizes[path] = (h, w, *(open_regions(path, level).shape if level else (h, w)))
        except FileNotFoundError:
            sizes[path] = "file not found"
        except (*DECODE_ERRORS, UserError) as e:
            sizes[path] = f"unreadable ({decode_problem(e)})"
    known = np.full((len(crops.files), 4), -1, dtype=np.int64)  # (height, width) at 0 and the level, -1 unread
    for code, path in enumerate(crops.files):
        if isinstance(sizes.get(path), tuple):
            known[code] = sizes[path]
    height, width = known[crops.file, :2].T
    y1 = np.where(crops.y1 < 0, height, crops.y1)  # strip form: the full height
    outside = (height < 0) | (crops.x1 > width) | (y1 > height)
    # An image's region is within its file, which PIL already held to max_image_pixels; a .npy or tiled TIFF
    # region is read from a file of any size, so the region itself, as cut from the level, is held to it.
    # (Rows outside their file get a 1-pixel stand-in box: they are reported as outside, not as too large.)
    boxes = np.stack([crops.y0, np.where(outside, crops.y0 + 1, y1), crops.x0,
                      np.where(outside, crops.x0 + 1, crops.x1)], axis=1)
    if level:
        boxes = scale_boxes(boxes, known[crops.file, :2].clip(1).T, known[crops.file, 2:].clip(1).T)
    too_large = ~outside & ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]) > guards.pixel_limit())
    outside |= too_large
    problems = {}
    for i in np.flatnonzero(outside).tolist():
        crop = crops[i]
        size = sizes[crop.path]
        if too_large[i]:
            problems[crop.line] = (f"{crop.path}: region x {crop.x0}..{crop.x1}, y {crop.y0}..{y1[i]} has more "
                                   f"than max_image_pixels={guards.pixel_limit()} pixels: cut it smaller, or raise "
                                   "max_image_pixels=N on the command line if the file is trusted")
        elif isinstance(size, str):
            problems[crop.line] = f"{crop.path}: {size}"
        else:
            problems[crop.line] = (
                f"{crop.path}: region x {crop.x0}..{crop.x1}, y {crop.y0}..{y1[i]} "
                f"is outside the {size[1]}x{size[0]} (width x height) file"
            )
    return outside, problems, grey


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
