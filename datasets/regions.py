"""Open a source file and read boxes of it without decoding the rest: the one reader behind crops, preview and
sliding windows over large images.

    reader = open_regions(path, level=0)
    reader.levels    [(height, width), ...], level 0 (full resolution) first; one entry where there is no pyramid
    reader.shape     (height, width) of the opened level
    reader.channels  samples per pixel: 1 grey (a TIFF's grey + alpha too), 3 RGB, 4 RGBA; a .npy its own count
    reader.dtype     what read() returns: uint8 or uint16 for most images, a .npy's own type
    reader.read(top, bottom, left, right)  the box [top, bottom) x [left, right) of the opened level, in its
                     pixels, as (bottom - top, right - left, channels) of reader.dtype
    reader.to_uint8(region)  such a box as 0..255, by the rules training uses (datasets/values.py)

    FileSource(path, channels, level=level)   the same boxes as the model's uint8 (C, H, W) tensors, resized,
                     in the configured channels; its boxes are level-0 pixels (a crop CSV's coordinates),
                     scaled to the opened level by scale_boxes

Shape, channels, dtype and levels come from the file's header; what a read costs depends on the kind of file:
  .npy          memory-mapped (transforms.open_array): a box pages in the rows it touches; its values as stored,
                mapped to 0..255 by the value range given as `scale` (dataset.value_range), else the file's own
  tiled TIFF    datasets/tiff.py: a box decodes the tiles it touches; every pyramid level can be opened.
                16-bit samples map to 0..255 by 255/65535, wider or float ones by the level's own range
  other images  PNG, JPEG, BMP, strip-organised TIFF, ...: PIL decodes the file once, whole, when it is opened,
                to uint8 (transforms.load_image: 16-bit scaled, grey kept as one channel); level 0 only

Pyramid levels: a box given in level-0 pixels maps to level L by that level's size ratio per axis, rounded
outward (top and left down, bottom and right up, at least one pixel): on a level 4x smaller a 256-pixel box
becomes 64 pixels, so a crop CSV made on the full-resolution image cuts the same places at any level.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from datasets import guards, tiff, values
from datasets.transforms import (DECODE_ERRORS, array_scale, is_array_file, load_image, open_array, resize_many,
                                 same_size_regions, to_channels, to_tensor)
from datasets.values import Scale
from errors import UserError

# Decoded tiles a FileSource keeps for the boxes cut after them: ~2 rows of 256 x 256 grey tiles across a
# 50,000-pixel slide, so crops cut in position order decode each tile once. One per cutting thread.
TILE_CACHE_BYTES = 32 * 2**20


class ArrayRegions:
    """Boxes of one array held whole: a memory-mapped .npy (reading a box pages in its rows) or an image PIL
    decoded. read() returns views."""

    def __init__(self, array: np.ndarray, path: Path, scale: Callable | None = None):
        self.path, self.array = path, array if array.ndim == 3 else array[:, :, None]
        self._given, self._scale = scale, None  # the range given; the mapping, once decided
        self.shape = self.array.shape[:2]
        self.levels, self.channels, self.dtype = [self.shape], self.array.shape[2], self.array.dtype

    def read(self, top: int, bottom: int, left: int, right: int, tiles: tiff.TileCache | None = None) -> np.ndarray:
        """A view of the box (`tiles` is for tiled readers: an array held whole has none)."""
        height, width = self.shape
        if not (0 <= top < bottom <= height and 0 <= left < right <= width):
            raise ValueError(f"{self.path}: box rows {top}..{bottom}, columns {left}..{right} is outside the "
                             f"{width}x{height} (width x height) file")
        # A .npy box is read and mapped through float64, 8 bytes a value: held to max_image_pixels as PIL
        # holds whole images, before a byte is read.
        guards.check_region_pixels(bottom - top, right - left)
        return self.array[top:bottom, left:right]

    def to_uint8(self, region: np.ndarray) -> np.ndarray:
        return self.scale()(region)

    def scale(self) -> Callable[[np.ndarray], np.ndarray]:
        """How values become 0..255: decided on first use, so a .npy without a given range scans itself once
        (transforms.array_scale), and only when its pixels are wanted. uint8 and bool as they are, whatever range
        was given, as training's crops map them (an image-only run's checkpoint holds the default [0, 1], which
        would turn every pixel above 1 into 255)."""
        if self._scale is None:
            self._scale = array_scale(self.array, self.path, self._given)
        return self._scale


Regions = ArrayRegions | tiff.TiledTiff  # what open_regions gives: the interface in the module docstring


def open_regions(path: str | Path, level: int = 0, *, scale: Scale | None = None, channels: int = 3,
                 keep_grey: bool = True) -> Regions:
    """A reader of `path`'s pyramid level `level` (see the module docstring). `scale`: how a .npy's values map
    to 0..255 (from the data set's value-range scan); `channels`/`keep_grey`: how PIL converts an image it
    decodes (transforms.load_image). A level the file does not have is a UserError naming the file."""
    path = Path(path)
    if is_array_file(path):
        reader = ArrayRegions(open_array(path), path, scale)
    elif tiff.is_tiff(path) and (tiled := tiff.opened(path, level)) is not None:
        return tiled
    elif level == 0:  # checked before PIL decodes anything
        reader = ArrayRegions(load_image(path, channels, keep_grey), path, values.pixels)
    if level != 0:
        raise tiff.level_error(path, level, 1)
    return reader


def scale_boxes(boxes: np.ndarray, level0: tuple, shape: tuple) -> np.ndarray:
    """int64 boxes (n, 4: top, bottom, left, right) in level-0 pixels as boxes of a level of size `shape`,
    rounded outward, each at least one pixel and within the level. level0 and shape are (height, width),
    numbers or one per box."""
    boxes = np.asarray(boxes, dtype=np.int64)
    (h0, w0), (h, w) = (np.asarray(side, dtype=np.int64) for side in level0), (np.asarray(side, dtype=np.int64)
                                                                             for side in shape)
    top, left = boxes[..., 0] * h // h0, boxes[..., 2] * w // w0
    bottom = np.clip(-(-boxes[..., 1] * h // h0), top + 1, h)
    right = np.clip(-(-boxes[..., 3] * w // w0), left + 1, w)
    return np.stack([np.minimum(top, h - 1), bottom, np.minimum(left, w - 1), right], axis=-1)


def window_reader(path: str | Path, level: int = 0) -> tiff.TiledTiff | None:
    """The tiled reader of `path` where it is read by window, else None (a .npy, an image PIL decodes whole,
    or a file whose header does not read: opening it reports that)."""
    try:
        return tiff.opened(path, level) if not is_array_file(path) and tiff.is_tiff(path) else None
    except (*DECODE_ERRORS, UserError):
        return None


class FileSource:
    """One file opened for cutting regions as the model's uint8 (C, height, width): a tiled TIFF read tile by
    tile, a .npy array memory-mapped (only the rows a region touches are read), or an image decoded whole.
    Regions are given in level-0 pixels and cut from pyramid level `level` (scale_boxes). `scale` maps a .npy
    file's values as a scan of the data set decided; without one, by the file's own range.

    keep_grey: a grey image stays one channel (see load_image); region() still returns `channels`, regions()
    returns one channel for such a file, to be repeated by whoever stores it (broadcasting does).
    """

    def __init__(self, path: str | Path, channels: int, scale: Scale | None = None, keep_grey: bool = False,
                 level: int = 0):
        self.channels = channels
        self.reader = open_regions(path, level, scale=scale, channels=channels, keep_grey=keep_grey)
        self.scale = self.reader.scale()  # a .npy without a given range scans itself here, once
        self.windowed = isinstance(self.reader, tiff.TiledTiff)  # read tile by tile: regions are cut one by one
        self.tiles = tiff.TileCache(TILE_CACHE_BYTES) if self.windowed else None

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) at level 0: the coordinates regions are given in."""
        return self.reader.levels[0]

    def region(self, rows: slice, cols: slice, height: int, width: int) -> torch.Tensor:
        """uint8 (C, height, width) of the file's [rows, cols] (level-0 pixels), resized only when its size differs."""
        (top, bottom, _), (left, right, _) = rows.indices(self.shape[0]), cols.indices(self.shape[1])
        if self.reader.shape != self.shape:
            top, bottom, left, right = scale_boxes([top, bottom, left, right], self.shape, self.reader.shape).tolist()
        region = self.scale(self.reader.read(top, bottom, left, right, self.tiles))
        return to_tensor(to_channels(region, self.channels), height, width)

    def boxes(self, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
        """uint8 (n, C, height, width) of n boxes (int64 rows top, bottom, left, right in level-0 pixels), each equal
        to region() of it; C is 1 for a grey file (to be repeated by whoever stores it), else `channels`. Boxes are
        read in the order given, so a tiled file's tile cache serves neighbours, then resized a size at a time."""
        boxes = np.asarray(boxes, dtype=np.int64)
        if self.reader.shape != self.shape:
            boxes = scale_boxes(boxes, self.shape, self.reader.shape)
        channels = 1 if self.reader.channels == 1 else self.channels
        pixels = [to_channels(self.scale(self.reader.read(*box, self.tiles)), channels) for box in boxes.tolist()]
        out = np.empty((len(boxes), channels, height, width), dtype=np.uint8)
        # n boxes of one size are one kernel call (4 grey boxes per call, transforms.resize_many), not n calls of
        # ~30 us of CPU each plus torchvision's per-call overhead.
        sizes = np.stack([boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]], axis=1)
        by_size = np.lexsort((sizes[:, 1], sizes[:, 0]))
        starts = np.flatnonzero(np.any(np.diff(sizes[by_size], axis=0) != 0, axis=1)) + 1
        for group in np.split(by_size, starts):
            out[group] = resize_many(np.stack([pixels[k] for k in group.tolist()]), height, width).numpy()
        return out

    def overview(self, longest: int) -> torch.Tensor:
        """The whole file as uint8 (C, h, w), about `longest` pixels on its longer side or more (never fewer
        than the file has): a tiled TIFF from the smallest pyramid level at least that large, read band by band
        at a stride (tiff.TiledTiff.strided), so level 0 is never held whole; other files as region() of all."""
        if not self.windowed:
            return self.region(slice(None), slice(None), *self.shape)
        levels = self.reader.levels
        level = max([i for i, side in enumerate(levels) if max(side) >= longest], default=len(levels) - 1)
        reader = tiff.opened(self.reader.path, level)
        image = to_channels(self.scale(reader.strided(max(1, max(reader.shape) // longest))), self.channels)
        return to_tensor(image, *image.shape[:2])

    def regions(self, y0: np.ndarray, x0: np.ndarray, h: int, w: int, height: int, width: int) -> torch.Tensor:
        """uint8 (n, C, height, width) of n regions of one size h x w, each equal to region() of it; C is 1 for
        a grey image kept as one channel, else `channels`."""
        if isinstance(self.reader.array, np.memmap) or self.windowed:  # cut and scale only what each region touches
            return torch.stack([self.region(slice(y, y + h), slice(x, x + w), height, width)
                                for y, x in zip(y0.tolist(), x0.tolist())])
        return resize_many(same_size_regions(self.reader.array, y0, x0, h, w), height, width)


class LoadItem:
    """A picklable per-file loader for torchvision's folder datasets: file -> uint8 (C, H, W). `scale`: one
    mapping for every .npy file (a global or given dataset.value_range); None maps each by its own range."""

    def __init__(self, height: int, width: int, channels: int, scale: Scale | None = None):
        self.height, self.width, self.channels, self.scale = height, width, channels, scale

    def __call__(self, path: str) -> torch.Tensor:
        return FileSource(path, self.channels, self.scale).region(slice(None), slice(None), self.height, self.width)
