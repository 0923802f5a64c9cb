"""What a source of items is: the one interface between where examples come from (a crop CSV, class folders,
CIFAR10's pickles, later tiled images) and the pipeline that turns any of them into a DataBundle
(datasets/pipeline.py: checks, split, value scan, cache, normalisation).

A source answers five questions, and nothing else:
  key()        what identifies its items cheaply (a CSV's bytes, a folder's listing), without decoding: with
               the data spec, it names a disk cache (datasets/disk_cache.py);
  items()      which items exist, checked: class, split hint and group (e.g. the source file) per item, the
               file each group stands for, and crops' regions (datasets/splits.py splits by them);
  files()      the files the items read: their sizes and mtimes tell a disk cache it is stale, and the value
               scan reads the .npy ones among them;
  fill(out, indices)  decode items `indices` into out[0..n): uint8 (n, C, H, W), C stored (1 for grey data);
  per_item(indices, labels)  a Dataset decoding one item per __getitem__, for cache=none;
  verify()     (only families with the dataset.verify key) decode every item up front, listing every failure.
Plus `family` (names the cache folder and messages), `what` (names the source in messages), `grey` (set by
items(): every item holds one value per pixel, so stores keep one channel) and `scales` (set by the pipeline
after the value scan: how each .npy file's values become 0..255).

CONTRIBUTING.md ("Adding a source") walks through the smallest real one, datasets/listed.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.splits import SPLIT_HINTS
from datasets.values import Scale

__all__ = ["Items", "Source", "SPLIT_HINTS", "hint_codes"]


@dataclass
class Items:
    """Every item of a source, column by column (one entry per item, in the source's order)."""

    classes: list[str]  # sorted class names; `labels` index them
    labels: np.ndarray  # int64 (n,)
    hints: np.ndarray  # int8 (n,): index into SPLIT_HINTS (no hint, train, val)
    groups: np.ndarray  # int32 (n,): the group an item belongs to (its source file), for a split by group
    skipped: list[str] = field(default_factory=list)  # items left out (dataset.on_bad_rows=skip), one per line
    # int32 (n, 2): (height, width) in source pixels of the region each item is cut from, height -1 for the
    # full height (strip form); None where items are whole files. Its median over the training items is the
    # window predict.py slides by default.
    sizes: np.ndarray | None = None
    group_names: list[str] | None = None  # the file each group id stands for (dataset.group_pattern reads it)
    boxes: np.ndarray | None = None  # int32 (n, 4) crops' x0, y0, x1, y1 in their files (strips: y 0..1)

    def __len__(self) -> int:
        return len(self.labels)


def hint_codes(hints: list[str | None]) -> np.ndarray:
    """Split hints as SPLIT_HINTS codes (int8)."""
    return np.fromiter(map(SPLIT_HINTS.index, hints), dtype=np.int8, count=len(hints))


class Source(Protocol):
    family: str
    what: str
    grey: bool
    scales: dict[Path, Scale]

    def key(self) -> tuple[list, bytes]: ...

    def items(self) -> Items: ...

    def files(self) -> list[Path]: ...

    def fill(self, out: torch.Tensor, indices: np.ndarray) -> None: ...

    def per_item(self, indices: np.ndarray, labels: np.ndarray) -> Dataset: ...

    def verify(self) -> None: ...
