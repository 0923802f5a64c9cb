"""Speed settings: mixed precision, channels_last, torch.compile and cuDNN autotuning.

On this project's 2-core CPU they measured neutral or slower for the tutorial CNN (docs/performance.md), so
`auto` keeps each of them off on CPU. On CUDA, `auto` picks the autocast precision from the training
device's compute capability (bf16 from Ampere, 8.0, on; fp16 with a GradScaler on Volta and Turing,
7.x, whose tensor cores have no bf16; fp32 before that), turns on channels_last, whose tensor-core
convolutions want NHWC, and cuDNN autotuning. torch.compile stays opt-in because its start-up (tens of
seconds) outweighs the gain on short runs of a small model. CUDA graphs (training/graphs.py) are on under
auto wherever a step can be captured: measured on an H200 (benchmarks/cuda_check.sh, batch 512), replayed
steps trained the tutorial CNN 2.9x (fp32) and 3.8x (bf16) as fast as eager ones, and a 50,000-sample epoch
took 0.061 s against 0.216 s.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
from torch import nn

from errors import UserError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores. torch.cuda.is_bf16_supported() also says yes to
# older cards, where bf16 is emulated (slower than fp32), and it asks the current GPU, not the training one.
FP16_CAPABILITY = (7, 0)  # Volta: fp16 tensor cores; before them fp16 saves memory but not time


@dataclass(frozen=True)
class Speed:
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    compile: bool
    cudnn_benchmark: bool
    deterministic: bool
    cuda_graphs: bool = False
    precision_reason: str = "set by trainer.precision"  # logged, so a run says why it trains in what it does
    cuda_graphs_reason: str = "set by trainer.cuda_graphs"


@dataclass(frozen=True)
class SpeedSettings:
    """The trainer's speed keys as configured (auto/true/false); `resolve` turns them into a Speed."""

    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool | str = "auto"
    compile: bool | str = False
    deterministic: bool = False
    cuda_graphs: bool | str = "auto"

    @classmethod
    def of(cls, trainer) -> SpeedSettings:
        """From the trainer config group (or a mapping with its keys)."""
        return cls(**{field.name: trainer[field.name] for field in fields(cls)})


def _switch(value, key: str, when_auto: bool) -> bool:
    if value == "auto":
        return when_auto
    if isinstance(value, bool):
        return value
    raise UserError(f"{key} must be auto, true or false, got {value!r}")


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The training device's CUDA compute capability (major, minor); None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def auto_precision(capability: tuple[int, int] | None) -> tuple[str, str]:
    """What `trainer.precision=auto` trains in on a device of this compute capability (None: CPU), and why."""
    if capability is None:
        return "fp32", "auto: fp32 on the CPU (autocast measured neutral or slower there)"
    name = f"compute capability {capability[0]}.{capability[1]}"
    if tuple(capability) >= BF16_CAPABILITY:
        return "bf16", f"auto: bf16 on {name} (bf16 tensor cores from 8.0)"
    if tuple(capability) >= FP16_CAPABILITY:
        return "fp16", f"auto: fp16 with a GradScaler on {name} (fp16 tensor cores, no bf16 before 8.0)"
    return "fp32", f"auto: fp32 on {name} (no tensor cores before 7.0: half precision would not be faster)"


def resolve(settings: SpeedSettings, device: torch.device, *, capability: tuple[int, int] | None = None,
            distributed: bool = False, per_step_scheduler: bool = False) -> Speed:
    """Turn the trainer's auto/true/false settings into what this device will use. `capability` is the
    device's compute capability (read from the device when None); `distributed`: under torchrun (DDP);
    `per_step_scheduler`: the learning rate changes every optimizer step (scheduler.interval=step)."""
    precision, cuda_graphs, deterministic = settings.precision, settings.cuda_graphs, settings.deterministic
    cuda = device.type == "cuda"
    reason = f"trainer.precision={precision}"
    if precision == "auto":
        precision, reason = auto_precision((capability or device_capability(device)) if cuda else None)
    if precision not in PRECISIONS:
        raise UserError(f"trainer.precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    compile = _switch(settings.compile, "trainer.compile", when_auto=False)
    blocker = _graphs_blocker(cuda, precision, compile, distributed, per_step_scheduler)
    graphs = _switch(cuda_graphs, "trainer.cuda_graphs", when_auto=blocker is None)
    if cuda_graphs == "auto":  # on wherever a step can be captured, measured faster there (module docstring)
        graphs_reason = f"auto: off, {blocker}" if blocker else "auto: on (a captured step replays in one launch)"
    elif graphs and blocker:
        raise UserError(f"trainer.cuda_graphs=true cannot be used: {blocker} "
                        f"(trainer.cuda_graphs=auto turns it off there)")
    else:
        graphs_reason = f"trainer.cuda_graphs={str(graphs).lower()}"
    return Speed(
        precision=precision,
        channels_last=_switch(settings.channels_last, "trainer.channels_last", when_auto=cuda),
        compile=compile,
        cudnn_benchmark=cuda and not deterministic,  # autotuning picks kernels by timing: not reproducible
        deterministic=deterministic,
        cuda_graphs=graphs,
        precision_reason=reason,
        cuda_graphs_reason=graphs_reason,
    )


def _graphs_blocker(cuda: bool, precision: str, compile: bool, distributed: bool, per_step_scheduler: bool) -> str | None:
    """Why a training step cannot be captured as a CUDA graph here, or None when it can."""
    if not cuda:
        return "it needs trainer.device=cuda: CUDA graphs exist only on GPUs"
    if precision == "fp16":  # GradScaler reads its overflow flag on the host at every step
        return "fp16's GradScaler syncs with the host every step: use trainer.precision=bf16 or fp32"
    if compile:
        return "trainer.compile=true captures the step too: choose one"
    if distributed:  # DDP's gradient all-reduce would have to be captured too
        return "it runs in one process, not under torchrun (DDP)"
    if per_step_scheduler:  # a captured step holds the learning rate it saw: it would re-capture every step
        return "a per-step scheduler (scheduler.interval=step) would re-capture every step: use an epoch-stepped one"
    return None


class MixedPrecision:
    """Autocast for the forward pass and, for fp16, a GradScaler so small gradients do not underflow."""

    def __init__(self, precision: str, device: torch.device):
        self.dtype = PRECISIONS[precision]
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self, cache_enabled: bool = True):
        """Autocast's context; `cache_enabled=False` inside a CUDA graph capture, which torch requires."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=cache_enabled)

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
