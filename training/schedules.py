"""Learning-rate schedules of our own; torch's (StepLR, CosineAnnealingLR, OneCycleLR) are used as they are."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler


class WarmupCosine(LRScheduler):
    """Linear warmup over the first `warmup` fraction of the run's optimizer steps, then a cosine from the
    optimizer's learning rate down to zero at the last step. Stepped once per optimizer step.

    The rate is a closed form of the step count (`last_epoch` counts steps here), and the schedule's length
    is saved in its state dict, so a resumed run continues the exact curve it started on."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, epochs: int, steps_per_epoch: int, warmup: float,
                 last_epoch: int = -1):
        self.total_steps = epochs * steps_per_epoch
        self.warmup_steps = round(warmup * self.total_steps)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The share of the base learning rate used by optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps  # never 0: the first step already learns
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]
