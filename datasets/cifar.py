"""CIFAR10 through torchvision as a source; its test split is the validation set.

torchvision decodes all 60k images into memory as uint8 (N, 32, 32, 3) when it opens the files; the
pipeline copies them channels first into its store (cache=memory), or into a disk cache that later runs
map without unpickling anything (cache=disk).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets as tv
from torchvision.datasets.utils import check_integrity

from datasets import pipeline
from datasets.base import ArrayStore, DataBundle, InMemoryDataset
from datasets.disk_cache import RowWriter
from datasets.sources import Items, hint_codes
from datasets.spec import DataSpec
from errors import UserError

LAYOUT = "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}"
COPY_ROWS = 4096  # images copied at once by fill: 12 MiB of temporary


def _bad_files(root: str) -> list[str]:
    """Which of CIFAR10's files are missing or fail their MD5: torchvision's message does not say."""
    folder = Path(root) / tv.CIFAR10.base_folder
    expected = [*tv.CIFAR10.train_list, *tv.CIFAR10.test_list, [tv.CIFAR10.meta["filename"], tv.CIFAR10.meta["md5"]]]
    bad = []
    for name, md5 in expected:
        if not (folder / name).is_file():
            bad.append(f"{name} missing")
        elif not check_integrity(str(folder / name), md5):
            bad.append(f"{name} corrupt (MD5 mismatch)")
    return bad


def _split(root: str, train: bool, download: bool) -> tv.CIFAR10:
    try:
        return tv.CIFAR10(root, train=train, download=download)
    except RuntimeError as e:
        hint = "set dataset.download=true to fetch it" if not download else "check the files or delete them and retry"
        bad = _bad_files(root)
        which = f" [{', '.join(bad)}]" if bad else ""
        raise UserError(f"CIFAR10 at {root}: {e}{which} (expected {root}/{LAYOUT}); {hint}") from e
    except OSError as e:  # a download that cannot reach the server
        raise UserError(
            f"CIFAR10: could not download to {root} ({e}); place {tv.CIFAR10.filename} there or its "
            f"extracted {LAYOUT}, then set dataset.download=false"
        ) from e


class CifarSource:
    """CIFAR10's 50k training and 10k test images as a source (datasets/sources.py): the test split is the
    validation set (every item carries its split as a hint), each batch file a group. torchvision holds the
    decoded pixels as (N, 32, 32, 3); fill copies the rows asked for, channels first."""

    family = "cifar10"
    grey = False

    def __init__(self, root: str, download: bool):
        self.root, self.download, self.what = root, download, f"CIFAR10 at {root}"
        self.scales = {}
        self.splits: list[tv.CIFAR10] = []

    def key(self) -> tuple[list, bytes]:
        return [str(Path(self.root).resolve())], b""

    def items(self) -> Items:
        # The first call downloads everything if asked to.
        self.splits = [_split(self.root, True, self.download), _split(self.root, False, False)]
        labels = np.concatenate([np.asarray(split.targets, dtype=np.int64) for split in self.splits])
        sizes = [len(split.targets) for split in self.splits]
        hints = hint_codes([name for name, n in zip(("train", "val"), sizes) for _ in range(n)])
        # Each training batch file holds 10k items in order (the test file 10k more): its group.
        groups = (np.arange(len(labels)) // max(1, sizes[0] // len(tv.CIFAR10.train_list))).astype(np.int32)
        return Items(list(self.splits[0].classes), labels, hints, groups)

    def files(self) -> list[Path]:
        folder = Path(self.root) / tv.CIFAR10.base_folder
        return [folder / name for name, _ in [*tv.CIFAR10.train_list, *tv.CIFAR10.test_list]]

    def _parts(self, indices: np.ndarray):
        """(positions in `indices`, the split's data, its rows) for each split `indices` reaches."""
        offset = 0
        for split in self.splits:
            here = np.flatnonzero((indices >= offset) & (indices < offset + len(split.data)))
            if len(here):
                yield here, split.data, indices[here] - offset
            offset += len(split.data)

    def fill(self, out: torch.Tensor | RowWriter, indices: np.ndarray) -> None:
        for here, data, rows in self._parts(indices):
            for start in range(0, len(here), COPY_ROWS):  # a bounded temporary, not a second data set
                part = slice(start, start + COPY_ROWS)
                out[torch.from_numpy(here[part])] = torch.from_numpy(data[rows[part]]).permute(0, 3, 1, 2)

    def per_item(self, indices: np.ndarray, labels: np.ndarray) -> Dataset:
        """cache=none: the images as torchvision holds them, viewed channels first (no copy) where the items
        come from one split, as every CIFAR10 split does."""
        parts = list(self._parts(indices))
        if len(parts) == 1 and len(parts[0][0]) == len(indices):
            _, data, rows = parts[0]
            store = ArrayStore(torch.from_numpy(data).permute(0, 3, 1, 2), torch.zeros(len(data), dtype=torch.int64))
            store.labels[torch.from_numpy(rows)] = torch.from_numpy(labels)
            return InMemoryDataset(store, rows)
        items = torch.empty((len(indices), 3, 32, 32), dtype=torch.uint8)
        self.fill(items, indices)
        return InMemoryDataset(ArrayStore(items, torch.from_numpy(labels)))


def build(root: str, download: bool, *, seed: int, **keys) -> DataBundle:
    """CIFAR10 (configs/dataset/cifar10.yaml): `root` and `download` say where its files are; every other key
    is a DataSpec field. Its size is fixed at 32x32 RGB, and its split too (`seed` draws nothing)."""
    spec = DataSpec(seed=seed, **keys)
    spec.check()
    return pipeline.build(CifarSource(root, download), spec)
