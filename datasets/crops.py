"""The crop dataset: examples are regions of larger images or arrays, listed in a CSV (see crop_csv.py).

Cache modes (the lesson behind this project: decoding from disk per item starves training):
  none    decode the file and cut the crop on every __getitem__ (for data larger than RAM);
  memory  decode each file once, cut all its crops, hold one uint8 array (N, C, H, W);
  disk    as memory, but the array is written once to a cache file and memory-mapped by later runs
          (datasets/crop_cache.py).
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from datasets import crop_cache, demo
from datasets.base import (
    CACHE_MODES,
    ArrayStore,
    DataBundle,
    InMemoryDataset,
    check_fits_in_memory,
    check_image_keys,
    per_channel,
    problem_list,
    split_indices,
)
from datasets.crop_csv import Crop, read_crops, require_csv
from datasets.transforms import DECODE_ERRORS, FileSource
from errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "crops"


def cut(source: FileSource, crop: Crop, height: int, width: int) -> torch.Tensor:
    """The crop's region of its opened file as uint8 (C, height, width); y1 None = full height (strip form)."""
    return source.region(slice(crop.y0, crop.y1), slice(crop.x0, crop.x1), height, width)


class LazyCrops(Dataset):
    """cache=none: every item decodes its file again. Only .npy scale factors are remembered per file."""

    def __init__(self, crops: list[Crop], targets: list[int], height: int, width: int, channels: int):
        self.crops, self.targets = crops, targets
        self.height, self.width, self.channels = height, width, channels
        self._scalers: dict[Path, object] = {}

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        crop = self.crops[index]
        try:
            source = FileSource(crop.path, self.channels, self._scalers.get(crop.path))
        except DECODE_ERRORS as e:
            raise UserError(f"crop {index} (CSV line {crop.line}): cannot read {crop.path}: {e}") from e
        self._scalers.setdefault(crop.path, source.scale)
        return cut(source, crop, self.height, self.width), self.targets[index]


def extract(crops: list[Crop], out: torch.Tensor, desc: str) -> None:
    """Fill out[i] with crop i, decoding each source file once (rows grouped by file).

    Headers were checked already; a file whose pixels fail to decode (truncated, corrupt) is listed with
    every other such file in one error at the end.
    """
    _, _, height, width = out.shape
    by_file: dict[Path, list[int]] = defaultdict(list)
    for i, crop in enumerate(crops):
        by_file[crop.path].append(i)
    unreadable = []
    for path, rows in tqdm(by_file.items(), desc=desc, unit="file", leave=False):
        try:
            source = FileSource(path, out.shape[1])
        except DECODE_ERRORS as e:
            unreadable.append(f"{path}: {e} (CSV line(s) {', '.join(str(crops[i].line) for i in rows[:5])}"
                              f"{', ...' if len(rows) > 5 else ''})")
            continue
        for i in rows:
            out[i] = cut(source, crops[i], height, width)
    if unreadable:
        raise UserError(f"{len(unreadable)} file(s) cannot be decoded; replace them or remove their rows:"
                        + problem_list(unreadable))


INTEGER_LABEL = re.compile(r"-?[0-9]+")


def _classes(labels: list[str]) -> list[str]:
    """Sorted class names; integer labels sort as numbers so '10' comes after '2'."""
    unique = set(labels)
    # ASCII digits only: str.isdigit() accepts '²' and lstrip('-') accepts '--5', which int() then refuses.
    if all(INTEGER_LABEL.fullmatch(label) for label in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _split(splits: list[str | None], targets: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Rows with a split column keep it; the rest get a seeded, class-stratified split."""
    fixed_train = [i for i, split in enumerate(splits) if split == "train"]
    fixed_val = [i for i, split in enumerate(splits) if split == "val"]
    free = [i for i, split in enumerate(splits) if split is None]
    train, val = fixed_train, fixed_val
    if free:
        free_train, free_val = split_indices([targets[i] for i in free], val_fraction, seed)
        train = sorted(train + [free[i] for i in free_train])
        val = sorted(val + [free[i] for i in free_val])
    if not train or not val:
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
    mean: list[float],
    std: list[float],
    seed: int,
    on_bad_rows: str = "error",
    allow_outside_root: bool = False,
    hflip: bool = False,
) -> DataBundle:
    check_image_keys(width, height, channels, val_fraction)
    if cache not in CACHE_MODES:
        raise UserError(f"dataset.cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
    if csv is None:
        csv_path = demo.ensure_demo()
        root = None
    else:
        csv_path = Path(csv)
    shape = (channels, height, width)
    rows = (on_bad_rows, allow_outside_root)  # which rows count: they change what a cache holds

    started = time.perf_counter()
    images = None
    if cache == "disk":
        cached = _load_or_cache(csv_path, root, shape, Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR, rows)
        images, labels, splits, skipped = cached.images, cached.labels, cached.splits, cached.skipped
    else:
        crops, skipped = read_crops(csv_path, root, *rows)
        labels, splits = [c.label for c in crops], [c.split for c in crops]
        if cache == "memory":
            check_fits_in_memory(len(crops) * int(np.prod(shape)), f"{csv_path} at {width}x{height}x{channels}",
                                 Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR)
            images = torch.empty((len(crops), *shape), dtype=torch.uint8)
            extract(crops, images, desc="decoding crops")
    classes = _classes(labels)
    class_index = {name: i for i, name in enumerate(classes)}
    targets = [class_index[label] for label in labels]
    train, val = _split(splits, targets, val_fraction, seed)

    if images is None:
        def subset(indices):
            return LazyCrops([crops[i] for i in indices], [targets[i] for i in indices], height, width, channels)

        train_set, val_set = subset(train), subset(val)
    else:
        log.info("crops: %d x %s uint8 (%.1f MiB) ready in %.2f s", len(images), shape,
                 images.numel() / 2**20, time.perf_counter() - started)
        store = ArrayStore(images, torch.tensor(targets))
        train_set, val_set = InMemoryDataset(store, train), InMemoryDataset(store, val)

    return DataBundle(
        train=train_set,
        val=val_set,
        classes=classes,
        input_shape=shape,
        mean=per_channel(mean, channels, "dataset.mean"),
        std=per_channel(std, channels, "dataset.std"),
        hflip=hflip,
        skipped=skipped,
    )


def _load_or_cache(csv_path: Path, root: str | None, shape: tuple[int, int, int], cache_dir: Path,
                   rows: tuple[str, bool]) -> crop_cache.CachedCrops:
    """cache=disk: the crops from the cache, or from the CSV and files, cached on the way."""
    root_path = Path(root) if root is not None else csv_path.parent
    manifest = crop_cache.manifest_path(cache_dir, require_csv(csv_path), root_path, shape, rows)
    cached = crop_cache.load(manifest)
    if cached is None:
        with crop_cache.build_lock(manifest):
            # Another run may have built it while this one waited (its damage, if any, was reported above).
            cached = crop_cache.load(manifest, report=False)
            if cached is None:
                log.info("crop cache: writing %s", manifest)
                crops, skipped = read_crops(csv_path, root, *rows)
                return crop_cache.write(manifest, crops, skipped, shape,
                                        lambda out: extract(crops, out, desc="caching crops"))
    log.info("crop cache: reusing %s", manifest)
    return cached
