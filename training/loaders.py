"""Two ways to feed the model, giving the same uint8 batches in the same order for the same seed and epoch.

device      data already in memory is copied to the training device once; each epoch draws a seeded
            permutation and batches are gathered by index as whole tensors (no __getitem__, no collate,
            no workers). The per-item loader's overhead (~0.5 ms per sample here) disappears.
dataloader  torch's DataLoader over any dataset, with workers for data decoded per item.

Both take their order from `epoch_order`: a permutation seeded by (seed + epoch), so an epoch is
reproducible on its own and a resumed run sees the batches an unbroken one would.
"""

from __future__ import annotations

import math
import os

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datasets.base import InMemoryDataset
from errors import UserError

MODES = ("auto", "device", "dataloader")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    """The order of an epoch's items: a seeded permutation, or 0..n-1 without shuffling."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


class DeviceLoader:
    """Whole batches sliced from uint8 data that lives on the training device."""

    num_workers = 0

    def __init__(self, dataset: InMemoryDataset, batch_size: int, shuffle: bool, device: torch.device, seed: int):
        self.images, self.labels = dataset.store.on(device)
        self.indices = dataset.indices.to(device)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self):
        order = self.indices[epoch_order(len(self.indices), self.shuffle, self.seed, self.epoch).to(self.indices.device)]
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            yield self.images[batch], self.labels[batch]


class EpochSampler(Sampler[int]):
    """Yields `epoch_order` for the epoch set last."""

    def __init__(self, n: int, shuffle: bool, seed: int):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(epoch_order(self.n, self.shuffle, self.seed, self.epoch).tolist())


class EpochSeededDataLoader(DataLoader):
    """torch's DataLoader whose order and worker seeds depend only on (seed, epoch)."""

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool, **kwargs):
        self.seed = seed
        sampler = EpochSampler(len(dataset), shuffle, seed)
        super().__init__(dataset, sampler=sampler, generator=torch.Generator().manual_seed(seed), **kwargs)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        # Workers' base seed is drawn from this generator when the epoch's iterator starts.
        self.generator.manual_seed(self.seed + epoch)


def resolve_workers(num_workers: int | str, dataset: Dataset) -> int:
    """auto: none for in-memory data (passing batches between processes costs ~3 ms each here); otherwise
    one per core. Decoding dominates per-item data: on 2 cores (benchmarks/throughput.py, crops with
    cache=none, batch 64) 2 workers train at ~400 samples/s, 1 worker or none at ~190; the training step
    then gets one torch thread (training.runner.torch_threads)."""
    if num_workers != "auto":
        if not isinstance(num_workers, int) or num_workers < 0:
            raise UserError(f"loader.num_workers must be auto or an integer >= 0, got {num_workers!r}")
        return num_workers
    if isinstance(dataset, InMemoryDataset):
        return 0
    return available_cores()


def build_loader(
    dataset: Dataset,
    *,
    device: torch.device,
    seed: int,
    train: bool,
    mode: str,
    batch_size: int,
    shuffle: bool,
    num_workers: int | str,
    pin_memory: bool | str,
    persistent_workers: bool,
    prefetch_factor: int,
) -> DeviceLoader | EpochSeededDataLoader:
    """The loader for one split; `train=False` never shuffles. Config: configs/loader/."""
    if mode not in MODES:
        raise UserError(f"loader.mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise UserError(f"loader.batch_size must be a positive integer, got {batch_size!r}")
    shuffle = shuffle and train
    in_memory = isinstance(dataset, InMemoryDataset)
    if mode == "device" and not in_memory:
        raise UserError(
            "loader.mode=device needs data held in memory: set dataset.cache=memory (or disk for crops), "
            "or use loader.mode=dataloader"
        )
    if mode == "device" or (mode == "auto" and in_memory):
        return DeviceLoader(dataset, batch_size, shuffle, device, seed)
    workers = resolve_workers(num_workers, dataset)
    if pin_memory == "auto":
        pin_memory = device.type == "cuda"
    extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor} if workers else {}
    return EpochSeededDataLoader(
        dataset, seed, batch_size=batch_size, shuffle=shuffle, num_workers=workers, pin_memory=pin_memory, **extra
    )
