"""Test-time augmentation, shared by evaluate.py and predict.py: each batch is classified in several
orientations and the softmax probabilities averaged, so a prediction does not hang on which way up an item
happened to be cut.

  tta=none       the batch as it is (1 forward pass)
  tta=hflip      as it is and mirrored left-right (2 passes)
  tta=dihedral   all 8 orientations of the square: 4 rotations, each also mirrored (8 passes)

A model only knows the orientations it was trained on: mirroring text or a diagonal texture may change its
class. So a mode is refused where the run's augmentation did not include its transforms (hflip for hflip;
hflip, vflip and transpose for dihedral: those three coins give all 8 orientations) unless forced.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from errors import UserError

MODES = ("none", "hflip", "dihedral")
# The augment.* switches (configs/augment/) whose training makes each mode's views familiar to the model.
NEEDS = {"none": (), "hflip": ("hflip",), "dihedral": ("hflip", "vflip", "transpose")}


def _views(mode: str) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Functions of a batch (N, C, H, W) giving one orientation each; the identity first."""
    def identity(x):
        return x

    def mirror(x):
        return x.flip(-1)

    if mode == "none":
        return [identity]
    if mode == "hflip":
        return [identity, mirror]
    # The dihedral group of the square: the identity and 3 rotations by 90 degrees, each with and without a
    # left-right mirror.
    rotations = [lambda x, k=k: torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return [*rotations, *(lambda x, r=r: mirror(r(x)) for r in rotations)]


def views(mode: str) -> int:
    """How many forward passes a batch costs in `mode`."""
    return len(_views(mode))


def check(mode: str, augment: dict, input_shape: tuple[int, int, int], force: bool = False, key: str = "tta") -> None:
    """One line when `mode` is unknown, cannot apply to the model's (C, H, W) input (dihedral needs squares),
    or uses transforms the run's `augment` config (its hflip/vflip/transpose switches) did not train with
    and `force` is false."""
    if mode not in MODES:
        raise UserError(f"{key}={mode} is not a test-time augmentation: use one of {', '.join(MODES)}")
    _, height, width = input_shape
    if mode == "dihedral" and height != width:
        raise UserError(f"{key}=dihedral needs square inputs, the model takes {width}x{height} (width x height): "
                        f"use {key}=hflip or {key}=none")
    missing = [name for name in NEEDS[mode] if not augment.get(name, False)]
    if missing and not force:
        raise UserError(f"{key}={mode}: the run trained without augment.{'/'.join(missing)}, so the model never saw "
                        f"those orientations and averaging over them may hurt: use {key}=none, or {key}_force=true "
                        "where the classes do not depend on orientation")


def probabilities(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                  mode: str = "none") -> torch.Tensor:
    """Softmax probabilities (N, classes), float32, averaged over the views of `mode`. `forward` maps a
    batch (uint8 or normalised, on its device) to logits; flips commute with per-channel normalisation,
    so it may normalise inside."""
    total = None
    passes = _views(mode)
    for view in passes:
        p = torch.softmax(forward(view(images)).float(), dim=1)
        total = p if total is None else total.add_(p)
    return total.div_(len(passes)) if len(passes) > 1 else total
