"""torch.distributed under torchrun: which process this is, the process group, and the few collectives we use.

`torchrun --nproc_per_node=N train.py ...` sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is a
single process and every helper here is a no-op. Rank 0 alone writes files; every rank trains on its
shard of each epoch's permutation, and metrics are summed across ranks before anyone logs them.
"""

from __future__ import annotations

import math
from datetime import timedelta

import torch
import torch.distributed as dist

from cores import local_processes
from errors import UserError
from training.launch import Process


def process_device(process: Process, device: torch.device, gpus: int) -> torch.device:
    """The device this process trains on: under torchrun with CUDA, the GPU numbered by its local rank (as
    torchrun lays them out), of the `gpus` visible; otherwise `device` itself."""
    if not process.distributed or device.type != "cuda":
        return device
    if process.local_rank >= gpus:  # torch's own words would be "invalid device ordinal", from deep inside
        raise UserError(f"torchrun started {local_processes()} processes on this machine but only {gpus} GPU(s) are "
                        f"visible (process {process.local_rank} has none): use --nproc_per_node={gpus} or fewer, "
                        "or trainer.device=cpu")
    return torch.device("cuda", process.local_rank)


def timeout(minutes: float) -> timedelta:
    """How long a collective may wait for the slowest rank before the run is aborted."""
    if not minutes > 0:
        raise UserError(f"trainer.dist_timeout_minutes must be a positive number of minutes, got {minutes!r}")
    return timedelta(minutes=minutes)


def init(process: Process, device: torch.device, timeout_minutes: float) -> None:
    """Join the process group: NCCL between GPUs, gloo on CPU. `timeout_minutes` bounds every wait, such as
    the other ranks' wait while rank 0 builds a cache=disk cache (NCCL's own default is 10 minutes)."""
    if not process.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=process.rank, world_size=process.world_size,
                            timeout=timeout(timeout_minutes), device_id=device if device.type == "cuda" else None)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks, in place; returns it for chaining."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def rank0_buffers_(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm's running statistics), in place. DDP hands them out at the
    start of each training forward, after which each rank's own batch moves its copy: at the end of an epoch the
    ranks hold slightly different statistics, and rank 0's are the ones its checkpoint saves."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def max_(value: float, device: torch.device) -> float:
    """The largest value over all ranks (e.g. the slowest rank's wall time)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor(value, device=device, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.item()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def from_main(value):
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_size(n: int, rank: int, world_size: int, pad: bool) -> int:
    """How many of n items `shard` gives this rank."""
    if pad:
        return math.ceil(n / world_size)
    return len(range(rank, n, world_size))


def shard(order: torch.Tensor, rank: int, world_size: int, pad: bool) -> torch.Tensor:
    """This rank's part of an epoch's order, as DistributedSampler does: every world_size-th item from rank.

    With pad=True (training) the order is first extended by wrapping around, so every rank takes the same
    number of steps and DDP's gradient all-reduce never waits for a rank that has run out of data.
    """
    if world_size == 1:
        return order
    if pad and len(order) % world_size:
        extra = world_size - len(order) % world_size
        order = torch.cat([order, order[:extra]])
    return order[rank::world_size]


def gather_objects(value) -> list:
    """Every rank's value of a picklable object (CPU tensors included), in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
