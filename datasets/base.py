"""What every dataset family hands the runner, and the pieces the families share."""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from cores import cores_per_process
from errors import UserError
from progress import progress_bar

log = logging.getLogger(__name__)

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
    skipped: list[str] = field(default_factory=list)  # bad rows left out (dataset.on_bad_rows=skip), one per line
    # How .npy values became uint8 (datasets/values.py): per_file, or the (low, high) mapped to 0..255 for
    # every file; None where no value range applies (images, CIFAR10). Saved in checkpoints.
    value_range: str | tuple[float, float] | None = None
    # The median (height, width) in source pixels of the training items' regions (height None: the full height,
    # strip form); None where items are whole files. Saved in checkpoints: predict.py's default window.
    box_size: tuple[int | None, int] | None = None
    split: dict | None = None  # how train and val were drawn (datasets/splits.Split.record); saved in checkpoints


class ArrayStore:
    """One uint8 array (N, C, H, W) with its labels, shared by the splits that index into it.

    `channels` is what every item is seen as, the model's C; grey data for a 3-channel model is stored once,
    as (N, 1, H, W), and repeated by `expand` as a view (no copy) where a batch is formed: on the training
    device, after the copy there, so the host memory, the device copy and the transfer hold a third of it.
    A device loader asks for the stored array on its device; the copy is made once and shared by train and val.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, channels: int | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.channels = channels or images.shape[1]
        if images.shape[1] not in (1, self.channels):
            raise ValueError(f"{images.shape[1]} stored channels cannot be seen as {self.channels}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self._copies: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.images)

    @property
    def stored_channels(self) -> int:
        """Channels held per item: 1 for grey data seen as 3, else `channels`."""
        return self.images.shape[1]

    def expand(self, batch: torch.Tensor) -> torch.Tensor:
        """A stored batch (B, stored_channels, H, W) as the model sees it, (B, channels, H, W): a view."""
        return batch.expand(-1, self.channels, -1, -1)

    def is_on(self, device: torch.device) -> bool:
        """Whether a copy on `device` exists already (made by the training split's loader)."""
        return str(device) in self._copies

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored images (not expanded) and the labels on `device`."""
        key = str(device)
        if key not in self._copies:
            self._copies[key] = (self.images.to(device), self.labels.to(device))
        return self._copies[key]


class InMemoryDataset(Dataset):
    """A split of an ArrayStore: items are views (C, H, W) in the model's channels, and a loader can gather
    whole batches by index."""

    def __init__(self, store: ArrayStore, indices=None):
        self.store = store
        self.indices = torch.arange(len(store)) if indices is None else torch.as_tensor(indices, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[index])
        return self.store.images[j].expand(self.store.channels, -1, -1), int(self.store.labels[j])

    def stored(self) -> StoredItems:
        """The same split with its items as stored, for a DataLoader to batch before they are expanded."""
        return StoredItems(self.store, self.indices)


class StoredItems(InMemoryDataset):
    """An in-memory split whose items are as stored, (1, H, W) for grey data seen as 3 channels: what the
    DataLoader batches, pins and copies to the device, where the batch is expanded (ArrayStore.expand)."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[index])
        return self.store.images[j], int(self.store.labels[j])


def labels_of(dataset: Dataset) -> torch.Tensor:
    """Every item's class index (int64, CPU) without decoding any item: from the in-memory labels, a
    per-item dataset's `targets` (LazyCrops, torchvision's folders), or through a Subset's indices."""
    if isinstance(dataset, InMemoryDataset):
        return dataset.store.labels[dataset.indices]
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.int64)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise TypeError(f"{type(dataset).__name__} exposes no labels: give it a `targets` list")
    return torch.as_tensor(targets, dtype=torch.int64)


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


def available_memory() -> int | None:
    """Bytes of RAM free now, or None where the platform does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing), before a large
    allocation. Reading a 192k-row crop CSV and splitting it leave ~13 MB freed but resident in the main
    thread's heap, which the decoding threads (each with a heap of its own) never reuse: handing it back
    lowered that build's peak by ~7 MB, 0.04x of its grey array. Takes well under 1 ms."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # a C library without it (musl)
        pass


def free_disk(folder: Path) -> int:
    """Bytes free on the file system that holds `folder` (or would: its nearest existing parent)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_fits_in_memory(n_bytes: int, what: str, cache_dir: Path | None = None) -> None:
    """Refuse to hold more than half the available RAM: a clear error beats the OOM killer. With `cache_dir`
    (crops), say whether dataset.cache=disk would fit there."""
    available = available_memory()
    if available is None or n_bytes <= available // 2:  # a platform that does not say: trust the user
        return
    works = ("dataset.cache=disk (it fits in the free space of dataset.cache_dir) or dataset.cache=none"
             if cache_dir is not None and n_bytes < free_disk(cache_dir) else "dataset.cache=none to read from disk per item")
    raise UserError(f"{what} needs {n_bytes / 2**30:.1f} GiB in memory but only {available / 2**30:.1f} GiB is "
                    f"available: set {works}, or lower dataset.width/height")


def check_fits_on_disk(n_bytes: int, folder: Path, what: str) -> None:
    """Refuse a disk cache larger than the free space, before writing any of it."""
    free = free_disk(folder)
    if n_bytes < free:
        return
    available = available_memory()
    works = ("dataset.cache=memory (it fits in RAM) or dataset.cache=none"
             if available is not None and n_bytes <= available // 2 else "dataset.cache=none to read from disk per item")
    raise UserError(f"{what} needs {n_bytes / 2**30:.1f} GiB on disk but {folder} has {free / 2**30:.1f} GiB free: "
                    f"set {works}, point dataset.cache_dir at a larger disk, or lower dataset.width/height")


def limit_image_pixels(max_pixels: int) -> None:
    """Refuse images of more than `max_pixels` pixels when their header is read, before decoding: a tiny
    PNG can claim 12000x12000 and decode to ~430 MB. PIL only warns above Image.MAX_IMAGE_PIXELS and refuses
    above twice it; half the limit (a float, so that twice it is exact) makes the refusal start at the limit."""
    if max_pixels < 1:
        raise UserError(f"max_image_pixels must be a positive number of pixels, got {max_pixels}")
    Image.MAX_IMAGE_PIXELS = max_pixels / 2
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # below the limit: fine


def decode_problem(error: Exception) -> str:
    """A decode error as one line; an image over the pixel limit says which key raises it."""
    if isinstance(error, Image.DecompressionBombError):
        return (f"it has more than max_image_pixels={int(2 * Image.MAX_IMAGE_PIXELS)} pixels (a decompression "
                "bomb?): if the file is trusted, raise max_image_pixels=N on the command line")
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def decode_threads() -> int:
    """Threads for decoding files: this process's share of the cores. PIL's decoders, numpy's copies and torch's
    resize release the GIL, and threads start at once, where a pool of processes took ~5 s (each imports torch)."""
    return cores_per_process()


@contextmanager
def decoding_pool(workers: int) -> Iterator[ThreadPoolExecutor]:
    """`workers` decoding threads, each running torch's operations on one thread: the pool already shares the
    cores, and an item's resize or copy is too small to split. With torch's own pool under each thread, its
    threads wait in barriers for a core the other decoders hold: on 2 cores at a load average of 5, a 3-crop
    indexed copy took 3-13 ms instead of 0.01 and a 20,000-crop .npy build 30 s instead of 2.5. Torch's thread
    count is restored afterwards (threads started later, such as training's, use it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # read by each new thread on its first parallel operation
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            yield pool
    finally:
        torch.set_num_threads(before)


def fill_items(out, indices: Sequence[int], load: Callable[[int], torch.Tensor], desc: str,
               workers: int | None = None) -> None:
    """out[k] = load(indices[k]) for every k, in chunks of MATERIALIZE_CHUNK items on `workers` threads
    (default decode_threads()); `out` is a tensor or a cache file written by rows (disk_cache.RowWriter), one
    write per chunk. Every item whose `load` raises a UserError is listed in one error, in index order, so
    this doubles as an up-front check of every file."""
    n = len(indices)
    _, channels, height, width = out.shape

    def load_chunk(start: int) -> list[str]:
        stop = min(start + MATERIALIZE_CHUNK, n)
        block, problems = torch.empty((stop - start, channels, height, width), dtype=torch.uint8), []
        for k in range(start, stop):
            try:
                block[k - start] = load(indices[k])
            except UserError as e:
                problems.append(str(e))
        out[torch.arange(start, stop)] = block
        return problems

    with decoding_pool(workers or decode_threads()) as pool:
        starts = range(0, n, MATERIALIZE_CHUNK)
        done = progress_bar(pool.map(load_chunk, starts), total=len(starts), desc=desc, unit="chunk")
        problems = [problem for chunk_problems in done for problem in chunk_problems]
    if problems:
        raise UserError(f"{desc}: {len(problems)} item(s) cannot be loaded; replace or remove them:"
                        + problem_list(problems))


def materialize(dataset: Dataset, shape: tuple[int, int, int], desc: str, workers: int | None = None) -> InMemoryDataset:
    """Decode every item of a per-item dataset once into one preallocated uint8 array (fill_items)."""
    n = len(dataset)
    check_fits_in_memory(n * int(np.prod(shape)), desc)
    images = torch.empty((n, *shape), dtype=torch.uint8)
    labels = torch.as_tensor(labels_of(dataset), dtype=torch.int64)
    fill_items(images, range(n), lambda i: dataset[i][0], desc, workers)
    return InMemoryDataset(ArrayStore(images, labels))


def check_class_coverage(bundle: DataBundle) -> None:
    """A training split with a single class teaches nothing (its loss is zero from the start): an error. A
    class with validation items but no training items can never be predicted: a warning naming it."""
    present = set(labels_of(bundle.train).tolist())
    if len(present) < 2:
        names = [bundle.classes[i] for i in sorted(present)]
        raise UserError(f"the training split holds only class {names} of {bundle.classes}: a classifier needs "
                        "training items of at least two classes; add them, or check the split column / train/ folder")
    missing = sorted({bundle.classes[i] for i in set(labels_of(bundle.val).tolist()) - present})
    if missing:
        log.warning("class(es) %s have validation items but no training items: the model cannot learn them, and "
                    "their validation accuracy will be 0; give them training rows or files", missing)


def outside_root(paths: Sequence[str], root: Path) -> list[str]:
    """The paths that resolve outside `root` (through a symlinked file or folder). Each folder is resolved
    once and only symlinked files on their own: resolving every path costs ~60 us a file."""
    resolved_root = root.resolve()
    inside: dict[str, bool] = {}
    escaped = []
    for path in paths:
        folder = os.path.dirname(path)
        if folder not in inside:
            inside[folder] = Path(folder).resolve().is_relative_to(resolved_root)
        if not inside[folder] or (os.path.islink(path) and not Path(path).resolve().is_relative_to(resolved_root)):
            escaped.append(path)
    return escaped
