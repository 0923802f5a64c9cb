"""One way from a source and a data spec to the DataBundle the runner trains on, for every family:

  checks -> items (or a disk cache's copy of them) -> split -> value scan -> cache -> normalisation

Cache modes (the lesson behind this project: decoding from disk per item starves training):
  none    the source decodes an item on every __getitem__ (for data larger than RAM);
  memory  every item is decoded once into one uint8 array (N, C, H, W), held in memory;
  disk    as memory, but the array is written once to a cache file keyed by the source and the spec and
          memory-mapped by later runs (datasets/disk_cache.py).
Where every item is grey (decided from the files' headers) and the model takes 3 channels, memory and disk
hold (N, 1, H, W): the loaders repeat the channel as a view on the training device (datasets.base.ArrayStore).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

from datasets import disk_cache, guards, splits, values
from datasets.base import ArrayStore, DataBundle, InMemoryDataset, check_fits_in_memory, per_channel, release_free_heap
from datasets.sources import Source
from datasets.spec import DataSpec
from datasets.transforms import scan_arrays

log = logging.getLogger(__name__)


def build(source: Source, spec: DataSpec) -> DataBundle:
    """The bundle `spec` describes over `source`'s items. `spec.check()` has run (the builders call it before
    they open anything)."""
    started = time.perf_counter()
    value_range = None if spec.value_range is None else values.parse_value_range(spec.value_range)
    images = None
    if spec.cache == "disk":
        cached = _load_or_cache(source, spec, value_range)
        images, items, value_range = cached.images, cached.items, cached.value_range
        guards.check_classes(items.classes, source.what)
        split = _split(items, spec, source.what)
        box_size = median_box(items.sizes, split.train)
    else:
        items = source.items()
        guards.check_classes(items.classes, source.what)  # before anything is scanned or decoded
        value_range = _scan(source, value_range)
        # Split before decoding: items without a training or validation side stop before any is decoded.
        split = _split(items, spec, source.what)
        box_size = median_box(items.sizes, split.train)
        # The regions' sizes and boxes are not held through the decode: 24 bytes an item, 1.5 MiB of a 64k-crop
        # build.
        items = dataclasses.replace(items, sizes=None, boxes=None, group_names=None)
        if spec.cache == "memory":
            images = _in_memory(source, spec, len(items))
        elif spec.verify:
            source.verify()
    train, val = split.train, split.val
    if images is None:
        train_set, val_set = source.per_item(train, items.labels[train]), source.per_item(val, items.labels[val])
    else:
        log.info("%s: %d x %s uint8 (%.1f MiB%s) ready in %.2f s", source.family, len(images),
                 tuple(images.shape[1:]), images.numel() / 2**20,
                 ", grey: repeated to 3 channels on the device" if images.shape[1] < spec.channels else "",
                 time.perf_counter() - started)
        store = ArrayStore(images, torch.from_numpy(items.labels), spec.channels)
        train_set, val_set = InMemoryDataset(store, train), InMemoryDataset(store, val)
    mean, std = values.normalization(spec.mean, spec.std, train_set, spec.channels)
    return DataBundle(
        train=train_set,
        val=val_set,
        classes=items.classes,
        input_shape=spec.shape,
        mean=per_channel(mean, spec.channels, "dataset.mean"),
        std=per_channel(std, spec.channels, "dataset.std"),
        skipped=items.skipped,
        value_range=value_range,
        box_size=box_size,
        split=split.record(spec.split_rule),
    )


def median_box(sizes: np.ndarray | None, train: np.ndarray) -> tuple[int | None, int] | None:
    """The median (height, width) of the training items' regions in source pixels, each side rounded to whole
    pixels; height None where items take their source's full height (strip form); None without regions."""
    if sizes is None or len(train) == 0:
        return None
    chosen = sizes[train]
    height = None if (chosen[:, 0] < 0).any() else max(1, round(float(np.median(chosen[:, 0]))))
    return height, max(1, round(float(np.median(chosen[:, 1]))))


def _split(items, spec: DataSpec, what: str) -> splits.Split:
    """The split, said in the log: which rule and why, and what it left out or leaves overlapping."""
    split = splits.split(items, spec.split_rule, what)
    fold = f", fold {spec.fold} of {spec.folds}" if spec.fold is not None and split.by != "given" else ""
    left_out = (f"; {split.left_out} training item(s) left out for overlapping validation items"
                if split.left_out else "")
    log.info("split: %s (%s%s): %d training, %d validation items%s", split.by, split.reason, fold,
             len(split.train), len(split.val), left_out)
    if split.overlaps:
        log.warning("split_by=row leaves %d training crop(s) overlapping validation crops of the same file, so "
                    "validation accuracy will read high: split_by=auto, file or region keeps them apart",
                    split.overlaps)
    return split


def stored_shape(spec: DataSpec, grey: bool) -> tuple[int, int, int]:
    """What a store holds per item for the model's (C, H, W): one channel where every item is grey (1 or 3
    channels seen, the pixels are the same), else C."""
    return (1 if grey else spec.channels, spec.height, spec.width)


def _scan(source: Source, value_range):
    """The value-range setting resolved over the source's .npy files (global: one scan of every file), set
    on the source before any item is decoded; None where the family has no value range (images)."""
    if value_range is None:
        return None
    # A source that cuts regions (crops) names them: only those windows of a large .npy are read.
    windows = source.windows() if hasattr(source, "windows") else None
    source.scales, resolved = scan_arrays(source.files(), value_range, windows)
    return resolved


def _in_memory(source: Source, spec: DataSpec, n: int) -> torch.Tensor:
    stored = stored_shape(spec, source.grey)
    check_fits_in_memory(n * int(np.prod(stored)), f"{source.what} at {spec.width}x{spec.height}x{stored[0]}",
                         spec.cache_folder(source.family))
    release_free_heap()  # what reading the items freed, before the array and the threads filling it
    images = torch.empty((n, *stored), dtype=torch.uint8)
    source.fill(images, np.arange(n))
    return images


def _load_or_cache(source: Source, spec: DataSpec, value_range) -> disk_cache.Cached:
    """cache=disk: the items from the cache, or from the source, cached on the way. The cache is keyed by
    the value-range setting too; a global range found by the scan is stored with it."""
    folder, what = spec.cache_folder(source.family), f"{source.family} cache"
    if source.family == "crops":
        what = "crop cache"  # as it was named before every family had one: logs and scripts grep for it
    while True:
        key = source.key()
        manifest = disk_cache.manifest_path(folder, source.family, key, spec.shape, value_range)
        cached = disk_cache.load(manifest, what)
        if cached is None and isinstance(value_range, tuple):
            # A resumed run or evaluate.py pins the range a `global` run found; that run's cache holds exactly
            # it, so a restart after a kill maps it instead of decoding every item again.
            found = disk_cache.load(disk_cache.manifest_path(folder, source.family, key, spec.shape, values.GLOBAL),
                                    what, report=False)
            if found is not None and tuple(found.value_range) == tuple(value_range):
                cached = found
        if cached is not None:
            break
        with disk_cache.build_lock(manifest, what):
            # The source may have changed while this run waited for the lock: the cache is built from what its
            # key was made of, or keyed again, so a cache never holds other items than its key's.
            if source.key() == key:
                # Another run may have built it while this one waited (its damage, if any, was reported above).
                cached = disk_cache.load(manifest, what, report=False)
                if cached is not None:
                    break
                log.info("%s: writing %s", what, manifest)
                items = source.items()
                resolved = _scan(source, value_range)
                contents = disk_cache.Contents(items, source.files(), stored_shape(spec, source.grey), resolved)
                return disk_cache.write(manifest, what, contents, lambda out: source.fill(out, np.arange(len(items))))
        log.info("%s: %s changed while this run waited for %s; looking its cache up again", what, source.what,
                 manifest)
    log.info("%s: reusing %s", what, manifest)
    return cached
