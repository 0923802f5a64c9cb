"""What every dataset family hands the runner, and the pieces the families share."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from errors import UserError


CACHE_MODES = ("none", "memory", "disk")
MAX_REPORTED = 20  # problems listed in one error; the rest are counted
MATERIALIZE_CHUNK = 64  # items per task handed to a decoding thread: few enough tasks, small enough to share out


@dataclass
class DataBundle:
    """Train and validation sets of uint8 (C, H, W) images, with what the runner needs to use them."""

    train: Dataset
    val: Dataset
    classes: list[str]
    input_shape: tuple[int, int, int]  # (C, H, W) of every item
    mean: tuple[float, ...]  # per channel, in [0, 1] units (applied after dividing by 255)
    std: tuple[float, ...]
    hflip: bool = False  # the loader mirrors a seeded random half of each training batch (training/loaders.py)
    skipped: list[str] = field(default_factory=list)  # bad rows left out (dataset.on_bad_rows=skip), one per line


class ArrayStore:
    """One uint8 array (N, C, H, W) with its labels, shared by the splits that index into it.

    A device loader asks for it on its device; the copy is made once and shared by train and val.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.to(torch.int64)
        self._copies: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.images)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._copies:
            self._copies[key] = (self.images.to(device), self.labels.to(device))
        return self._copies[key]


class InMemoryDataset(Dataset):
    """A split of an ArrayStore: items are views, and a loader can gather whole batches by index."""

    def __init__(self, store: ArrayStore, indices=None):
        self.store = store
        self.indices = torch.arange(len(store)) if indices is None else torch.as_tensor(indices, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[index])
        return self.store.images[j], int(self.store.labels[j])


def per_channel(values: Sequence[float], channels: int, key: str) -> tuple[float, ...]:
    """Broadcast a mean/std given for one channel to all; refuse a list of the wrong length."""
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise UserError(f"{key} has {len(values)} values but the data has {channels} channels: give 1 or {channels}")
    return values


def problem_list(problems: Sequence[str]) -> str:
    """Every problem on its own indented line, the first MAX_REPORTED of them, then how many more."""
    shown = "\n  ".join(problems[:MAX_REPORTED])
    more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    return f"\n  {shown}{more}"


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"dataset.val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")


def check_image_keys(width: int, height: int, channels: int, val_fraction: float) -> None:
    """The keys every file-based family shares, checked before any file is opened."""
    if channels not in (1, 3):
        raise UserError(f"dataset.channels must be 1 or 3, got {channels}")
    if width <= 0 or height <= 0:
        raise UserError(f"dataset.width and dataset.height must be positive, got {width}x{height}")
    # Checked even when the data brings its own split, so a typo never waits for the data that would use it.
    check_val_fraction(val_fraction)


def split_indices(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split, stratified by class so small classes appear in both parts; returns sorted indices."""
    check_val_fraction(val_fraction)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        # A class with one item trains on it; otherwise at least one item on each side.
        n_val = 0 if len(members) == 1 else min(max(1, round(len(members) * val_fraction)), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def check_fits_in_memory(n_bytes: int, what: str) -> None:
    """Refuse to hold more than half the available RAM: a clear error beats the OOM killer."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not every platform reports it; then trust the user
        return
    if n_bytes > available // 2:
        raise UserError(
            f"{what} needs {n_bytes / 2**30:.1f} GiB in memory but only {available / 2**30:.1f} GiB is available: "
            "set dataset.cache=none to read from disk per item"
        )


def decode_threads() -> int:
    """Threads for decoding files: this process's share of the cores. PIL's decoders, numpy's copies and torch's
    resize release the GIL, and threads start at once, where a pool of processes took ~5 s (each imports torch)."""
    # Imported here: importing the training package at module level costs ~0.6 s (TensorBoard, OmegaConf) to
    # every user of datasets; a run has imported it by the time it builds data.
    from training.loaders import cores_per_process

    return cores_per_process()


def materialize(dataset: Dataset, shape: tuple[int, int, int], desc: str, workers: int | None = None) -> InMemoryDataset:
    """Decode every item of a per-item dataset once into one preallocated uint8 array, on `workers` threads
    (default decode_threads()); every item that fails to load is listed in one error, in index order, so this
    doubles as an up-front check of every file."""
    n = len(dataset)
    check_fits_in_memory(n * int(np.prod(shape)), desc)
    images = torch.empty((n, *shape), dtype=torch.uint8)
    labels = torch.empty(n, dtype=torch.int64)

    def load(chunk: range) -> list[str]:
        problems = []
        for i in chunk:
            try:
                images[i], labels[i] = dataset[i]
            except UserError as e:
                problems.append(str(e))
        return problems

    chunks = [range(start, min(start + MATERIALIZE_CHUNK, n)) for start in range(0, n, MATERIALIZE_CHUNK)]
    with ThreadPoolExecutor(max_workers=workers or decode_threads()) as pool:
        done = tqdm(pool.map(load, chunks), total=len(chunks), desc=desc, unit="chunk", leave=False)
        problems = [problem for chunk_problems in done for problem in chunk_problems]
    if problems:
        raise UserError(f"{desc}: {len(problems)} item(s) cannot be loaded; replace or remove them:"
                        + problem_list(problems))
    return InMemoryDataset(ArrayStore(images, labels))
