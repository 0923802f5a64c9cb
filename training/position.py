"""Where training stands (`Position`, what a checkpoint saves) and what one epoch will do (`EpochPlan`).

A run stopped mid-epoch (Ctrl-C, trainer.checkpoint_every) resumes exactly: the loader skips the batches
already trained, the augmentation continues at the next batch's draws, the optimizer steps and the logging
windows carry on at the numbers an unbroken run has. All of that follows from one plan per epoch, made from
the position by the runner, rather than from an epoch, a skip, a start step and a warm-up end handed
separately to each piece.

Two counts that are easy to mix up have their own names: `batches_per_epoch`, the whole epoch's batches
(what a per-step learning-rate schedule spans), and `batches_left`, those a resumed epoch still has to train.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Position:
    """Where training stands: `epoch` epochs done, then `batches_done` batches of the next one (non-zero after
    a Ctrl-C or a trainer.checkpoint_every save mid-epoch); `step` counts optimizer steps over the whole run.
    `window`: after a stop, the per-step losses of the logging window it left open (loop.EpochStats.open_window)."""

    epoch: int = 0
    batches_done: int = 0
    step: int = 0
    window: tuple[float, ...] = ()

    def next_epoch(self) -> Position:
        """The position once this epoch is over (trained and validated)."""
        return Position(self.epoch + 1, 0, self.step)


@dataclass(frozen=True)
class EpochPlan:
    """One epoch of training, from `first_batch` on (0 unless the run resumes inside this epoch)."""

    epoch: int  # which epoch, counted from 0
    first_batch: int  # batches of this epoch trained before: the loader skips them, augmentation draws on from there
    start_step: int  # optimizer steps of the whole run before this epoch's first step here
    batches_per_epoch: int  # the whole epoch's batches for this process
    # Steps below this global step are left out of throughput and data-wait (allocator, autotuning, worker
    # start-up; per process: a resumed run warms up again).
    warmup_until: int
    log_every: int  # trainer.log_every: windows close every this many batches, counted from the epoch's start
    carried: tuple[float, ...] = ()  # the open window's losses a stopped run saved (Position.window)

    @classmethod
    def at(cls, position: Position, batches_per_epoch: int, warmup_until: int, log_every: int) -> EpochPlan:
        """The plan of the epoch `position` stands in."""
        return cls(position.epoch, position.batches_done, position.step, batches_per_epoch, warmup_until, log_every,
                   position.window)

    @property
    def batches_left(self) -> int:
        return max(self.batches_per_epoch - self.first_batch, 0)

    def position_after(self, steps: int, window: tuple[float, ...] = ()) -> Position:
        """Where training stands after `steps` steps of this plan; `window`: the losses of a window a stop left open."""
        return Position(self.epoch, self.first_batch + steps, self.start_step + steps, window)


def warmup_end(start: Position, warmup_steps: int, batches_per_epoch: int) -> int:
    """The global step from which a run that starts at `start` times its steps: `warmup_steps` (trainer.warmup_steps)
    later, but never a whole epoch, so that every epoch is timed."""
    return start.step + min(warmup_steps, max(batches_per_epoch - 1, 0))
