"""Test-time augmentation, shared by evaluate.py and predict.py: each batch is classified in several
orientations and the softmax probabilities averaged, so a prediction does not hang on which way up an item
happened to be cut.

  tta=none       the batch as it is (1 forward pass)
  tta=hflip      as it is and mirrored left-right (2 passes)
  tta=dihedral   all 8 orientations of the square: 4 rotations, each also mirrored (8 passes)

and `tta_scales` (zoom factors, default [1]) repeats those views at each zoom about the centre (bilinear, the
border reflected in, as augment.scale's zooms reflect it): tta=dihedral tta_scales=[1,0.8] is 16 passes. On the held-out
photos (docs/performance.md) a zoom out to 0.8 added 1-1.5 points to dihedral's average.

A model only knows the orientations it was trained on: mirroring text or a diagonal texture may change its
class. So a mode is refused where the run's augmentation did not include its transforms (hflip for hflip;
hflip, vflip and transpose for dihedral: those three coins give all 8 orientations) unless forced; so is a zoom
outside the run's augment.scale range (a class may be a size: the generated textures' classes are frequencies).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def views(mode: str, scales: Sequence[float] = (1.0,)) -> int:
    """How many forward passes a batch costs in `mode` at each of `scales`."""
    return len(_views(mode)) * len(scales)


def check(mode: str, augment: dict, input_shape: tuple[int, int, int], force: bool = False, key: str = "tta",
          scales: Sequence[float] = (1.0,)) -> None:
    """One line when `mode` is unknown, cannot apply to the model's (C, H, W) input (dihedral needs squares),
    or uses transforms the run's `augment` config (its hflip/vflip/transpose switches, its scale) did not train
    with and `force` is false; or when `scales` is not a list of zoom factors."""
    if (isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or not scales
            or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and 0.25 <= f <= 4 for f in scales)):
        raise UserError(f"{key}_scales={_show(scales)} must be a list of zoom factors between 0.25 and 4, such as "
                        f"[1.0] (off) or [1.0,0.8] (also zoomed out to 0.8)")
    largest = float(augment.get("scale", 1.0) or 1.0)
    outside = [f for f in scales if not 1 / largest - 1e-9 <= f <= largest + 1e-9]
    if outside and not force:
        trained = f"with zooms of {1 / largest:.3g}-{largest:g}x" if largest > 1 else "without zooms"
        raise UserError(f"{key}_scales: the run trained {trained} (augment.scale={largest:g}), so "
                        f"{', '.join(map(_show, outside))} may look like another class to it: use factors in that "
                        f"range, or {key}_force=true where the classes do not depend on size")
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
                  mode: str = "none", scales: Sequence[float] = (1.0,)) -> torch.Tensor:
    """Softmax probabilities (N, classes), float32, averaged over the views of `mode` at each zoom in `scales`.
    `forward` maps a batch (uint8 or normalised, on its device) to logits; flips and a bilinear zoom (its
    weights sum to 1) commute with per-channel normalisation, so it may normalise inside."""
    total = None
    passes = _views(mode)
    for factor in scales:
        zoomed = images if factor == 1 else zoom(images, factor)
        for view in passes:
            p = torch.softmax(forward(view(zoomed)).float(), dim=1)
            total = p if total is None else total.add_(p)
    count = len(passes) * len(scales)
    return total.div_(count) if count > 1 else total


def zoom(images: torch.Tensor, factor: float) -> torch.Tensor:
    """A batch (N, C, H, W) zoomed about its centre by `factor` (below 1: out, the border reflected in),
    bilinear between pixel centres; uint8 rounded back to uint8 (an ONNX model takes uint8), float kept float."""
    n, _, height, width = images.shape
    theta = torch.tensor([[1 / factor, 0, 0], [0, 1 / factor, 0]], dtype=torch.float32, device=images.device)
    grid = torch.nn.functional.affine_grid(theta.expand(n, 2, 3), list(images.shape), align_corners=False)
    zoomed = torch.nn.functional.grid_sample(images.float(), grid, mode="bilinear", padding_mode="reflection",
                                             align_corners=False)
    return zoomed if images.is_floating_point() else zoomed.round_().clamp_(0, 255).to(torch.uint8)


def _show(value) -> str:
    """A factor or list as a user types it on the command line."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_show, value)) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)
