"""The training step: how every optimizer step of a run goes (`StepOptions`, built once from the config) and
the step itself (`TrainStep`): normalise the uint8 batch, forward, loss, backward, clip, optimizer step, and
the weights' moving average when trainer.ema is set (training/ema.py).

One object instead of six loose values (model, optimizer, normalisation, precision, clipping, label
smoothing) handed to the loop on every call: the loop only calls `step(images, targets)`, and the CUDA-graph
step (training/graphs.py) is a TrainStep whose forward/loss/backward/step is the very same method, replayed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from training.ema import WeightAverage
from training.speed import MixedPrecision

FP32 = MixedPrecision("fp32", torch.device("cpu"))  # plain float32 steps: no autocast, no scaler


@dataclass(frozen=True)
class StepOptions:
    """How each training step runs, fixed for a run (the runner builds it once)."""

    amp: MixedPrecision = FP32  # trainer.precision: autocast's dtype, and fp16's GradScaler
    clip_grad_norm: float | None = None  # optim.clip_grad_norm: the gradients' largest global L2 norm; None: no clip
    # trainer.label_smoothing: share of each training target spread over all classes (validation scores the
    # plain loss)
    label_smoothing: float = 0.0
    cuda_graphs: bool = False  # trainer.cuda_graphs as resolved (training/speed.py): replay the step as one graph


class TrainStep:
    """`step(images, targets) -> loss`: one optimizer step on a uint8 batch on the device; the loss comes back
    as a detached device tensor (no host sync). `ema`: the weights' average, updated after each optimizer step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 normalize: Callable[[torch.Tensor], torch.Tensor], options: StepOptions, device: torch.device,
                 ema: WeightAverage | None = None):
        self.model, self.optimizer, self.normalize = model, optimizer, normalize
        self.options, self.device, self.ema = options, device, ema

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.on_inputs(self.normalize(images), targets)

    def on_inputs(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The step on a batch already normalised (floats): the compute-only ceiling of benchmarks/throughput.py."""
        self.optimizer.zero_grad(set_to_none=True)
        return self.forward_backward(inputs, targets)

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, cache_enabled: bool = True) -> torch.Tensor:
        """Forward, loss, backward, optimizer step and the weights' average, without zeroing the gradients, which callers do each in
        their own way (a captured CUDA graph's step also turns off autocast's weight cache, as capture requires)."""
        amp = self.options.amp
        with amp.autocast(cache_enabled=cache_enabled):
            logits = self.model(inputs)
        # The loss in fp32 whatever the forward ran in.
        loss = nn.functional.cross_entropy(logits.float(), targets, label_smoothing=self.options.label_smoothing)
        amp.backward_and_step(loss, self.optimizer, self.model, self.options.clip_grad_norm)
        if self.ema is not None:
            self.ema.update()
        return loss.detach()
