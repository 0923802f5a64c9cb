"""An exponential moving average of the model's weights (`trainer.ema`), the model a run validates and saves.

SGD's last weights sit wherever the last few hundred noisy steps left them; their running average sits near
the middle of that walk and usually scores better (timm's ModelEma, torchvision's references'
`--model-ema`). After every optimizer step, each averaged tensor moves `1 - decay` of the way to the live one:

    average = decay * average + (1 - decay) * weights,   decay = min(trainer.ema, (1 + n) / (10 + n))

where n counts the updates so far. The second term (TensorFlow's ExponentialMovingAverage with num_updates,
timm's EMA warm-up) keeps the average from clinging to the random initial weights over a short run: with
decay 0.999 alone, after 500 steps 61% of the average would still be the initialisation.

BatchNorm's running mean and variance are averaged with the same decay as the weights, not copied from the
live model: they are themselves running averages of batch statistics the live weights produced, and the
averaged weights are a blend of the last ~1/(1 - decay) steps' weights, so the statistics averaged over the
same steps are the ones that match them (timm averages them too). Integer buffers (BatchNorm's
num_batches_tracked) are copied.

The update is one in-place `_foreach_lerp_` over device tensors whose weights are device tensors too, so it
never syncs with the host and is recorded inside a captured CUDA-graph step (training/graphs.py) like the
optimizer step it follows.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """The averaged copy of `model` (`.model`, evaluation mode, no gradients) and `update()`, called after each
    optimizer step; `updates` counts them on the device (saved with checkpoints: a resumed run continues the
    same decay warm-up)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        device = next(model.parameters()).device
        self.updates = torch.zeros((), dtype=torch.float32, device=device)  # exact up to 2**24 updates
        averaged = [*self.model.parameters(), *self.model.buffers()]
        live = [*model.parameters(), *model.buffers()]
        # Pairs by position: the copy has the same parameters and buffers in the same order.
        self._averaged = [a for a, b in zip(averaged, live) if a.is_floating_point()]
        self._live = [b for a, b in zip(averaged, live) if a.is_floating_point()]
        self._copied = [(a, b) for a, b in zip(averaged, live) if not a.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        decay = torch.clamp((1 + self.updates) / (10 + self.updates), max=self.decay)
        weight = 1 - decay
        # The List overload: one weight tensor per pair, read on the device (a tensor given as a Scalar would
        # be read on the host, a sync that a CUDA-graph capture refuses).
        torch._foreach_lerp_(self._averaged, self._live, [weight] * len(self._averaged))
        for averaged, live in self._copied:
            averaged.copy_(live)
        self.updates += 1
