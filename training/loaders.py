"""Two ways to feed the model, giving the same uint8 batches in the same order for the same seed and epoch.

device      data already in memory is copied to the training device once; each epoch draws a seeded
            permutation and batches are gathered by index as whole tensors (no __getitem__, no collate,
            no workers). The per-item loader's overhead (~0.5 ms per sample here) disappears.
dataloader  torch's DataLoader over any dataset, with workers for data decoded per item.

Both yield batches on the training device in the model's channels. Grey data held once for a 3-channel
model (datasets.base.ArrayStore) travels as one channel, to the device and in the pinned host batches, and
is expanded there, a view: three times less to copy, and the same batches as data stored three times.

Both take their order from `epoch_order`: a permutation seeded by (seed + epoch), so an epoch is
reproducible on its own and a resumed run sees the batches an unbroken one would. With
`loader.sampler=balanced` the order is instead a seeded draw with replacement that picks every class
equally often (`balanced_order`); DDP sharding and the batches a resumed epoch skips apply to either order
alike.

Random augmentation is not done here but on whole batches after the loader, on the training device
(training/augment.py), so it is the same in both modes and for any number of workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cores import cores_per_process
from datasets.base import InMemoryDataset, labels_of
from errors import UserError
from training.distributed import shard, shard_size

MODES = ("auto", "device", "dataloader")
SAMPLERS = ("uniform", "balanced")
DEVICE_MEMORY_SHARE = 0.8  # of a GPU's free memory the data may take: the rest is for the model, its
# activations, cuDNN workspaces and the allocator's rounding
_WORKER_ERROR = "Caught UserError in DataLoader worker"
_WORKER_DIED = "DataLoader worker (pid"  # torch's words for a worker killed by a signal or exited


@dataclass(frozen=True)
class Shard:
    """This process's part of each epoch's order under DDP: every `world_size`-th item from `rank` on. `pad`
    repeats items so that every rank gets as many (training: all ranks take the same number of steps)."""

    rank: int = 0
    world_size: int = 1
    pad: bool = False

    def of(self, order: torch.Tensor) -> torch.Tensor:
        return shard(order, self.rank, self.world_size, self.pad)

    def size(self, n: int) -> int:
        return shard_size(n, self.rank, self.world_size, self.pad)


@dataclass(frozen=True)
class LoaderSettings:
    """The keys of configs/loader/, as build_loader gets them (checked there)."""

    mode: str  # auto | device | dataloader
    batch_size: int
    shuffle: bool
    num_workers: int | str  # auto or a count
    pin_memory: bool | str  # auto or a bool
    persistent_workers: bool
    prefetch_factor: int
    sampler: str = "uniform"  # the default for checkpoints saved before the key existed


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The order of an epoch's items: a seeded permutation, or 0..n-1 without shuffling; given the items'
    labels (loader.sampler=balanced), a class-balanced draw of n items instead."""
    generator = torch.Generator().manual_seed(seed + epoch)
    if labels is not None:
        return balanced_order(labels, generator)
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)


def balanced_order(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """len(labels) item indices drawn with replacement, each with probability inverse to its class's size:
    a class drawn uniformly among those with items, then an item uniformly within it. Two stages rather
    than one multinomial over items, which torch caps at 2**24 categories."""
    labels = labels.cpu()
    counts = torch.bincount(labels)
    present = torch.nonzero(counts).flatten()
    members = torch.argsort(labels, stable=True)  # item indices grouped by class, in class order
    starts = torch.cumsum(counts, 0) - counts  # where each class's group begins in `members`
    classes = present[torch.randint(len(present), (len(labels),), generator=generator)]
    # An item within its class: a float64 uniform scaled by the class size (one tensor op for every class
    # size; its bias, about size * 2**-53 per item, is nil for any real class).
    within = (torch.rand(len(labels), generator=generator, dtype=torch.float64) * counts[classes]).long()
    return members[starts[classes] + within]


def device_bytes(dataset: InMemoryDataset, device: torch.device, train: bool) -> int:
    """What a DeviceLoader for this split adds to the device: the whole store for training (validation then
    shares it), only its own items for a split scored alone (evaluate.py), nothing when already there. The
    bytes as stored: grey data is expanded to the model's channels batch by batch, as a view."""
    store = dataset.store
    if store.is_on(device):
        return 0
    items = len(store) if train else len(dataset)
    return items * (store.images[0].nbytes + store.labels[0].nbytes)


def choose_device_loader(mode: str, nbytes: int, free_bytes: int | None,
                         device: torch.device) -> tuple[bool, str | None]:
    """For in-memory data: whether to use a DeviceLoader holding `nbytes` on a device with `free_bytes` free
    (None: the CPU, whose memory holds the data already), and the one-line notice of why loader.mode=auto
    falls back to the DataLoader when it does. A forced loader.mode=device that cannot fit fails."""
    if mode == "dataloader":
        return False, None
    if free_bytes is None or nbytes <= DEVICE_MEMORY_SHARE * free_bytes:
        return True, None
    need, free = f"{nbytes / 2**30:.2f} GiB", f"{free_bytes / 2**30:.2f} GiB"
    if mode == "device":
        raise UserError(f"loader.mode=device needs {need} on {device} for the data but only {free} is free: use "
                        "loader.mode=auto or dataloader (batches from pinned host memory), or free the GPU")
    return False, (f"loader.mode=auto: the data ({need}) does not fit in {device}'s free memory ({free}): batches "
                   "come from pinned host memory through the DataLoader instead")


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device; None on the CPU."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


class DeviceLoader:
    """Whole batches sliced from uint8 data that lives on the training device. `len()` is what the next
    iteration yields: `batches_left` of the epoch set last."""

    num_workers = 0
    notice = None  # see EpochSeededDataLoader.notice

    def __init__(self, dataset: InMemoryDataset, batch_size: int, shuffle: bool, device: torch.device, seed: int,
                 part: Shard = Shard(), train: bool = True, balance: torch.Tensor | None = None):
        if train or dataset.store.is_on(device):
            self.images, self.labels = dataset.store.on(device)
            self.indices = dataset.indices.to(device)
        else:  # a split scored alone: copy its items only, not the training split's
            self.images = dataset.store.images[dataset.indices].to(device)
            self.labels = dataset.store.labels[dataset.indices].to(device)
            self.indices = torch.arange(len(dataset), device=device)
        self.expand = dataset.store.expand  # the stored channels to the model's, a view
        self.balance = balance  # the split's labels (CPU) when loader.sampler=balanced
        self.batch_size, self.shuffle, self.seed, self.part = batch_size, shuffle, seed, part
        self.epoch = self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The next iteration yields this epoch's batches, less the first `skip_batches` (a run stopped
        mid-epoch resumes where it stopped)."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch = state["seed"], state["epoch"]

    @property
    def batches_per_epoch(self) -> int:
        """This process's batches in a whole epoch, whatever the epoch set last skips."""
        return math.ceil(self.part.size(len(self.indices)) / self.batch_size)

    @property
    def batches_left(self) -> int:
        """The batches the next iteration yields: the epoch's, less the ones skipped."""
        return max(self.batches_per_epoch - self.skip_batches, 0)

    def __len__(self) -> int:
        return self.batches_left

    def __iter__(self):
        order = epoch_order(len(self.indices), self.shuffle, self.seed, self.epoch, self.balance)
        order = self.indices[self.part.of(order).to(self.indices.device)]
        for start in range(self.skip_batches * self.batch_size, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            yield self.expand(self.images[batch]), self.labels[batch]


class EpochSampler(Sampler[int]):
    """Yields `epoch_order` for the epoch set last."""

    def __init__(self, n: int, shuffle: bool, seed: int, part: Shard = Shard(), balance: torch.Tensor | None = None):
        self.n, self.shuffle, self.seed, self.epoch, self.skip = n, shuffle, seed, 0, 0
        self.part, self.balance = part, balance

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    @property
    def items_per_epoch(self) -> int:
        return self.part.size(self.n)

    def __len__(self) -> int:
        return self.items_per_epoch - self.skip

    def __iter__(self):
        order = self.part.of(epoch_order(self.n, self.shuffle, self.seed, self.epoch, self.balance))
        return iter(order[self.skip :].tolist())


class EpochSeededDataLoader(DataLoader):
    """torch's DataLoader whose order and worker seeds depend only on (seed, epoch). Each batch is copied to
    `device` (non-blocking: from pinned memory when pin_memory is on) and then given to `expand`, which turns
    the channels as stored into the model's (ArrayStore.expand for in-memory data; nothing else by default).
    `len()` is what the next iteration yields: `batches_left` of the epoch set last."""

    notice = None  # why loader.mode=auto chose this loader over the DeviceLoader, for the run's log

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool, part: Shard = Shard(),
                 balance: torch.Tensor | None = None, device: torch.device = torch.device("cpu"),
                 expand: Callable[[torch.Tensor], torch.Tensor] | None = None, **kwargs):
        self.seed, self.epoch, self.skip_batches = seed, 0, 0
        self.device, self.expand = device, expand
        sampler = EpochSampler(len(dataset), shuffle, seed, part, balance)
        super().__init__(dataset, sampler=sampler, generator=torch.Generator().manual_seed(seed), **kwargs)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """As DeviceLoader.set_epoch."""
        self.epoch, self.skip_batches = epoch, skip_batches
        self.sampler.set_epoch(epoch, skip_batches * self.batch_size)
        # Workers' base seed is drawn from this generator when the epoch's iterator starts.
        self.generator.manual_seed(self.seed + epoch)

    @property
    def batches_per_epoch(self) -> int:
        """As DeviceLoader.batches_per_epoch."""
        items = self.sampler.items_per_epoch
        return items // self.batch_size if self.drop_last else math.ceil(items / self.batch_size)

    @property
    def batches_left(self) -> int:
        """As DeviceLoader.batches_left."""
        return max(self.batches_per_epoch - self.skip_batches, 0)

    def __len__(self) -> int:
        return self.batches_left

    def state_dict(self) -> dict:
        # The generator needs no saving: set_epoch reseeds it from (seed, epoch), as the order is drawn.
        return {"seed": self.seed, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.seed = self.sampler.seed = state["seed"]
        self.set_epoch(state["epoch"])

    def __iter__(self) -> _EpochBatches:
        return _EpochBatches(super().__iter__(), self.device, self.expand)


class _EpochBatches:
    """One epoch of a DataLoader's batches on the device; a worker's UserError comes out as one line."""

    def __init__(self, batches, device: torch.device, expand: Callable[[torch.Tensor], torch.Tensor] | None):
        self.batches, self.device, self.expand = batches, device, expand

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
        images = images.to(self.device, non_blocking=True)
        if self.expand is not None:
            images = self.expand(images)
        return images, labels.to(self.device, non_blocking=True)


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


def build_loader(dataset: Dataset, *, device: torch.device, seed: int, train: bool, rank: int = 0, world_size: int = 1,
                 **settings) -> DeviceLoader | EpochSeededDataLoader:
    """The loader for one split; `train=False` never shuffles nor balances. Config: configs/loader/.

    Under DDP each rank loads every world_size-th item of the epoch's order; training pads the order so
    all ranks take the same number of steps, validation does not, so every item is scored exactly once.
    `settings`: the keys of configs/loader/ one by one, as the config's partial passes them (LoaderSettings)."""
    settings = LoaderSettings(**settings)
    mode, batch_size, shuffle, sampler = settings.mode, settings.batch_size, settings.shuffle, settings.sampler
    if mode not in MODES:
        raise UserError(f"loader.mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise UserError(f"loader.batch_size must be a positive integer, got {batch_size!r}")
    if sampler not in SAMPLERS:
        raise UserError(f"loader.sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if sampler == "balanced" and train and not shuffle:
        raise UserError("loader.sampler=balanced draws a random order each epoch: set loader.shuffle=true with it")
    # The labels are read before any item is decoded (datasets.base.labels_of).
    balance = labels_of(dataset) if sampler == "balanced" and train else None
    shuffle = shuffle and train
    in_memory = isinstance(dataset, InMemoryDataset)
    if mode == "device" and not in_memory:
        raise UserError(
            "loader.mode=device needs data held in memory: set dataset.cache=memory (or disk for crops), "
            "or use loader.mode=dataloader"
        )
    notice = None
    if in_memory:
        on_device, notice = choose_device_loader(mode, device_bytes(dataset, device, train), free_memory(device),
                                                 device)
        if on_device:
            return DeviceLoader(dataset, batch_size, shuffle, device, seed, Shard(rank, world_size, pad=train),
                                train=train, balance=balance)
    workers = resolve_workers(settings.num_workers, dataset)
    expand = None
    if in_memory:  # batched as stored (one channel for grey data), expanded on the device after the copy
        dataset, expand = dataset.stored(), dataset.store.expand
    pin_memory = settings.pin_memory
    if pin_memory == "auto":
        pin_memory = device.type == "cuda"
    if not isinstance(pin_memory, bool):
        raise UserError(f"loader.pin_memory must be auto, true or false, got {pin_memory!r}")
    extra = ({"persistent_workers": settings.persistent_workers, "prefetch_factor": settings.prefetch_factor}
             if workers else {})
    loader = EpochSeededDataLoader(dataset, seed, shuffle, Shard(rank, world_size, pad=train), balance, device=device,
                                   expand=expand, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                                   **extra)
    loader.notice = notice
    return loader
