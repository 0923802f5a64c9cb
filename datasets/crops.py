"""The crop source: examples are regions of larger images or arrays, listed in a CSV (see crop_csv.py).

Each file is decoded once and all its crops are cut from it (extract), for cache=memory and disk alike;
cache=none cuts one crop per __getitem__ (LazyCrops). The pipeline (datasets/pipeline.py) does the rest.
With dataset.channels=3 and every source grey (decided from the files' headers), memory and disk hold
(N, 1, H, W): the loaders repeat the channel as a view on the training device (datasets.base.ArrayStore).
"""

from __future__ import annotations

import logging
import re
from concurrent.futures import as_completed
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets import demo, pipeline, values
from datasets.base import DataBundle, decode_threads, decoding_pool, problem_list
from datasets.crop_csv import Crop, CropTable, read_crops, require_csv
from datasets.disk_cache import RowWriter
from datasets.regions import FileSource, TILE_CACHE_BYTES, window_reader
from datasets.sources import Items
from datasets.spec import DataSpec
from datasets.transforms import DECODE_ERRORS, image_size, is_array_file
from datasets.values import Scale
from errors import UserError
from progress import progress_bar

log = logging.getLogger(__name__)

# Boxes resized per call: enough to amortise the call, few enough that the copies in flight stay small. A
# call holds its regions about twice (the cut, and the copy interleaving 4 grey crops): 1,000 boxes of 96x96
# px in one call added 44-56 MB to the peak of a 192k-crop grey build on 2 threads (its array: 187.5 MiB),
# so a call takes at most REGION_BYTES_PER_CALL of regions (112 such boxes): 21-23 MB, and no slower;
# 256 kB calls held 14-16 MB but took 1.13x the time.
REGIONS_PER_CALL = 1024
REGION_BYTES_PER_CALL = 2**20
# Each thread holds its decoded source a few times over (the decoder's image, the array, the channel-first
# copy: measured ~1.7x its decoded bytes on 2 cores and ~4x on a 16-core machine, whose 16 threads put a
# 10,000-crop cache=memory build at 2.55x its array). Into memory, the threads' sources together stay within
# this share of the array being filled: a small data set is cut on fewer threads (it is quick anyway) so
# the build stays near its array's bytes, and a large one on every core.
SOURCE_COPIES_PER_THREAD = 3
THREADS_MEMORY_SHARE = 0.15
HEADERS_SAMPLED = 64  # files whose header sizes the source estimate (the largest of them counts)
# Crops of one tiled TIFF per cutting task: 1,024 crops of 64x64 grey take ~4 MB read (all of a task's boxes
# are read before they are resized a size at a time), and a 20,000-crop slide gives 20 tasks to share.
ROWS_PER_PART = 1024


def cut(source: FileSource, crop: Crop, height: int, width: int) -> torch.Tensor:
    """The crop's region of its opened file as uint8 (C, height, width); y1 None = full height (strip form)."""
    return source.region(slice(crop.y0, crop.y1), slice(crop.x0, crop.x1), height, width)


class LazyCrops(Dataset):
    """cache=none: every item decodes its file again (a tiled TIFF: the tiles its box touches); each .npy file's
    value mapping comes from the scan."""

    def __init__(self, crops: CropTable, targets: list[int], spec: DataSpec, scales: dict[Path, Scale]):
        self.crops, self.targets = crops, targets
        self.height, self.width, self.channels, self.level = spec.height, spec.width, spec.channels, spec.level
        self.scales = scales

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        crop = self.crops[index]
        try:  # a tiled file's tiles are decoded by the cut: a damaged one fails there
            source = FileSource(crop.path, self.channels, self.scales.get(crop.path), level=self.level)
            return cut(source, crop, self.height, self.width), self.targets[index]
        except DECODE_ERRORS as e:
            raise UserError(f"crop {index} (CSV line {crop.line}): cannot read {crop.path}: {e}") from e


def extract(crops: CropTable, out: torch.Tensor | RowWriter, desc: str,
            scales: dict[Path, Scale] | None = None, workers: int | None = None, level: int = 0) -> None:
    """Fill out[i] with crop i, decoding each source file once (rows grouped by file); `out` is a tensor or a
    cache file written by rows. .npy values are mapped by `scales` (from the value-range scan; a file without
    one, by its own range); crops are cut from pyramid level `level` of tiled TIFFs (boxes in level-0 pixels).

    A file's boxes are grouped by size and each group is resized in calls of at most REGION_BYTES_PER_CALL
    (transforms.resize_many: the same pixels as cutting them one by one); a grey image is resized as one
    channel, and repeated as it is stored where `out` has 3 channels (a data set mixing grey and colour
    files). A tiled TIFF is never decoded whole: its rows are cut in position order, in parts of
    ROWS_PER_PART that threads share, each part decoding the tiles its boxes touch once and resizing its boxes
    a size at a time (cut_windows). Files and parts are cut on `workers` threads (default decode_threads()),
    each running torch on one thread (base.decoding_pool).
    Headers were checked already; a file whose pixels fail to decode (truncated, corrupt) is listed with
    every other such file in one error at the end.
    """
    _, channels, height, width = out.shape
    # Rows grouped by file (CSV order within each), the files in order of first appearance: index arrays,
    # where a list of Python ints per file held ~36 bytes a row through the whole build.
    order = np.argsort(crops.file, kind="stable")
    codes, starts = np.unique(crops.file[order], return_index=True)
    by_file = sorted(zip(codes.tolist(), np.split(order, starts[1:])), key=lambda code_rows: code_rows[1][0])
    tasks = [task for code, rows in by_file for task in _parts(crops, crops.files[code], rows, level)]

    def cut_file(path: Path, rows: np.ndarray) -> str | None:
        try:
            source = FileSource(path, channels, (scales or {}).get(path), keep_grey=True, level=level)
            if source.windowed:
                cut_windows(source, crops.take(rows), rows, out)
            else:
                cut_whole(source, crops.take(rows), rows, out)
        except DECODE_ERRORS as e:
            return (f"{path}: {e} (CSV line(s) {', '.join(map(str, crops.line[rows[:5]].tolist()))}"
                    f"{', ...' if len(rows) > 5 else ''})")
        return None

    workers = max(1, min(workers or decode_threads(), len(tasks)))
    if isinstance(out, torch.Tensor):  # a cache file streams; its peak does not follow the data set's size
        paths = [crops.files[code] for code, _ in by_file[:HEADERS_SAMPLED]]
        workers = min(workers, _threads_within_memory_share(paths, out.numel(), channels, level))
    with decoding_pool(workers) as pool:
        done = [pool.submit(cut_file, path, rows) for path, rows in tasks]
        for _ in progress_bar(as_completed(done), total=len(done), desc=desc, unit="file"):
            pass
    unreadable = [problem for problem in (d.result() for d in done) if problem is not None]
    if unreadable:
        raise UserError(f"{len(unreadable)} file(s) cannot be decoded; replace them or remove their rows:"
                        + problem_list(unreadable))


def _parts(crops: CropTable, path: Path, rows: np.ndarray, level: int) -> list[tuple[Path, np.ndarray]]:
    """A file's rows as cutting tasks: one for a file decoded whole; a tiled TIFF's rows sorted by position
    (by tile row, then column) and cut in parts of ROWS_PER_PART, so threads share a large slide."""
    reader = window_reader(path, level)
    if reader is None:
        return [(path, rows)]
    tile_row = crops.y0[rows].astype(np.int64) * reader.shape[0] // reader.levels[0][0] // reader.segment[0]
    by_position = rows[np.lexsort((crops.x0[rows], tile_row))]
    return [(path, part) for part in np.split(by_position, range(ROWS_PER_PART, len(rows), ROWS_PER_PART))]


def cut_windows(source: FileSource, crops: CropTable, rows: np.ndarray, out: torch.Tensor | RowWriter) -> None:
    """out[rows[k]] = crop k of a tiled file: read in the order given (the source's tile cache keeps the tiles
    neighbours share), resized a size at a time (FileSource.boxes), written as one block."""
    _, channels, height, width = out.shape
    y1 = np.where(crops.y1 < 0, source.shape[0], crops.y1)  # -1: the full height (strip form)
    boxes = np.stack([crops.y0, y1, crops.x0, crops.x1], axis=1).astype(np.int64)
    put(out, rows, source.boxes(boxes, height, width))


def cut_whole(source: FileSource, crops: CropTable, rows: np.ndarray, out: torch.Tensor | RowWriter) -> None:
    """out[rows[k]] = crop k of a file held whole (decoded, or a memory-mapped .npy), boxes of one size resized
    together."""
    _, channels, height, width = out.shape
    y0, y1, x0, x1 = (column.astype(np.int64) for column in (crops.y0, crops.y1, crops.x0, crops.x1))
    boxes = np.stack([y0, np.where(y1 < 0, source.shape[0], y1), x0, x1], axis=1)  # y1 -1: the full height
    sizes = np.stack([boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]], axis=1)
    unique, group = np.unique(sizes, axis=0, return_inverse=True)
    # A cache file takes a file's crops in one write per run of rows; a tensor takes each batch directly.
    direct = isinstance(out, torch.Tensor)
    block = None if direct else np.empty((len(rows), channels, height, width), dtype=np.uint8)
    source_channels = source.reader.channels
    for g, (h, w) in enumerate(unique.tolist()):
        members = np.flatnonzero(group.reshape(-1) == g)
        # A multiple of 4: grey crops are resized 4 to an image, and a call of any other count copies its
        # regions once more to pad them (transforms.resize_many).
        per_call = 4 * max(1, min(REGIONS_PER_CALL, REGION_BYTES_PER_CALL // (h * w * source_channels)) // 4)
        for part in np.split(members, range(per_call, len(members), per_call)):
            regions = source.regions(boxes[part, 0], boxes[part, 2], h, w, height, width).numpy()
            if direct:
                put(out, rows[part], regions)
            else:
                block[part] = regions
    if not direct:
        put(out, rows, block)


def put(out: torch.Tensor | RowWriter, rows: np.ndarray, values: np.ndarray) -> None:
    """out[rows] = values, a grey (n, 1, H, W) repeated where out has 3 channels. Into a tensor through numpy:
    torch's indexed copy runs on its thread pool, whose threads wait for a free core on a busy machine (3-13 ms
    a call at a load average of 5 on 2 cores, 0.01 ms on one thread: 27 s of a 20,000-crop .npy build)."""
    if isinstance(out, torch.Tensor):
        out.numpy()[rows] = values
    else:
        out[torch.from_numpy(rows)] = torch.from_numpy(values)


def _threads_within_memory_share(paths: list[Path], array_bytes: int, channels: int, level: int) -> int:
    """How many threads' decoded sources fit in THREADS_MEMORY_SHARE of the array they fill (at least one).
    A tiled TIFF is no decoded source: a thread cutting it holds its tile cache (TILE_CACHE_BYTES) whatever
    the image's size, so it does not count."""
    largest = 1
    for path in paths:
        if window_reader(path, level) is not None:
            continue
        try:
            h, w = image_size(path)
        except (*DECODE_ERRORS, UserError):  # reported by the cut itself, with the rest
            continue
        largest = max(largest, h * w * channels)
    return max(1, int(THREADS_MEMORY_SHARE * array_bytes // (SOURCE_COPIES_PER_THREAD * largest)))


INTEGER_LABEL = re.compile(r"-?[0-9]+")


def _classes(labels: list[str]) -> list[str]:
    """Sorted class names; integer labels sort as numbers so '10' comes after '2'."""
    unique = set(labels)
    # ASCII digits only: str.isdigit() accepts '²' and lstrip('-') accepts '--5', which int() then refuses.
    if all(INTEGER_LABEL.fullmatch(label) for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


class CropSource:
    """The rows of a crop CSV as a source (datasets/sources.py): each row an item, its file its group, its
    split column its hint. The key is the CSV's bytes with the root and the settings that decide which rows
    count, so a cached run reads no row."""

    family = "crops"

    def __init__(self, csv: str | None, root: str | None, spec: DataSpec):
        if csv is None:
            self.csv_path, self.root = demo.ensure_demo(), None
        else:
            self.csv_path, self.root = Path(csv), root
        self.spec, self.what = spec, str(self.csv_path)
        self.grey, self.scales = False, {}
        self.content: bytes | None = None  # the CSV's bytes as read by key(): items() parses exactly these
        self.crops: CropTable | None = None

    def key(self) -> tuple[list, bytes]:
        self.content = require_csv(self.csv_path).read_bytes()
        root = Path(self.root) if self.root is not None else self.csv_path.parent
        return [str(root.resolve()), self.spec.on_bad_rows, self.spec.allow_outside_root, self.spec.level], self.content

    def items(self) -> Items:
        self.crops, skipped, self.grey = read_crops(self.csv_path, self.root, self.spec.on_bad_rows,
                                                    self.spec.allow_outside_root, content=self.content,
                                                    level=self.spec.level)
        used = np.unique(self.crops.label)
        classes = _classes([self.crops.labels[code] for code in used.tolist()])
        class_index = {name: i for i, name in enumerate(classes)}
        by_code = np.zeros(len(self.crops.labels), dtype=np.int64)
        by_code[used] = [class_index[self.crops.labels[code]] for code in used.tolist()]
        crops = self.crops
        sizes = np.stack([np.where(crops.y1 < 0, -1, crops.y1 - crops.y0), crops.x1 - crops.x0], axis=1)
        # The table's own split and file columns, not copies: nothing writes to either, and a copy stayed
        # resident through the fill (5 bytes a row, 0.3 MiB of a 64k-crop build's 62.5 MiB array).
        return Items(classes, by_code[crops.label], crops.split, crops.file, skipped, sizes.astype(np.int32, copy=False),
                     [str(path) for path in crops.files], crops.boxes())

    def files(self) -> list[Path]:
        return self.crops.used_files()

    def windows(self) -> dict[Path, np.ndarray]:
        """The regions the rows cut from each .npy file: the value-range scan reads these, not whole files.
        Only .npy rows: images are never scanned, and the regions of a 64k-row PNG CSV took ~0.1 s."""
        arrays = np.fromiter(map(is_array_file, self.crops.files), dtype=bool, count=len(self.crops.files))
        return self.crops.take(arrays[self.crops.file]).windows()

    def fill(self, out: torch.Tensor | RowWriter, indices: np.ndarray) -> None:
        # The whole table as it is: take() would copy its columns (33 bytes a row) for nothing. n increasing
        # indices from 0 to n - 1 are every row in order; checked without an arange beside them (8 bytes a
        # row, allocated after the heap was trimmed, so resident through the fill).
        n = len(indices)
        whole = n == len(self.crops) and (n == 0 or (indices[0] == 0 and indices[-1] == n - 1
                                                     and bool(np.all(indices[1:] > indices[:-1]))))
        extract(self.crops if whole else self.crops.take(indices), out, desc="decoding crops", scales=self.scales,
                level=self.spec.level)

    def per_item(self, indices: np.ndarray, labels: np.ndarray) -> LazyCrops:
        return LazyCrops(self.crops.take(indices), labels.tolist(), self.spec, self.scales)


def build(csv: str | None, root: str | None, *, seed: int, **keys) -> DataBundle:
    """The crop data set (configs/dataset/crops.yaml): `csv` and `root` say where the rows are; every other
    key is a DataSpec field (datasets/spec.py), checked before the CSV is opened."""
    spec = DataSpec(seed=seed, **{"value_range": values.GLOBAL, **keys})
    spec.check()
    return pipeline.build(CropSource(csv, root, spec), spec)
