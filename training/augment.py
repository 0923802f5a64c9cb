"""Augmentation of whole uint8 training batches on the training device, after the loader (either mode).

Every geometric choice (zoom, pad + random crop, flips, transpose) becomes one source-pixel index per output pixel,
so a batch is augmented by a single `gather`, whatever is combined, on any device. Cutout then erases one
square per item. Decisions are drawn on the CPU from a generator seeded by (seed, epoch, rank, batch index):
the same on CPU and CUDA, whatever the number of loader workers, and a run resumed mid-epoch draws exactly
what an unbroken one would for its remaining batches, with nothing to save in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from errors import UserError

_STREAM = 2  # keeps these generators' seeds apart from the epoch order's (seed + epoch)


def batch_generator(seed: int, epoch: int, rank: int, batch: int) -> torch.Generator:
    """The CPU generator for one training batch's decisions, well mixed from its coordinates."""
    # SeedSequence takes non-negative entropy only; torch accepts any seed, so fold negatives in.
    state = np.random.SeedSequence([seed % 2**64, epoch, _STREAM, rank, batch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _coins(n: int, generator: torch.Generator) -> torch.Tensor:
    """One fair coin per item."""
    return torch.rand(n, generator=generator) < 0.5


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices outside [0, size) mirrored back in without repeating the edge (torch's 'reflect' padding);
    valid for indices in [-(size - 1), 2 * (size - 1)], which pad <= size - 1 guarantees."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


@dataclass(frozen=True)
class Augment:
    """Per item of a uint8 batch (N, C, H, W): zoom about the centre by a factor drawn log-uniformly from
    [1/scale, scale] (nearest source pixel, reflected at the border; `scale` 1: off); reflect-pad by `pad`
    pixels and crop back to H x W at a random offset; mirror left-right (`hflip`), top-bottom (`vflip`), swap
    rows and columns (`transpose`, square inputs), each with probability 1/2; then erase a `cutout` x `cutout`
    square at a random centre (clipped at the border) with `fill`, the dataset's mean colour, so it reads as
    zero after normalisation.
    Config: configs/augment/."""

    pad: int = 0
    hflip: bool = False
    vflip: bool = False
    transpose: bool = False
    cutout: int = 0
    fill: tuple[int, ...] = (0,)  # uint8 per channel (or one for all)
    scale: float = 1.0  # largest zoom factor, in and out; 1: off

    @property
    def active(self) -> bool:
        return self.geometric or bool(self.cutout)

    @property
    def geometric(self) -> bool:
        """Whether any output pixel may read another source pixel (one gather, _geometric)."""
        return bool(self.pad or self.hflip or self.vflip or self.transpose or self.zooms)

    @property
    def zooms(self) -> bool:
        return self.scale != 1

    def check(self, height: int, width: int) -> None:
        """One line before any data is decoded when an augmentation cannot apply to H x W inputs."""
        for key, value in (("pad", self.pad), ("cutout", self.cutout)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UserError(f"augment.{key} must be an integer >= 0, got {value!r}")
        if self.pad > min(height, width) - 1:
            raise UserError(f"augment.pad={self.pad} is too large for {width}x{height} (width x height) inputs: "
                            f"reflect padding takes at most {min(height, width) - 1} (one less than the smaller side)")
        if not (isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool) and 1 <= self.scale <= 2):
            raise UserError(f"augment.scale must be between 1 (off) and 2 (zoom by 1/2 to 2x), got {self.scale!r}")
        if self.transpose and height != width:
            raise UserError(f"augment.transpose=true needs square inputs, got {width}x{height} (width x height): "
                            "set augment.transpose=false or make dataset.width equal dataset.height")
        if self.cutout > min(height, width):
            raise UserError(f"augment.cutout={self.cutout} is larger than {width}x{height} (width x height) inputs: "
                            f"use at most {min(height, width)}")

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The augmented batch, a new tensor on the batch's device (or the batch itself when nothing is on)."""
        if not self.active:
            return images
        n, channels, height, width = images.shape
        # Draw every decision first, in a fixed order, on the CPU: small tensors, identical on every device.
        offsets = torch.randint(0, 2 * self.pad + 1, (2, n), generator=generator) if self.pad else None
        hflip = _coins(n, generator) if self.hflip else None
        vflip = _coins(n, generator) if self.vflip else None
        transpose = _coins(n, generator) if self.transpose else None
        centres = torch.stack([torch.randint(0, height, (n,), generator=generator),
                               torch.randint(0, width, (n,), generator=generator)]) if self.cutout else None
        # Drawn last, so runs without it draw exactly what they did before it existed.
        zoom = torch.exp((2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1)
                         * math.log(self.scale)) if self.zooms else None
        if self.geometric:
            images = self._geometric(images, offsets, hflip, vflip, transpose, zoom)
        if self.cutout:
            images = self._erase(images, centres.to(images.device, non_blocking=True))
        return images

    def _geometric(self, images: torch.Tensor, offsets, hflip, vflip, transpose, zoom=None) -> torch.Tensor:
        """Source row per output row and source column per output column, per item (small: N x H and N x W),
        combined into one flat source index per output pixel only at the end: building full-size index maps
        step by step cost ~10x the gather itself (measured at batch 256, 32x32). The small maps go to the
        batch's device, where the full-size index is built: copying that instead (4 MiB of int64 at batch 512,
        32x32, from unpinned memory) would wait for the copy every step."""
        n, channels, height, width = images.shape
        device = images.device
        rows = torch.arange(height, device=device).expand(n, height)
        cols = torch.arange(width, device=device).expand(n, width)
        if zoom is not None:  # output pixel p reads source pixel floor((p + 1/2 - side/2) / zoom + side/2)
            z = zoom.to(device).view(n, 1)
            rows = torch.floor((rows + 0.5 - height / 2) / z + height / 2).long()
            cols = torch.floor((cols + 0.5 - width / 2) / z + width / 2).long()
        if vflip is not None:
            rows = torch.where(vflip.to(device).view(n, 1), height - 1 - rows, rows)
        if hflip is not None:
            cols = torch.where(hflip.to(device).view(n, 1), width - 1 - cols, cols)
        if offsets is not None:  # crop at offset (dy, dx) of the image padded by `pad` on every side
            offsets = offsets.to(device)
            rows = rows + (offsets[0] - self.pad).view(n, 1)
            cols = cols + (offsets[1] - self.pad).view(n, 1)
        if offsets is not None or zoom is not None:
            # A zoom out (to 1/2) reads up to half a side beyond each border, a pad up to a side less one: one
            # reflection covers either alone; the clamp keeps the two together in range (the border repeats).
            rows = _reflect(rows, height).clamp(0, height - 1)
            cols = _reflect(cols, width).clamp(0, width - 1)
        # Flat source index = row part + column part; a transposed item reads row cols[x], column rows[y]
        # (square inputs only, checked, so both index ranges match).
        row_part, col_part = rows * width, cols
        if transpose is not None:
            t = transpose.to(device).view(n, 1)
            row_part, col_part = torch.where(t, rows, row_part), torch.where(t, cols * width, col_part)
        source = (row_part.view(n, height, 1) + col_part.view(n, 1, width)).view(n, 1, height * width)
        flat = images.reshape(n, channels, height * width)
        return flat.gather(2, source.expand(n, channels, height * width)).view(n, channels, height, width)

    def _erase(self, images: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = images.shape
        start = centres - self.cutout // 2  # the square [start, start + cutout), clipped by the comparisons below
        ys = torch.arange(height, device=images.device).view(1, height)
        xs = torch.arange(width, device=images.device).view(1, width)
        inside_y = (ys >= start[0].view(n, 1)) & (ys < (start[0] + self.cutout).view(n, 1))
        inside_x = (xs >= start[1].view(n, 1)) & (xs < (start[1] + self.cutout).view(n, 1))
        square = (inside_y.view(n, 1, height, 1) & inside_x.view(n, 1, 1, width))
        fill = torch.tensor(self.fill, dtype=torch.uint8, device=images.device).view(1, -1, 1, 1)
        return torch.where(square, fill, images)

    def for_epoch(self, seed: int, epoch: int, rank: int, first_batch: int = 0) -> EpochAugment:
        return EpochAugment(self, seed, epoch, rank, first_batch)


class EpochAugment:
    """One epoch's augmentation, batch after batch: call it on each training batch in order. A resumed
    epoch starts at `first_batch`, the index of the first batch it still has to train."""

    def __init__(self, augment: Augment, seed: int, epoch: int, rank: int, first_batch: int = 0):
        self.augment, self.seed, self.epoch, self.rank, self.batch = augment, seed, epoch, rank, first_batch

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.augment.active:
            return images
        generator = batch_generator(self.seed, self.epoch, self.rank, self.batch)
        self.batch += 1
        return self.augment(images, generator)


def build_augment(pad: int, hflip: bool, vflip: bool, transpose: bool, cutout: int, scale: float = 1.0, *,
                  mean: Sequence[float], input_shape: tuple[int, int, int]) -> Augment:
    """The augmentation for data of `input_shape` (C, H, W) normalised by `mean` (0..1, per channel), checked
    to apply to it."""
    augment = Augment(pad=pad, hflip=hflip, vflip=vflip, transpose=transpose, cutout=cutout,
                      fill=tuple(int(round(255 * m)) for m in mean), scale=scale)
    augment.check(input_shape[1], input_shape[2])
    return augment
