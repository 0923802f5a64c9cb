"""Whole files listed in a CSV (`path,label[,split]`), each one item: the smallest real source, and the example
CONTRIBUTING.md ("Adding a source") walks through.

Everything after the items is the pipeline's (datasets/pipeline.py): split, value scan, cache=none/memory/disk,
normalisation. This module only says which items exist and how one is decoded.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets import pipeline, values
from datasets.base import DataBundle, fill_items, problem_list
from datasets.regions import FileSource
from datasets.sources import Items, hint_codes
from datasets.spec import DataSpec
from datasets.transforms import DECODE_ERRORS, image_header
from errors import UserError


class ListedFiles:
    """One item per CSV row: the whole file at `path` (relative to the CSV's folder), of class `label`, with
    an optional `split` (train/val) as its hint."""

    family = "listed"

    def __init__(self, csv_path: str, spec: DataSpec):
        self.csv_path, self.spec, self.what = Path(csv_path), spec, str(csv_path)
        self.grey, self.scales = False, {}
        self.paths: list[Path] = []

    def key(self) -> tuple[list, bytes]:
        """The CSV's bytes: a cached run reads nothing else but the files' stats."""
        if not self.csv_path.is_file():
            raise UserError(f"dataset.csv: file not found: {self.csv_path.resolve()}")
        return [str(self.csv_path.parent.resolve())], self.csv_path.read_bytes()

    def items(self) -> Items:
        _, content = self.key()
        rows = list(csv.DictReader(io.StringIO(content.decode())))
        bad = [f"line {n + 2}: {problem}" for n, row in enumerate(rows) if (problem := self._problem(row))]
        if bad:
            raise UserError(f"{self.csv_path}: {len(bad)} bad row(s); fix or remove them:" + problem_list(bad))
        self.paths = [self.csv_path.parent / row["path"] for row in rows]
        classes = sorted({row["label"] for row in rows})
        labels = np.array([classes.index(row["label"]) for row in rows], dtype=np.int64)
        hints = hint_codes([row.get("split") or None for row in rows])
        # Grey only matters where a store could keep one channel of three.
        self.grey = self.spec.channels == 3 and all(image_header(path)[2] for path in self.paths)
        return Items(classes, labels, hints, np.arange(len(rows), dtype=np.int32))

    def _problem(self, row: dict) -> str | None:
        if not row.get("path") or not row.get("label"):
            return "path and label must both be given"
        if row.get("split") not in (None, "", "train", "val"):
            return f"split={row['split']!r} must be train or val (or empty)"
        if not (self.csv_path.parent / row["path"]).is_file():
            return f"{row['path']}: file not found"
        return None

    def files(self) -> list[Path]:
        return self.paths

    def decode(self, index: int, channels: int) -> torch.Tensor:
        """Item `index` as uint8 (channels, height, width): the whole file, resized."""
        path = self.paths[index]
        try:
            source = FileSource(path, channels, self.scales.get(path))
            return source.region(slice(None), slice(None), self.spec.height, self.spec.width)
        except DECODE_ERRORS as e:
            raise UserError(f"item {index}: cannot load {path}: {e}") from e

    def fill(self, out, indices: np.ndarray) -> None:
        channels = out.shape[1]  # 1 where the pipeline stores grey items once
        fill_items(out, indices.tolist(), lambda i: self.decode(i, channels), f"loading {self.csv_path}")

    def per_item(self, indices: np.ndarray, labels: np.ndarray) -> Dataset:
        return ListedItems(self, indices.tolist(), labels.tolist())


class ListedItems(Dataset):
    """cache=none: one file decoded per __getitem__."""

    def __init__(self, source: ListedFiles, indices: list[int], targets: list[int]):
        self.source, self.indices, self.targets = source, indices, targets

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.source.decode(self.indices[i], self.source.spec.channels), self.targets[i]


def build(csv: str, *, seed: int, **keys) -> DataBundle:
    """Every key but `csv` is a DataSpec field (width, height, channels, cache, ...)."""
    spec = DataSpec(seed=seed, **{"value_range": values.GLOBAL, **keys})
    spec.check()
    return pipeline.build(ListedFiles(csv, spec), spec)
