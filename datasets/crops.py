"""The crop dataset: examples are regions of larger images or arrays, listed in a CSV (see crop_csv.py).

Cache modes (the lesson behind this project: decoding from disk per item starves training):
  none    decode the file and cut the crop on every __getitem__ (for data larger than RAM);
  memory  decode each file once, cut all its crops, hold one uint8 array (N, C, H, W);
  disk    as memory, but the array is written once to a cache file and memory-mapped by later runs
          (datasets/crop_cache.py).
With dataset.channels=3 and every source grey (decided from the files' headers), memory and disk hold
(N, 1, H, W): the loaders repeat the channel as a view on the training device (datasets.base.ArrayStore).
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets import crop_cache, demo, values
from datasets.base import (
    CACHE_MODES,
    ArrayStore,
    DataBundle,
    InMemoryDataset,
    check_fits_in_memory,
    check_image_keys,
    decode_threads,
    per_channel,
    problem_list,
    release_free_heap,
    split_indices,
)
from datasets.crop_csv import SPLIT_CODES, Crop, CropTable, read_crops, require_csv
from datasets.transforms import DECODE_ERRORS, FileSource, image_size, scan_arrays
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
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "crops"


def cut(source: FileSource, crop: Crop, height: int, width: int) -> torch.Tensor:
    """The crop's region of its opened file as uint8 (C, height, width); y1 None = full height (strip form)."""
    return source.region(slice(crop.y0, crop.y1), slice(crop.x0, crop.x1), height, width)


class LazyCrops(Dataset):
    """cache=none: every item decodes its file again; each .npy file's value mapping comes from the scan."""

    def __init__(self, crops: CropTable, targets: list[int], height: int, width: int, channels: int,
                 scales: dict[Path, Scale]):
        self.crops, self.targets = crops, targets
        self.height, self.width, self.channels = height, width, channels
        self.scales = scales

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        crop = self.crops[index]
        try:
            source = FileSource(crop.path, self.channels, self.scales.get(crop.path))
        except DECODE_ERRORS as e:
            raise UserError(f"crop {index} (CSV line {crop.line}): cannot read {crop.path}: {e}") from e
        return cut(source, crop, self.height, self.width), self.targets[index]


def extract(crops: CropTable, out: torch.Tensor | crop_cache.RowWriter, desc: str,
            scales: dict[Path, Scale] | None = None, workers: int | None = None) -> None:
    """Fill out[i] with crop i, decoding each source file once (rows grouped by file); `out` is a tensor or a
    cache file written by rows. .npy values are mapped by `scales` (from the value-range scan; a file without
    one, by its own range).

    A file's boxes are grouped by size and each group is resized in calls of at most REGION_BYTES_PER_CALL
    (transforms.resize_many: the same pixels as cutting them one by one); a grey image is resized as one
    channel, and repeated as it is stored where `out` has 3 channels (a data set mixing grey and colour
    files). Files are cut on `workers` threads (default decode_threads()).
    Headers were checked already; a file whose pixels fail to decode (truncated, corrupt) is listed with
    every other such file in one error at the end.
    """
    _, channels, height, width = out.shape
    # Rows grouped by file (CSV order within each), the files in order of first appearance: index arrays,
    # where a list of Python ints per file held ~36 bytes a row through the whole build.
    order = np.argsort(crops.file, kind="stable")
    codes, starts = np.unique(crops.file[order], return_index=True)
    by_file = sorted(zip(codes.tolist(), np.split(order, starts[1:])), key=lambda code_rows: code_rows[1][0])

    def cut_file(path: Path, rows: np.ndarray) -> str | None:
        try:
            source = FileSource(path, channels, (scales or {}).get(path), keep_grey=True)
        except DECODE_ERRORS as e:
            return (f"{path}: {e} (CSV line(s) {', '.join(map(str, crops.line[rows[:5]].tolist()))}"
                    f"{', ...' if len(rows) > 5 else ''})")
        y0, y1, x0, x1 = (column[rows].astype(np.int64) for column in (crops.y0, crops.y1, crops.x0, crops.x1))
        boxes = np.stack([y0, np.where(y1 < 0, source.shape[0], y1), x0, x1], axis=1)  # y1 -1: the full height
        sizes = np.stack([boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]], axis=1)
        unique, group = np.unique(sizes, axis=0, return_inverse=True)
        # A cache file takes a file's crops in one write per run of rows; a tensor takes each batch directly.
        direct = isinstance(out, torch.Tensor)
        block = None if direct else torch.empty((len(rows), channels, height, width), dtype=torch.uint8)
        source_channels = source.array.shape[2] if source.array.ndim == 3 else 1
        for g, (h, w) in enumerate(unique.tolist()):
            members = np.flatnonzero(group.reshape(-1) == g)
            # A multiple of 4: grey crops are resized 4 to an image, and a call of any other count copies its
            # regions once more to pad them (transforms.resize_many).
            per_call = 4 * max(1, min(REGIONS_PER_CALL, REGION_BYTES_PER_CALL // (h * w * source_channels)) // 4)
            for part in np.split(members, range(per_call, len(members), per_call)):
                regions = source.regions(boxes[part, 0], boxes[part, 2], h, w, height, width)
                if direct:
                    out[torch.from_numpy(rows[part])] = regions
                else:
                    block[torch.from_numpy(part)] = regions
        if not direct:
            out[torch.from_numpy(rows)] = block
        return None

    workers = max(1, min(workers or decode_threads(), len(by_file)))
    if isinstance(out, torch.Tensor):  # a cache file streams; its peak does not follow the data set's size
        paths = [crops.files[code] for code, _ in by_file[:HEADERS_SAMPLED]]
        workers = min(workers, _threads_within_memory_share(paths, out.numel(), channels))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = [pool.submit(cut_file, crops.files[code], rows) for code, rows in by_file]
        for _ in progress_bar(as_completed(done), total=len(done), desc=desc, unit="file"):
            pass
    unreadable = [problem for problem in (d.result() for d in done) if problem is not None]
    if unreadable:
        raise UserError(f"{len(unreadable)} file(s) cannot be decoded; replace them or remove their rows:"
                        + problem_list(unreadable))


def _threads_within_memory_share(paths: list[Path], array_bytes: int, channels: int) -> int:
    """How many threads' decoded sources fit in THREADS_MEMORY_SHARE of the array they fill (at least one)."""
    largest = 1
    for path in paths:
        try:
            h, w = image_size(path)
        except DECODE_ERRORS:  # reported by the cut itself, with the rest
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


def _labelled(labels: list[str], splits: list[str | None], val_fraction: float,
              seed: int) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Classes, each row's class index (int64) and the train and val rows, from the rows' labels and splits."""
    classes = _classes(labels)
    class_index = {name: i for i, name in enumerate(classes)}
    targets = np.fromiter(map(class_index.__getitem__, labels), dtype=np.int64, count=len(labels))
    return classes, targets, *_split(splits, targets, val_fraction, seed)


def _split(splits: list[str | None], targets: np.ndarray, val_fraction: float,
           seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a split column keep it; the rest get a seeded, class-stratified split. Sorted row indices."""
    code = np.fromiter(map(SPLIT_CODES.index, splits), dtype=np.int8, count=len(splits))
    train, val, free = (np.flatnonzero(code == SPLIT_CODES.index(split)) for split in ("train", "val", None))
    if len(free):
        free_train, free_val = split_indices(targets[free], val_fraction, seed)
        train, val = np.sort(np.concatenate([train, free[free_train]])), np.sort(np.concatenate([val, free[free_val]]))
    if not len(train) or not len(val):
        raise UserError(
            f"the crop CSV gives {len(train)} training and {len(val)} validation rows: "
            "mark some rows split=val (and train), or leave the split column empty for a seeded split"
        )
    return train, val


def build(
    csv: str | None,
    root: str | None,
    width: int,
    height: int,
    channels: int,
    cache: str,
    cache_dir: str | None,
    val_fraction: float,
    mean: list[float] | str,
    std: list[float] | str,
    seed: int,
    on_bad_rows: str = "error",
    allow_outside_root: bool = False,
    value_range: str | list[float] = values.GLOBAL,
) -> DataBundle:
    check_image_keys(width, height, channels, val_fraction)
    value_range = values.parse_value_range(value_range)
    values.parse_statistic(mean, "dataset.mean"), values.parse_statistic(std, "dataset.std")
    if cache not in CACHE_MODES:
        raise UserError(f"dataset.cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
    if csv is None:
        csv_path = demo.ensure_demo()
        root = None
    else:
        csv_path = Path(csv)
    shape = (channels, height, width)  # what the model sees; a grey data set is stored with one channel
    rows = (on_bad_rows, allow_outside_root)  # which rows count: they change what a cache holds

    started = time.perf_counter()
    images = None
    if cache == "disk":
        cached = _load_or_cache(csv_path, root, shape, Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR, rows,
                                value_range)
        images, skipped, value_range = cached.images, cached.skipped, cached.value_range
        classes, targets, train, val = _labelled(cached.labels, cached.splits, val_fraction, seed)
    else:
        crops, skipped, grey = read_crops(csv_path, root, *rows)
        scales, value_range = scan_arrays(crops.used_files(), value_range)
        # Split before decoding: a CSV without training or validation rows stops before any crop is cut.
        classes, targets, train, val = _labelled(crops.row_labels(), crops.row_splits(), val_fraction, seed)
        if cache == "memory":
            stored = stored_shape(shape, grey)
            check_fits_in_memory(len(crops) * int(np.prod(stored)), f"{csv_path} at {width}x{height}x{stored[0]}",
                                 Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR)
            release_free_heap()  # what parsing the CSV freed, before the array and the threads filling it
            images = torch.empty((len(crops), *stored), dtype=torch.uint8)
            extract(crops, images, desc="decoding crops", scales=scales)

    if images is None:
        def subset(indices):
            return LazyCrops(crops.take(indices), targets[indices].tolist(), height, width, channels, scales)

        train_set, val_set = subset(train), subset(val)
    else:
        log.info("crops: %d x %s uint8 (%.1f MiB%s) ready in %.2f s", len(images), tuple(images.shape[1:]),
                 images.numel() / 2**20, ", grey: repeated to 3 channels on the device" if images.shape[1] < channels
                 else "", time.perf_counter() - started)
        store = ArrayStore(images, torch.from_numpy(targets), channels)
        train_set, val_set = InMemoryDataset(store, train), InMemoryDataset(store, val)

    mean, std = values.normalization(mean, std, train_set, channels)
    return DataBundle(
        train=train_set,
        val=val_set,
        classes=classes,
        input_shape=shape,
        mean=per_channel(mean, channels, "dataset.mean"),
        std=per_channel(std, channels, "dataset.std"),
        skipped=skipped,
        value_range=value_range,
    )


def stored_shape(shape: tuple[int, int, int], grey: bool) -> tuple[int, int, int]:
    """What a cache holds per crop for the model's (C, H, W): one channel where every source is grey (1 or 3
    channels seen, the pixels are the same), else C."""
    channels, height, width = shape
    return (1 if grey else channels, height, width)


def _load_or_cache(csv_path: Path, root: str | None, shape: tuple[int, int, int], cache_dir: Path,
                   rows: tuple[str, bool], value_range: str | tuple[float, float]) -> crop_cache.CachedCrops:
    """cache=disk: the crops from the cache, or from the CSV and files, cached on the way. The cache is
    keyed by the value-range setting too; a global range found by the scan is stored with it."""
    root_path = Path(root) if root is not None else csv_path.parent
    require_csv(csv_path)
    while True:
        content = csv_path.read_bytes()
        manifest = crop_cache.manifest_path(cache_dir, content, root_path, shape, rows, value_range)
        cached = crop_cache.load(manifest)
        if cached is None and isinstance(value_range, tuple):
            # A resumed run or evaluate.py pins the range a `global` run found; that run's cache holds exactly
            # it, so a restart after a kill maps it instead of decoding every crop again.
            found = crop_cache.load(crop_cache.manifest_path(cache_dir, content, root_path, shape, rows, values.GLOBAL),
                                    report=False)
            if found is not None and tuple(found.value_range) == tuple(value_range):
                cached = found
        if cached is not None:
            break
        with crop_cache.build_lock(manifest):
            # The CSV may have been edited while this run waited for the lock: the cache is built from the
            # bytes its key was made of, or keyed again, so a cache never holds other rows than its key's.
            if require_csv(csv_path).read_bytes() == content:
                # Another run may have built it while this one waited (its damage, if any, was reported above).
                cached = crop_cache.load(manifest, report=False)
                if cached is not None:
                    break
                log.info("crop cache: writing %s", manifest)
                crops, skipped, grey = read_crops(csv_path, root, *rows, content=content)
                scales, resolved = scan_arrays(crops.used_files(), value_range)
                return crop_cache.write(manifest, crops, skipped, stored_shape(shape, grey),
                                        lambda out: extract(crops, out, desc="caching crops", scales=scales),
                                        resolved)
        log.info("crop cache: %s changed while this run waited for %s; looking its cache up again", csv_path,
                 manifest)
    log.info("crop cache: reusing %s", manifest)
    return cached
