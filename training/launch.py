"""Which process of a torchrun launch this is, read from the variables torchrun sets; nothing else.

Kept apart from training/distributed.py, and free of torch, because train.py and the run-folder callbacks need
it before Hydra composes: `python train.py --help`, `--cfg job` and a refused run folder then answer in
~0.5 s of CPU instead of the ~2 s that importing torch alone costs.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun, even as its only process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Joins a process group and trains under DDP: any torchrun launch, so a one-process launch runs the
        same NCCL/gloo path as a larger one (a one-GPU machine can check it)."""
        return self.world_size > 1 or self.launched


def from_environment() -> Process:
    """The process's place in a torchrun launch, read from the variables torchrun sets."""
    return Process(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        launched="LOCAL_RANK" in os.environ,
    )


def hydra_overrides(process: Process) -> list[str]:
    """Extra Hydra overrides for ranks other than 0: Hydra would give every process its own run dir (the
    timestamps differ), so the others log to stdout only and keep their Hydra files out of outputs/; the
    runner takes rank 0's run dir from rank 0."""
    if process.is_main:
        return []
    scratch = os.path.join(tempfile.gettempdir(), f"trainer-rank{process.rank}")  # stays empty; reused by each run
    return [f"hydra.run.dir={scratch}", "hydra.output_subdir=null", "hydra/job_logging=stdout"]
