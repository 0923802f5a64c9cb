"""Checkpoints: what one holds, an atomic save, a safe load, and the RNG states that make a resume exact.

A checkpoint is a dict of tensors and plain Python values only, so `torch.load(path, weights_only=True)`
reads it: no pickled classes, no numpy arrays, the config as plain containers. Besides KEYS, a checkpoint
records `choices`, the shipped config group each part of its config came from: a resume or evaluate.py
rebuilds the config from those (training/saved_config.py), never from the stored `_target_`s. Checkpoints
saved before `choices` existed are read too: their choices are looked up from their targets.

Under trainer.ema, `model` holds the averaged weights (training/ema.py), so everything that loads a
checkpoint's `model` (evaluate.py, export.py, predict) uses the average without knowing about it; the weights
training goes on from are `training_model`, and `ema_updates` counts the average's updates. Without EMA
neither key is written. Under trainer.early_stop, `early_stop` holds its best value and counters.
"""

from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from datasets import guards
from datasets.base import DataBundle
from errors import UserError
from training import untrusted
from training.early_stop import EarlyStop
from training.ema import WeightAverage
from training.position import Position

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
    failed write leaves the previous checkpoint whole, never a truncated one. One process writes a run's
    checkpoints, so any other temp file of `path` is what a killed run left (SIGKILL runs no cleanup): removed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk, a read-only folder (torch wraps some in RuntimeError)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        kept = "the previous one is kept" if path.exists() else "no checkpoint was saved"
        raise UserError(f"cannot save {path} ({reason}); {kept}: free space there or make the run folder "
                        "writable, then continue with resume=") from None
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | Path, key: str) -> dict:
    """Read a checkpoint on the CPU without running pickled code; `key` names the config key for messages."""
    path = guards.require_file(path, key, "checkpoint")
    untrusted.check_container(path, key)  # before torch.load allocates anything from it
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own message is seven lines, about trusting the file
        raise UserError(f"{key}: {path} is not a checkpoint this trainer can read: it holds pickled Python objects "
                        "(which could run code), refused unread; point it at checkpoints/last.pt or best.pt of a run"
                        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, RecursionError) as e:  # truncated, damaged
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"{key}: {path} is not a checkpoint this trainer can read ({reason}); "
                        "point it at checkpoints/last.pt or best.pt of a run") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT or set(KEYS) - set(checkpoint):
        raise UserError(f"{key}: {path} is not a checkpoint of this trainer (format {FORMAT}); "
                        "point it at checkpoints/last.pt or best.pt of a run")
    untrusted.check_description(checkpoint, f"{key}={path}")
    return checkpoint


@dataclass
class TrainingState:
    """The objects whose state a checkpoint holds, and the data description saved beside them: a new
    checkpoint key is added here, in `snapshot` and `restore`, and nowhere else."""

    model: nn.Module  # possibly wrapped in DDP or torch.compile: saved unwrapped
    optimizer: torch.optim.Optimizer
    scheduler: object | None  # an lr scheduler (per epoch or per step), None for a constant rate
    amp: object  # training.speed.MixedPrecision: its GradScaler (fp16) is saved
    loader: object  # the training loader: its seed and epoch
    bundle: DataBundle
    config: dict  # the resolved config, for the record: a resume rebuilds it from `choices`, never as stored
    choices: dict  # the shipped config group each part came from (training/saved_config.py)
    ema: WeightAverage | None = None  # trainer.ema: the weights' average, validated and saved as `model`
    early_stop: EarlyStop | None = None  # trainer.early_stop: its best value and count of epochs without improvement

    @property
    def scored_model(self) -> nn.Module:
        """The model validation scores and a checkpoint's `model` holds: the average under trainer.ema."""
        return self.ema.model if self.ema is not None else unwrap(self.model)

    def snapshot(self, position: Position, metrics: dict) -> dict:
        averaged = {} if self.ema is None else {"training_model": unwrap(self.model).state_dict(),
                                                "ema_updates": int(self.ema.updates.item())}
        return {
            "format": FORMAT,
            "epoch": position.epoch,  # a resume starts at this epoch index...
            "batches_done": position.batches_done,  # ...after this many of its batches
            "step": position.step,
            "window": list(position.window),
            "model": self.scored_model.state_dict(),
            **averaged,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.amp.state_dict(),
            "rng": rng_state(),
            "loader": self.loader.state_dict(),
            "classes": self.bundle.classes,
            "input_shape": list(self.bundle.input_shape),  # (C, H, W)
            "channels": self.bundle.input_shape[0],
            "normalization": {"mean": list(self.bundle.mean), "std": list(self.bundle.std)},
            # How array values became 0..255: per_file, or the [low, high] every file was mapped from.
            "value_range": (list(self.bundle.value_range) if isinstance(self.bundle.value_range, tuple)
                            else self.bundle.value_range),
            # predict.py's default window: (height or None for the full height, width) in source pixels.
            "box_size": None if self.bundle.box_size is None else list(self.bundle.box_size),
            # How train and val were drawn (datasets/splits.py): a resume and evaluate.py draw them so again.
            "split": self.bundle.split,
            "metrics": metrics,
            "config": self.config,
            "choices": self.choices,
            **({"early_stop": self.early_stop.state_dict()} if self.early_stop is not None else {}),
        }

    def restore(self, checkpoint: dict, source: str) -> Position:
        """Load every state saved by `snapshot`; the RNG streams last, so that building the model (which draws
        initial weights) before this call does not shift them. `source` names the file for messages."""
        if self.ema is None:
            load_weights(unwrap(self.model), checkpoint, source)
        else:
            updates = checkpoint.get("ema_updates")
            if "training_model" not in checkpoint or not isinstance(updates, int) or isinstance(updates, bool) \
                    or updates < 0:
                raise UserError(f"{source}: its config sets trainer.ema but it holds no training_model and "
                                "ema_updates to continue from: use the checkpoint as the run saved it")
            load_weights(unwrap(self.model), {**checkpoint, "model": checkpoint["training_model"]}, source)
            load_weights(self.ema.model, checkpoint, source)
            self.ema.updates.fill_(updates)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.amp.load_state_dict(checkpoint["scaler"])
        self.loader.load_state_dict(checkpoint["loader"])
        if self.early_stop is not None:
            self.early_stop.load_state_dict(checkpoint.get("early_stop"), source)
        restore_rng(checkpoint["rng"])
        # "window" is absent from checkpoints saved before stops carried it: their first point averages fewer steps.
        return Position(checkpoint["epoch"], checkpoint["batches_done"], checkpoint["step"],
                        tuple(checkpoint.get("window", ())))


def load_weights(model: nn.Module, checkpoint: dict, source: str) -> None:
    """The checkpoint's weights into a model built from its config, classes and input shape; weights of
    other shapes (an edited class list, a tampered file) are one line naming the first mismatch, not torch's
    block listing every tensor. `source` names the file for messages ("checkpoint=PATH")."""
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e).strip())
        raise UserError(f"{source}: its weights do not fit the model for its {len(checkpoint['classes'])} classes "
                        f"and input {tuple(checkpoint['input_shape'])} (C, H, W) ({detail}): the file was edited or "
                        "is damaged; use the checkpoint as the run saved it") from None
    untrusted.check_weights(model, source)
