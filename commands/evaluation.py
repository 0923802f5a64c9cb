"""evaluate.py's work: score a checkpoint (or a model export.py wrote) on a validation split, or classify a
few files with it.

Like the training runner, the only place evaluation writes files: eval.json (or predictions.json) and a
log in the run dir. The model, data and preprocessing are rebuilt from what the checkpoint saved; an ONNX
model brings the same description in its metadata, and ONNX Runtime computes its logits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from commands import onnx_model, tta
from datasets import guards
from datasets.base import decode_problem, limit_image_pixels
from datasets.regions import LoadItem
from datasets.transforms import DECODE_ERRORS
from datasets.values import Scale
from errors import UserError
from training import checkpoint as checkpoints
from training import run_folder, saved_config, untrusted
from training.build import build_data, build_model, check_same_split, require_keys, resolve_device, saved_mapping
from training import speed as speeds
from training.loop import FP32, Normalizer, evaluate
from training.logger import run_log
from training.schema import check_ranges

log = logging.getLogger(__name__)


def run_evaluation(cfg: DictConfig) -> dict:
    """Score the checkpoint (eval.json) or, with `predict` files, classify them (predictions.json)."""
    check_ranges(cfg)
    require_keys(cfg)
    limit_image_pixels(cfg.max_image_pixels)
    run_dir = Path(cfg.run_dir)
    run_folder.create(run_dir)
    with run_log(run_dir):
        device = resolve_device(cfg.device, "device")
        loaded = load_classifier(cfg.checkpoint, device)
        model, normalize, amp, checkpoint, saved = (loaded.model, loaded.normalize, loaded.amp, loaded.checkpoint,
                                                    loaded.saved)
        tta.check(cfg.tta, dict(saved.get("augment") or {}), tuple(checkpoint["input_shape"]), cfg.tta_force,
                  scales=cfg.tta_scales)
        scales = list(cfg.tta_scales)  # after the check: tta_scales=0.8 (not a list) is its one line
        views = tta.views(cfg.tta, scales)
        if views > 1:
            model = Averaged(model, cfg.tta, scales)
            log.info("tta=%s tta_scales=%s: softmax probabilities averaged over %d views of each item", cfg.tta,
                     scales, views)
        if cfg.predict:
            result = {"checkpoint": str(cfg.checkpoint), "tta": cfg.tta, "tta_scales": scales,
                      "predictions": predict(model, normalize, checkpoint, [Path(p) for p in cfg.predict], device,
                                             amp)}
            name = "predictions.json"
        else:
            # Without dataset= the data is the file's, but where to write a cache and whether to download come
            # from the command, never from a file someone else may have written.
            dataset_cfg = cfg.dataset if cfg.get("dataset") is not None else untrusted.reading_only(saved.dataset)
            result = score(model, normalize, checkpoint, dataset_cfg, saved, device, amp,
                           same_split=None if cfg.get("dataset") is not None else f"checkpoint={cfg.checkpoint}")
            result["checkpoint"], result["tta"], result["tta_scales"] = str(cfg.checkpoint), cfg.tta, scales
            name = "eval.json"
        # Strict JSON: a value that is not finite (a loss on inputs the model overflows on) is written as null.
        run_folder.write_text(run_dir / name, json.dumps(untrusted.finite_or_none(result), indent=1, allow_nan=False))
        log.info("wrote %s", run_dir / name)
        return result


class Averaged(nn.Module):
    """`model` under test-time augmentation (commands/tta.py): the log of its softmax probabilities averaged over
    the views of `mode`. Log-probabilities are logits of those probabilities (softmax gives them back, cross-entropy
    is -log p of the target), so evaluation's loss, accuracy, PR curves and mistakes score the average unchanged."""

    def __init__(self, model: nn.Module, mode: str, scales: Sequence[float] = (1.0,)):
        super().__init__()
        self.model, self.mode, self.scales = model, mode, scales

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # Flips, rotations and bilinear zooms commute with per-channel normalisation: the views of a normalised
        # batch are the normalised views. The smallest normal float keeps a probability that underflowed to 0 a
        # finite loss.
        return tta.probabilities(self.model, inputs, self.mode, self.scales).clamp_min(
            torch.finfo(torch.float32).tiny).log()


@dataclass
class Classifier:
    """A trained model ready to score uint8 batches: from a checkpoint, or an ONNX file export.py wrote."""

    model: nn.Module  # in eval mode; an OnnxClassifier stands in for an ONNX file
    normalize: Normalizer | Callable  # uint8 batch -> the model's input (the ONNX graph normalises itself)
    amp: speeds.MixedPrecision
    checkpoint: dict  # the description: classes, input_shape, normalization, value_range, box_size, epoch, ...
    saved: DictConfig  # the run's config, rebuilt from the shipped config groups

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """float32 logits (N, classes) of a uint8 batch (N, C, H, W) on the model's device."""
        with self.amp.autocast():
            return self.model(self.normalize(images)).float()


def load_classifier(path: str, device: torch.device) -> Classifier:
    """The model of a checkpoint (.pt) or an ONNX model (.onnx), on `device`, as the run validated it."""
    if onnx_model.is_onnx(path):
        # Scored by the same code below: the session stands in for the model, and its graph normalises.
        model, checkpoint, saved = onnx_model.load(path, device)
        normalize, amp = onnx_model.as_is, FP32  # ONNX Runtime runs the graph as it was exported
    else:
        checkpoint = checkpoints.load(path, "checkpoint")
        # Rebuilt from the shipped config groups: a checkpoint's config may not choose what code runs.
        saved = saved_config.rebuild(checkpoint["config"], checkpoint.get("choices"),
                                     f"checkpoint={path}")
        model = build_model(saved.model, tuple(checkpoint["input_shape"]), len(checkpoint["classes"]), device)
        checkpoints.load_weights(model, checkpoint, f"checkpoint={path}")
        # Scored as the run validated: its precision and layout settings, resolved for this device (a run
        # that trained with auto on a GPU scores in the same precision on that GPU; fp32 on the CPU).
        speed = speeds.resolve(speeds.SpeedSettings(saved.trainer.precision, saved.trainer.channels_last, False,
                                                    saved.trainer.deterministic), device)
        model = speeds.prepare(speed, model)
        amp = speeds.MixedPrecision(speed.precision, device)
        log.info("precision %s (%s)", speed.precision, speed.precision_reason)
        # The model learnt with the checkpoint's normalisation, whatever data it now sees.
        normalize = Normalizer(checkpoint["normalization"]["mean"], checkpoint["normalization"]["std"], device,
                               speeds.memory_format(speed))
    model.eval()
    return Classifier(model, normalize, amp, checkpoint, saved)


def score(model: nn.Module, normalize: Normalizer, checkpoint: dict, dataset_cfg: DictConfig, saved: DictConfig,
          device: torch.device, amp: speeds.MixedPrecision = FP32, same_split: str | None = None) -> dict:
    # The training run's seed, so a seeded validation split is the one the run held out; no training loader,
    # so only the validation items are copied to a GPU; its value mapping and normalisation, so the data
    # reaches the model as in training (and mean/std=auto is not recomputed); its split rule as auto resolved it.
    # `same_split` (the checkpoint's name): the run's own data, whose validation items must be those it held out.
    data = build_data(dataset_cfg, saved.loader, saved.trainer.seed, device, train=False,
                      fixed=saved_mapping(checkpoint, dataset_cfg))
    if same_split:
        check_same_split(checkpoint, data.bundle, same_split)
    if data.val_loader.notice:
        log.warning("%s", data.val_loader.notice)
    classes = checkpoint["classes"]
    if data.bundle.classes != classes:
        raise UserError(f"dataset has classes {data.bundle.classes} but the checkpoint was trained on {classes}: "
                        "score data whose labels (or class folders) are exactly those")
    if data.bundle.input_shape != tuple(checkpoint["input_shape"]):
        c, h, w = checkpoint["input_shape"]
        raise UserError(f"dataset gives inputs {data.bundle.input_shape} (C, H, W) but the checkpoint takes "
                        f"{(c, h, w)}: set dataset.channels={c} dataset.height={h} dataset.width={w}")
    val = evaluate(model, data.val_loader, normalize, device, len(classes), amp)
    log.info("epoch %d checkpoint: val loss %.4f, acc %.2f%%, macro-F1 %s on %d items", checkpoint["epoch"],
             val["loss"], 100 * val["acc"], "n/a" if val["f1_macro"] is None else f"{val['f1_macro']:.4f}",
             int(val["confusion"].sum()))
    return {
        "epoch": checkpoint["epoch"],
        "acc": val["acc"],
        "loss": val["loss"],
        "per_class_acc": dict(zip(classes, val["per_class_acc"])),
        # None where undefined: precision of a class never predicted, recall and F1 of a class with no items.
        "precision": dict(zip(classes, val["precision"])),
        "recall": dict(zip(classes, val["recall"])),
        "f1": dict(zip(classes, val["f1"])),
        "f1_macro": val["f1_macro"],  # mean F1 over the classes with items
        "classes": classes,
        "confusion": val["confusion"].tolist(),  # rows: true class, columns: predicted; counts
    }


@torch.no_grad()
def predict(model: nn.Module, normalize: Normalizer, checkpoint: dict, paths: list[Path],
            device: torch.device, amp: speeds.MixedPrecision = FP32) -> list[dict]:
    """Each file decoded, value-mapped, resized and normalised as training items are, then its most probable
    class. A per_file value range maps each .npy file by its own range, as training did per source file."""
    channels, height, width = checkpoint["input_shape"]
    value_range = checkpoint.get("value_range")
    load = LoadItem(height, width, channels, Scale(*value_range) if isinstance(value_range, (list, tuple)) else None)
    predictions = []
    for path in paths:
        guards.require_file(path, "predict")
        try:
            image = load(str(path))
        except DECODE_ERRORS as e:
            raise UserError(f"predict: cannot read {path} as an image or .npy array ({decode_problem(e)})") from None
        with amp.autocast():
            logits = model(normalize(image.unsqueeze(0).to(device))).float()
        untrusted.check_outputs(logits, len(checkpoint["classes"]), "checkpoint", f" for {path}")
        probabilities = torch.softmax(logits, dim=1)[0].cpu()
        best = int(probabilities.argmax())
        predictions.append({"file": str(path), "class": checkpoint["classes"][best],
                            "probability": float(probabilities[best])})
    return predictions
