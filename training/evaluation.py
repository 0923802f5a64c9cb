"""evaluate.py's work: score a checkpoint on a validation split, or classify a few files with it.

Like the training runner, the only place evaluation writes files: eval.json (or predictions.json) and a
log in the run dir. The model, data and preprocessing are rebuilt from what the checkpoint saved.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from datasets.base import decode_problem, limit_image_pixels
from datasets.transforms import DECODE_ERRORS, LoadItem
from errors import UserError
from training import checkpoint as checkpoints
from training import run_folder, saved_config
from training.build import build_data, build_model, require_keys, resolve_device
from training.loop import Normalizer, evaluate
from training.logger import run_log

log = logging.getLogger(__name__)


def run_evaluation(cfg: DictConfig) -> dict:
    """Score the checkpoint (eval.json) or, with `predict` files, classify them (predictions.json)."""
    require_keys(cfg)
    limit_image_pixels(cfg.max_image_pixels)
    run_dir = Path(cfg.run_dir)
    run_folder.create(run_dir)
    with run_log(run_dir):
        checkpoint = checkpoints.load(cfg.checkpoint, "checkpoint")
        device = resolve_device(cfg.device, "device")
        # Rebuilt from the shipped config groups: a checkpoint's config may not choose what code runs.
        saved = saved_config.rebuild(checkpoint["config"], checkpoint.get("choices"), f"checkpoint={cfg.checkpoint}")
        model = build_model(saved.model, tuple(checkpoint["input_shape"]), len(checkpoint["classes"]), device)
        checkpoints.load_weights(model, checkpoint, f"checkpoint={cfg.checkpoint}")
        model.eval()
        # The model learnt with the checkpoint's normalisation, whatever data it now sees.
        normalize = Normalizer(checkpoint["normalization"]["mean"], checkpoint["normalization"]["std"], device)
        if cfg.predict:
            result = {"checkpoint": str(cfg.checkpoint),
                      "predictions": predict(model, normalize, checkpoint, [Path(p) for p in cfg.predict], device)}
            name = "predictions.json"
        else:
            dataset_cfg = cfg.dataset if cfg.get("dataset") is not None else saved.dataset
            result = score(model, normalize, checkpoint, dataset_cfg, saved, device)
            result["checkpoint"] = str(cfg.checkpoint)
            name = "eval.json"
        run_folder.write_text(run_dir / name, json.dumps(result, indent=1))
        log.info("wrote %s", run_dir / name)
        return result


def score(model: nn.Module, normalize: Normalizer, checkpoint: dict, dataset_cfg: DictConfig, saved: DictConfig,
          device: torch.device) -> dict:
    # The training run's seed, so a seeded validation split is the one the run held out.
    data = build_data(dataset_cfg, saved.loader, saved.trainer.seed, device)
    classes = checkpoint["classes"]
    if data.bundle.classes != classes:
        raise UserError(f"dataset has classes {data.bundle.classes} but the checkpoint was trained on {classes}: "
                        "score data whose labels (or class folders) are exactly those")
    if data.bundle.input_shape != tuple(checkpoint["input_shape"]):
        c, h, w = checkpoint["input_shape"]
        raise UserError(f"dataset gives inputs {data.bundle.input_shape} (C, H, W) but the checkpoint takes "
                        f"{(c, h, w)}: set dataset.channels={c} dataset.height={h} dataset.width={w}")
    val = evaluate(model, data.val_loader, normalize, device, len(classes))
    log.info("epoch %d checkpoint: val loss %.4f, acc %.2f%% on %d items", checkpoint["epoch"], val["loss"],
             100 * val["acc"], int(val["confusion"].sum()))
    return {
        "epoch": checkpoint["epoch"],
        "acc": val["acc"],
        "loss": val["loss"],
        "per_class_acc": dict(zip(classes, val["per_class_acc"])),
        "classes": classes,
        "confusion": val["confusion"].tolist(),  # rows: true class, columns: predicted; counts
    }


@torch.no_grad()
def predict(model: nn.Module, normalize: Normalizer, checkpoint: dict, paths: list[Path],
            device: torch.device) -> list[dict]:
    """Each file decoded, resized and normalised as training items are, then its most probable class."""
    channels, height, width = checkpoint["input_shape"]
    load = LoadItem(height, width, channels)
    predictions = []
    for path in paths:
        if not path.is_file():
            raise UserError(f"predict: file not found: {path.resolve()}")
        try:
            image = load(str(path))
        except DECODE_ERRORS as e:
            raise UserError(f"predict: cannot read {path} as an image or .npy array ({decode_problem(e)})") from None
        probabilities = torch.softmax(model(normalize(image.unsqueeze(0).to(device))), dim=1)[0].cpu()
        best = int(probabilities.argmax())
        predictions.append({"file": str(path), "class": checkpoint["classes"][best],
                            "probability": float(probabilities[best])})
    return predictions
