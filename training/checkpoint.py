"""Checkpoints: what one holds, an atomic save, a safe load, and the RNG states that make a resume exact.

A checkpoint is a dict of tensors and plain Python values only, so `torch.load(path, weights_only=True)`
reads it: no pickled classes, no numpy arrays, the config as plain containers.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from errors import UserError

FORMAT = 1  # bump when the keys below change meaning
KEYS = ("format", "epoch", "batches_done", "step", "model", "optimizer", "scheduler", "scaler", "rng", "loader", "classes", "input_shape",
        "channels", "normalization", "metrics", "config")


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, without DistributedDataParallel (.module) or torch.compile (._orig_mod) around it,
    so its state dict loads into a plain model."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def rng_state() -> dict:
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        # The MT19937 key as an int64 tensor: numpy arrays would need pickled globals to load.
        "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": numpy_state["state"]["pos"], "has_gauss": numpy_state["has_gauss"],
                  "gauss": numpy_state["gauss"]},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
                         "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    torch.set_rng_state(state["torch"])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, cuda_state in enumerate(cuda_states_to_restore(state["cuda"], visible)):
        torch.cuda.set_rng_state(cuda_state, index)


def cuda_states_to_restore(saved: list, visible: int) -> list:
    """The saved per-GPU RNG states that this machine can take: one per visible GPU, at most. A checkpoint
    from a machine with more GPUs (trained on 2, resumed with CUDA_VISIBLE_DEVICES=0) keeps the first ones;
    torch.cuda.set_rng_state_all would index past the last GPU. Training draws nothing from the CUDA
    generators today (its randomness is on the CPU), so a resume stays exact either way."""
    return list(saved[:visible])


def _tuples(value):
    """random.setstate wants the nested tuples random.getstate gave; a loaded checkpoint may hold lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save(checkpoint: dict, path: Path) -> None:
    """Write to a temp file in the same folder, flush it to disk, then rename over `path`: a crash or a
    failed write leaves the previous checkpoint whole, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | Path, key: str) -> dict:
    """Read a checkpoint on the CPU without running pickled code; `key` names the config key for messages."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}: checkpoint not found: {path.resolve()}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise UserError(f"{key}: {path} is not a checkpoint this trainer can read ({e}); "
                        "point it at checkpoints/last.pt or best.pt of a run") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT or set(KEYS) - set(checkpoint):
        raise UserError(f"{key}: {path} is not a checkpoint of this trainer (format {FORMAT}); "
                        "point it at checkpoints/last.pt or best.pt of a run")
    return checkpoint
