"""Score a checkpoint item by item, independently of training.loop.evaluate's accumulation: the plain
per-item truth that evaluation's sums, histograms and top-k are checked against."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from training.build import Data, build_data, build_model
from training.loop import Normalizer

CPU = torch.device("cpu")


@dataclass
class Scored:
    data: Data  # rebuilt from the checkpoint's config
    images: torch.Tensor  # every validation item, uint8, in the loader's order
    labels: torch.Tensor
    probabilities: torch.Tensor  # softmax of the model's logits, (items, classes)
    losses: torch.Tensor  # cross entropy per item, nats


@torch.no_grad()
def score_checkpoint(path: Path) -> Scored:
    checkpoint = torch.load(path, weights_only=True)
    saved = OmegaConf.create(checkpoint["config"])
    data = build_data(saved.dataset, saved.loader, saved.trainer.seed, CPU)
    model = build_model(saved.model, tuple(checkpoint["input_shape"]), len(checkpoint["classes"]), CPU)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    normalize = Normalizer(checkpoint["normalization"]["mean"], checkpoint["normalization"]["std"], CPU)
    images, labels = (torch.cat(parts) for parts in zip(*data.val_loader))
    logits = model(normalize(images))
    return Scored(data, images, labels, torch.softmax(logits, 1),
                  nn.functional.cross_entropy(logits, labels, reduction="none"))
