"""Two ways to feed the model, giving the same uint8 batches in the same order for the same seed and epoch.

device      data already in memory is copied to the training device once; each epoch draws a seeded
            permutation and batches are gathered by index as whole tensors (no __getitem__, no collate,
            no workers). The per-item loader's overhead (~0.5 ms per sample here) disappears.
dataloader  torch's DataLoader over any dataset, with workers for data decoded per item.

Both take their order from `epoch_order`: a permutation seeded by (seed + epoch), so an epoch is
reproducible on its own and a resumed run sees the batches an unbroken one would.

Random augmentation is not done here but on whole batches after the loader, on the training device
(training/augment.py), so it is the same in both modes and for any number of workers.
"""

from __future__ import annotations

import math
import os

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datasets.base import InMemoryDataset
from errors import UserError
from training.distributed import local_processes, shard, shard_size

MODES = ("auto", "device", "dataloader")
_WORKER_ERROR = "Caught UserError in DataLoader worker"
_WORKER_DIED = "DataLoader worker (pid"  # torch's words for a worker killed by a signal or exited


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cores_per_process() -> int:
    """This process's share of the machine's cores: all of them, or a torchrun process's part."""
    return max(1, available_cores() // local_processes())


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    """The order of an epoch's items: a seeded permutation, or 0..n-1 without shuffling."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


class DeviceLoader:
    """Whole batches sliced from uint8 data that lives on the training device."""

    num_workers = 0

    def __init__(self, dataset: InMemoryDataset, batch_size: int, shuffle: bool, device: torch.device, seed: int,
                 rank: int = 0, world_size: int = 1, pad: bool = False):
        self.images, self.labels = dataset.store.on(device)
        self.indices = dataset.indices.to(device)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The next iteration yields this epoch's batches, less the first `skip_batches` (a run stopped
        mid-epoch resumes where it stopped)."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch = state["seed"], state["epoch"]

    def __len__(self) -> int:
        items = shard_size(len(self.indices), self.rank, self.world_size, self.pad)
        return math.ceil(items / self.batch_size) - self.skip_batches

    def __iter__(self):
        order = epoch_order(len(self.indices), self.shuffle, self.seed, self.epoch)
        order = self.indices[shard(order, self.rank, self.world_size, self.pad).to(self.indices.device)]
        for start in range(self.skip_batches * self.batch_size, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            yield self.images[batch], self.labels[batch]


class EpochSampler(Sampler[int]):
    """Yields `epoch_order` for the epoch set last."""

    def __init__(self, n: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1, pad: bool = False):
        self.n, self.shuffle, self.seed, self.epoch, self.skip = n, shuffle, seed, 0, 0
        self.rank, self.world_size, self.pad = rank, world_size, pad

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return shard_size(self.n, self.rank, self.world_size, self.pad) - self.skip

    def __iter__(self):
        order = shard(epoch_order(self.n, self.shuffle, self.seed, self.epoch), self.rank, self.world_size, self.pad)
        return iter(order[self.skip :].tolist())


class EpochSeededDataLoader(DataLoader):
    """torch's DataLoader whose order and worker seeds depend only on (seed, epoch)."""

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1,
                 pad: bool = False, **kwargs):
        self.seed, self.epoch, self.skip_batches = seed, 0, 0
        sampler = EpochSampler(len(dataset), shuffle, seed, rank, world_size, pad)
        super().__init__(dataset, sampler=sampler, generator=torch.Generator().manual_seed(seed), **kwargs)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """As DeviceLoader.set_epoch."""
        self.epoch, self.skip_batches = epoch, skip_batches
        self.sampler.set_epoch(epoch, skip_batches * self.batch_size)
        # Workers' base seed is drawn from this generator when the epoch's iterator starts.
        self.generator.manual_seed(self.seed + epoch)

    def state_dict(self) -> dict:
        # The generator needs no saving: set_epoch reseeds it from (seed, epoch), as the order is drawn.
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.seed = self.sampler.seed = state["seed"]
        self.set_epoch(state["epoch"])

    def __iter__(self) -> _EpochBatches:
        return _EpochBatches(super().__iter__())


class _EpochBatches:
    """One epoch of a DataLoader's batches; a worker's UserError comes out as one line."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self) -> _EpochBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            images, labels = next(self.batches)
        except UserError as e:
            raise _without_worker_traceback(e) from e
        except RuntimeError as e:
            if _WORKER_DIED not in str(e):
                raise
            raise UserError(
                f"a DataLoader worker died ({str(e).splitlines()[0].rstrip('. ')}): set loader.num_workers=0 to load "
                "in the main process, or, if it ran out of shared memory (/dev/shm is small in containers), give it "
                "more, e.g. docker run --shm-size=2g"
            ) from None
        return images, labels


def _without_worker_traceback(error: UserError) -> UserError:
    """torch re-raises a worker's exception with the worker's traceback as its message; a user error is
    shown as one line, so keep only the message the worker raised."""
    text = str(error)
    if not text.startswith(_WORKER_ERROR):
        return error
    return UserError(text.rpartition("UserError: ")[2].strip())


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
    return cores_per_process()


def build_loader(
    dataset: Dataset,
    *,
    device: torch.device,
    seed: int,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    mode: str,
    batch_size: int,
    shuffle: bool,
    num_workers: int | str,
    pin_memory: bool | str,
    persistent_workers: bool,
    prefetch_factor: int,
) -> DeviceLoader | EpochSeededDataLoader:
    """The loader for one split; `train=False` never shuffles. Config: configs/loader/.

    Under DDP each rank loads every world_size-th item of the epoch's order; training pads the order so
    all ranks take the same number of steps, validation does not, so every item is scored exactly once."""
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
        return DeviceLoader(dataset, batch_size, shuffle, device, seed, rank, world_size, pad=train)
    workers = resolve_workers(num_workers, dataset)
    if pin_memory == "auto":
        pin_memory = device.type == "cuda"
    if not isinstance(pin_memory, bool):
        raise UserError(f"loader.pin_memory must be auto, true or false, got {pin_memory!r}")
    extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor} if workers else {}
    return EpochSeededDataLoader(
        dataset, seed, shuffle, rank, world_size, train, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory, **extra
    )
