"""One training epoch and one evaluation pass. No files, no logging: the runner does that. The epoch gets its
step (training/step.py: model, optimizer, precision, clipping, ...) and its plan (training/position.py: which
epoch, from which batch, at which global step) as two values.

Timing is honest: the first trainer.warmup_steps optimizer steps of a run are left out of throughput and
data-wait figures (allocator, cuDNN autotuning, worker start-up), CUDA is synchronised before every
clock read that closes a window, and `.item()` runs only when a window closes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from errors import UserError
from training import distributed, metrics
from training.position import EpochPlan
from training.speed import MixedPrecision
from training.step import FP32, TrainStep


@dataclass
class Window:
    """What a logging window (or a whole epoch) measured."""

    step: int  # global step at the end of the window
    loss: float  # mean training loss over the window's steps
    throughput: float | None  # samples/s, None for a window inside warm-up
    data_wait: float | None  # fraction of the window's wall time spent waiting for the loader


@dataclass
class EpochStats:
    loss: float
    steps: int  # optimizer steps taken in this call
    samples: int  # timed samples (warm-up excluded)
    seconds: float  # wall time of the timed part
    interrupted: bool = False  # stopped early on request (Ctrl-C, a stop signal), at a step boundary
    # An interrupted epoch's losses since its last logging window closed, averaged over ranks: saved with the
    # checkpoint, so the resumed run closes that window with the same mean an unbroken run logs.
    open_window: list[float] = field(default_factory=list)

    @property
    def throughput(self) -> float | None:
        return self.samples / self.seconds if self.seconds > 0 else None


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite: training cannot recover, so the run stops and says where."""


class Normalizer:
    """uint8 (N, C, H, W) on the device -> float32 normalised, as whole-batch ops: (x / 255 - mean) / std,
    folded into one scale and one shift (two passes over the batch instead of four; equal within 1e-7)."""

    def __init__(self, mean: Iterable[float], std: Iterable[float], device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.memory_format = memory_format  # channels_last when the model runs NHWC
        mean = torch.tensor(list(mean), dtype=torch.float64).view(1, -1, 1, 1)
        std = torch.tensor(list(std), dtype=torch.float64).view(1, -1, 1, 1)
        self.scale = (1.0 / (255.0 * std)).float().to(device)
        self.shift = (mean / std).float().to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().mul_(self.scale).sub_(self.shift)
        return x.contiguous(memory_format=self.memory_format)  # a no-op when the batch is already laid out so


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the clock must not stop while kernels are still queued
    return time.perf_counter()


def train_one_epoch(
    step: TrainStep,
    loader,
    plan: EpochPlan,
    on_window: Callable[[Window], None],
    on_step: Callable[[int], None] = lambda step: None,
    should_stop: Callable[[], bool] = lambda: False,
    augment: Callable[[torch.Tensor], torch.Tensor] = lambda images: images,
) -> EpochStats:
    """Train `loader`'s batches, set by the caller to `plan`'s epoch from `plan.first_batch` on, with `step`
    (training.step.TrainStep, or its CUDA-graph form). `augment` takes each uint8 batch on the device, before
    normalisation, and returns the one to train on; `on_step(global_step)` runs after every optimizer step
    (progress bar, per-step learning-rate schedules, mid-epoch checkpoints). Windows close every
    `plan.log_every` batches counted from the epoch's start, at the steps an unbroken run closes them, so a
    resumed run's points continue its curve; the first one closed here includes `plan.carried`, the per-step
    losses of the window an interrupted run left open (EpochStats.open_window)."""
    device = step.device
    step.model.train()
    global_step = plan.start_step
    carried = plan.carried
    epoch_loss = torch.zeros((), device=device)
    epoch_steps = epoch_samples = 0
    epoch_started = None
    window_losses: list[torch.Tensor] = []  # stacked and read once per window: one host sync, exact bad step
    window_samples = 0
    window_wait = 0.0
    window_started = None
    interrupted = False
    batches = iter(loader)
    while True:
        if should_stop():
            interrupted = True
            break
        timed = global_step >= plan.warmup_until
        if timed and window_started is None:
            window_started = _clock(device)
            epoch_started = epoch_started or window_started
        fetch_started = time.perf_counter()
        try:
            images, targets = next(batches)
        except StopIteration:
            break
        # A no-op for the app's loaders, which deliver on the device in the model's channels (training/loaders.py).
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        waited = time.perf_counter() - fetch_started

        loss = step(augment(images), targets)
        global_step += 1
        window_losses.append(loss)
        epoch_loss += loss
        epoch_steps += 1
        if timed:
            window_wait += waited
            window_samples += len(targets)
            epoch_samples += len(targets)
        on_step(global_step)  # a step boundary: the runner may save a checkpoint here (trainer.checkpoint_every)
        if (plan.first_batch + epoch_steps) % plan.log_every == 0:
            window_started = _close_window(global_step, carried, window_losses, window_samples, window_wait,
                                           window_started, device, on_window)
            carried, window_losses = (), []
            window_samples = 0
            window_wait = 0.0
    open_window = []
    if interrupted:  # no partial point: the resumed run closes this window at the step an unbroken run closes it
        open_window = [*carried, *(_mean_over_ranks(window_losses) if window_losses else [])]
    elif window_losses or carried:
        _close_window(global_step, carried, window_losses, window_samples, window_wait, window_started, device,
                      on_window)
    seconds = _clock(device) - epoch_started if epoch_started is not None else 0.0
    # Under DDP every rank took the same steps: the epoch's loss is the ranks' mean, its samples their sum.
    totals = distributed.sum_(torch.stack([epoch_loss / max(epoch_steps, 1), torch.tensor(float(epoch_samples),
                                                                                              device=device)]))
    return EpochStats(loss=totals[0].item() / distributed.world_size(), steps=epoch_steps, samples=int(totals[1]),
                      seconds=seconds, interrupted=interrupted, open_window=open_window)


def _mean_over_ranks(losses: list[torch.Tensor]) -> list[float]:
    """Each step's loss averaged over the DDP ranks (every rank calls this at the same step)."""
    return [v / distributed.world_size() for v in distributed.sum_(torch.stack(losses).float()).tolist()]


def _close_window(step, carried, losses, samples, wait, started, device, on_window) -> float | None:
    """Check and report a window, whose first losses may be `carried` from an interrupted run; returns the clock
    the next window starts from (None while in warm-up). Under DDP all ranks close windows at the same steps, so
    losses are averaged and samples summed here."""
    ranks = distributed.world_size()
    # One all-reduce for the losses, samples and wait; each element is summed on its own, so the losses come out
    # as _mean_over_ranks gives them.
    packed = distributed.sum_(torch.cat([torch.stack(losses).float() if losses else torch.zeros(0, device=device),
                                         torch.tensor([samples, wait], device=device)]))
    *values, samples, wait = packed.tolist()
    values = [*carried, *(v / ranks for v in values)]
    samples, wait = int(samples), wait / ranks
    for offset, value in enumerate(values):
        if not math.isfinite(value):
            raise NonFiniteLoss(
                f"the training loss became {value} at step {step - len(values) + offset + 1}: training stopped and "
                "checkpoints/last.pt keeps the last good epoch; lower optim.lr or optim.weight_decay, or set "
                "optim.clip_grad_norm (e.g. 1.0)"
            )
    loss = sum(values) / len(values)
    if started is None or samples == 0:
        on_window(Window(step, loss, None, None))
        return started
    now = _clock(device)
    elapsed = now - started
    on_window(Window(step, loss, samples / elapsed, min(wait / elapsed, 1.0)))
    return now


@torch.no_grad()
def evaluate(model: nn.Module, loader, normalize: Normalizer, device: torch.device, num_classes: int,
             amp: MixedPrecision = FP32) -> dict:
    """Mean loss, accuracy, per-class accuracy (None for a class with no items), the confusion matrix
    (counts; rows: true class, columns: predicted), per-class precision/recall/F1 and macro-F1
    (training.metrics), the PR-curve histograms (`pr_buckets`) and the highest-loss items (`mistakes`) over
    a loader, summed or merged over DDP ranks' shards."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    buckets = torch.zeros(num_classes, 2, metrics.PR_THRESHOLDS, device=device, dtype=torch.int64)
    mistakes = metrics.Mistakes.empty(device)
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with amp.autocast():
            logits = model(normalize(images)).float()
        losses = nn.functional.cross_entropy(logits, targets, reduction="none")
        loss_sum += losses.sum().double()
        # scatter_add_, not bincount: on CUDA bincount reads its input's maximum on the host, a sync per batch.
        cells = targets * num_classes + logits.argmax(1)
        confusion.scatter_add_(0, cells, torch.ones_like(cells))
        buckets += metrics.pr_buckets(torch.softmax(logits, dim=1), targets)
        mistakes = mistakes.add(images, targets, logits, losses)
    distributed.sum_(loss_sum)
    distributed.sum_(confusion)
    distributed.sum_(buckets)
    confusion = confusion.view(num_classes, num_classes).cpu()
    total = int(confusion.sum())
    per_class = confusion.sum(1).tolist()
    return {
        "loss": loss_sum.item() / max(total, 1),
        "acc": confusion.diagonal().sum().item() / max(total, 1),
        "per_class_acc": [hits / n if n else None for hits, n in zip(confusion.diagonal().tolist(), per_class)],
        "confusion": confusion,
        **metrics.precision_recall_f1(confusion),
        "pr_buckets": buckets.cpu(),
        "mistakes": mistakes.across_ranks(),
    }
