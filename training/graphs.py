"""One training step captured as a CUDA graph and replayed (`trainer.cuda_graphs`).

The tutorial CNN is tiny: on a GPU one step is a few dozen kernels of microseconds each, so launching
them from Python costs more than running them. A CUDA graph records the whole step once (normalise,
forward, loss, backward, clipping, optimizer step, the weights' average under trainer.ema) and replays it with one launch. What that asks for
(torch's "CUDA Graphs" notes, whole-network capture):

- static tensors: every batch is copied into the same input buffers, and each replay overwrites the same
  loss tensor, so the loss is cloned (on the device, no host sync) before the loop keeps it for its window;
- warm-up steps on a side stream before capture, so lazy set-up (cuDNN/cuBLAS handles and autotuning,
  the optimizer's momentum buffers) happens outside the graph;
- gradients set to None before capture, so backward allocates them from the graph's private memory pool
  and each replay overwrites them instead of adding to them;
- no host sync inside the step and nothing on the CPU that changes between steps: a learning rate is
  baked into the captured kernels as a number, so a new one (a scheduler's epoch step) is captured again;
  fp16's GradScaler (it reads its overflow flag on the host) and DDP are refused (training/speed.py);
- autocast without its weight-cast cache, as torch requires inside graphs.

A batch of another size (an epoch's short last batch) runs as an ordinary step on the same parameters,
gradients and optimizer state, eagerly, so nothing is captured twice for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from training.ema import WeightAverage
from training.step import StepOptions, TrainStep

WARMUP_STEPS = 3  # eager steps on a side stream before the first capture, as torch's examples do


class CudaGraphStep(TrainStep):
    """`step(images, targets) -> loss`: a training step on a uint8 batch, replayed from a CUDA graph for
    batches of `batch_size` items; the returned loss is a detached device tensor of its own. The step is
    TrainStep's own forward/loss/backward/step, recorded."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 normalize: Callable[[torch.Tensor], torch.Tensor], options: StepOptions, device: torch.device,
                 batch_size: int, ema: WeightAverage | None = None):
        if options.amp.scaler is not None:
            raise ValueError("a GradScaler step syncs with the host and cannot be captured")
        super().__init__(model, optimizer, normalize, options, device, ema)
        self.batch_size = batch_size
        self.warmup_left = WARMUP_STEPS
        self.side = torch.cuda.Stream(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captured_settings: list[dict] | None = None
        self.static_images = self.static_targets = self.static_loss = None
        self.captures = 0  # how many times a step was captured (1, plus 1 per learning-rate change)

    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Normalisation, then forward, loss, backward and optimizer step, without zeroing gradients (the caller
        decides how) and without autocast's weight cache (capture requires it off)."""
        return self.forward_backward(self.normalize(images), targets, cache_enabled=False)

    def _settings(self) -> list[dict]:
        """Every value of the optimizer's groups but the parameters: lr, momentum, ... as the graph saw them."""
        return [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if len(targets) != self.batch_size:
            # Set to None, a captured graph's gradients would be replaced by new tensors outside its pool;
            # zeroed in place, this step adds into the very tensors the graph reads.
            self.optimizer.zero_grad(set_to_none=self.graph is None)
            return self._step(images, targets)
        if self.warmup_left:
            self.warmup_left -= 1
            return self._warm_up(images, targets)
        if self.graph is None or self._settings() != self.captured_settings:
            self._capture(images, targets)
        else:
            self.static_images.copy_(images)
            self.static_targets.copy_(targets)
        self.graph.replay()
        return self.static_loss.clone()  # the next replay overwrites static_loss

    def _warm_up(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)  # the batch was made on the current stream
        with torch.cuda.stream(self.side):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._step(images, targets)
        current.wait_stream(self.side)
        # A copy made on the current stream: the side stream's loss is freed here, and the next warm-up
        # step waits for the current stream before it can reuse that memory.
        return loss.clone()

    def _capture(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """Record one step on static copies of this batch; nothing runs until the caller replays it."""
        self.graph = None  # a new learning rate: the old graph and its pool go first
        self.static_images, self.static_targets = images.clone(), targets.clone()
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may allocate host memory while this thread captures.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.static_loss = self._step(self.static_images, self.static_targets)
        self.graph, self.captured_settings = graph, self._settings()
        self.captures += 1


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, normalize: Callable[[torch.Tensor], torch.Tensor],
              options: StepOptions, device: torch.device, batch_size: int, ema: WeightAverage | None = None) -> TrainStep:
    """The step a run trains with: replayed from a CUDA graph for batches of `batch_size` items when
    `options.cuda_graphs`, else eager; `ema` is updated after every optimizer step either way."""
    if options.cuda_graphs:
        return CudaGraphStep(model, optimizer, normalize, options, device, batch_size, ema)
    return TrainStep(model, optimizer, normalize, options, device, ema)
