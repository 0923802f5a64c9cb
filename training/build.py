"""Everything built from the config: device, data, loaders, model, optimizer and scheduler.

All `instantiate` calls live here, so training and evaluation build the same things the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from datasets.base import DataBundle, check_class_coverage
from errors import UserError


def _instantiate(node: DictConfig, **runtime):
    """hydra's instantiate, letting a UserError raised by the target reach the user as itself (Hydra wraps
    it in a multi-line InstantiationException otherwise)."""
    try:
        return instantiate(node, **runtime)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def require_keys(cfg: DictConfig) -> None:
    """Keys left as ??? (dataset.root for folders, checkpoint for evaluate.py) as one line, not a traceback."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{', '.join(missing)} must be set: add {' '.join(f'{k}=...' for k in missing)} to the command")


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """auto: CUDA when available, else CPU. Asking for CUDA without it fails here, before any work.
    `key` is the config key that named the device, for messages."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{key}={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{key}={name} but CUDA is not available here: use {key}=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{key}={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise UserError(f"{key}={name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


@dataclass
class Data:
    bundle: DataBundle
    train_loader: object  # DeviceLoader or EpochSeededDataLoader
    val_loader: object


def build_data(dataset_cfg: DictConfig, loader_cfg: DictConfig, seed: int, device: torch.device, rank: int = 0,
               world_size: int = 1) -> Data:
    """The data and its loaders; under DDP each rank's loaders yield that rank's shard."""
    bundle: DataBundle = _instantiate(dataset_cfg, seed=seed)
    check_class_coverage(bundle)
    make_loader = _instantiate(loader_cfg)  # a partial: the data set, device and seed are known only here
    return Data(
        bundle=bundle,
        train_loader=make_loader(bundle.train, device=device, seed=seed, train=True, hflip=bundle.hflip, rank=rank,
                                 world_size=world_size),
        val_loader=make_loader(bundle.val, device=device, seed=seed, train=False, rank=rank, world_size=world_size),
    )


def build_model(model_cfg: DictConfig, input_shape: tuple[int, int, int], num_classes: int,
                device: torch.device) -> nn.Module:
    channels, height, width = input_shape
    return _instantiate(model_cfg, in_channels=channels, height=height, width=width,
                       num_classes=num_classes).to(device)


def build_optimizer(optim_cfg: DictConfig, scheduler_cfg: DictConfig | None, model: nn.Module):
    """The optimizer, and its epoch-stepped learning-rate scheduler (None for a constant rate).
    optim.clip_grad_norm belongs to the training step, not the optimizer's constructor: it is left out."""
    constructor_args = OmegaConf.masked_copy(optim_cfg, [k for k in optim_cfg if k != "clip_grad_norm"])
    optimizer = _instantiate(constructor_args, params=model.parameters())
    scheduler = _instantiate(scheduler_cfg)(optimizer) if scheduler_cfg is not None else None
    return optimizer, scheduler
