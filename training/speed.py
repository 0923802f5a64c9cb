"""Speed settings: mixed precision, channels_last, torch.compile and cuDNN autotuning.

On this project's 2-core CPU they measured neutral or slower for the tutorial CNN (see DESIGN.md), so
`auto` keeps each of them off on CPU. On CUDA, `auto` turns on bf16 autocast (where the GPU supports
it) with channels_last, whose tensor-core convolutions want NHWC, and cuDNN autotuning; torch.compile
stays opt-in because its start-up (tens of seconds) outweighs the gain on short runs of a small model.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from errors import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Speed:
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    compile: bool
    cudnn_benchmark: bool
    deterministic: bool


def _switch(value, key: str, when_auto: bool) -> bool:
    if value == "auto":
        return when_auto
    if isinstance(value, bool):
        return value
    raise UserError(f"{key} must be auto, true or false, got {value!r}")


def resolve(precision: str, channels_last, compile, deterministic: bool, device: torch.device) -> Speed:
    """Turn the trainer's auto/true/false settings into what this device will use."""
    cuda = device.type == "cuda"
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in PRECISIONS:
        raise UserError(f"trainer.precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return Speed(
        precision=precision,
        channels_last=_switch(channels_last, "trainer.channels_last", when_auto=cuda),
        compile=_switch(compile, "trainer.compile", when_auto=False),
        cudnn_benchmark=cuda and not deterministic,  # autotuning picks kernels by timing: not reproducible
        deterministic=deterministic,
    )


class MixedPrecision:
    """Autocast for the forward pass and, for fp16, a GradScaler so small gradients do not underflow."""

    def __init__(self, precision: str, device: torch.device):
        self.dtype = PRECISIONS[precision]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, model: nn.Module,
                          clip_grad_norm: float | None) -> None:
        if self.scaler is None:
            loss.backward()
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if clip_grad_norm is not None:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        self.scaler.step(optimizer)  # skips the step when the scaled gradients overflowed
        self.scaler.update()

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)


def memory_format(speed: Speed) -> torch.memory_format:
    return torch.channels_last if speed.channels_last else torch.contiguous_format


def prepare(speed: Speed, model: nn.Module) -> nn.Module:
    """Process-wide and layout settings, before DDP wraps the model (compile comes after wrapping)."""
    torch.backends.cudnn.benchmark = speed.cudnn_benchmark
    torch.backends.cudnn.deterministic = speed.deterministic  # no nondeterministic cuDNN kernels either
    return model.to(memory_format=memory_format(speed))
