"""Open a source file and read boxes of it without decoding the rest: the one reader behind crops, preview and
sliding windows over large images.

    reader = open_regions(path, level=0)
    reader.levels    [(height, width), ...], level 0 (full resolution) first; one entry where there is no pyramid
    reader.shape     (height, width) of the opened level
    reader.channels  samples per pixel: 1 grey, 3 RGB; a TIFF or .npy may hold 2 (grey + alpha) or 4 (RGBA)
    reader.dtype     what read() returns: uint8 or uint16 for most images, a .npy's own type
    reader.read(top, bottom, left, right)  the box [top, bottom) x [left, right) of the opened level, in its
                     pixels, as (bottom - top, right - left, channels) of reader.dtype
    reader.to_uint8(region)  such a box as 0..255, by the rules training uses (datasets/values.py)

Shape, channels, dtype and levels come from the file's header; what a read costs depends on the kind of file:
  .npy          memory-mapped (transforms.open_array): a box pages in the rows it touches; its values as stored,
                mapped to 0..255 by the value range given as `scale` (dataset.value_range), else the file's own
  tiled TIFF    datasets/tiff.py: a box decodes the tiles it touches; every pyramid level can be opened.
                16-bit samples map to 0..255 by 255/65535, wider or float ones by the level's own range
  other images  PNG, JPEG, BMP, strip-organised TIFF, ...: PIL decodes the file once, whole, when it is opened,
                to uint8 (transforms.load_image: 16-bit scaled, grey kept as one channel); level 0 only
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from datasets import tiff, values
from datasets.transforms import array_scale, is_array_file, load_image, open_array
from datasets.values import Scale


class ArrayRegions:
    """Boxes of one array held whole: a memory-mapped .npy (reading a box pages in its rows) or an image PIL
    decoded. read() returns views."""

    def __init__(self, array: np.ndarray, path: Path, scale: Callable | None = None):
        self.path, self.array, self._scale = path, array if array.ndim == 3 else array[:, :, None], scale
        self._decided = False
        self.shape = self.array.shape[:2]
        self.levels, self.channels, self.dtype = [self.shape], self.array.shape[2], self.array.dtype

    def read(self, top: int, bottom: int, left: int, right: int) -> np.ndarray:
        height, width = self.shape
        if not (0 <= top < bottom <= height and 0 <= left < right <= width):
            raise ValueError(f"{self.path}: box rows {top}..{bottom}, columns {left}..{right} is outside the "
                             f"{width}x{height} (width x height) file")
        return self.array[top:bottom, left:right]

    def to_uint8(self, region: np.ndarray) -> np.ndarray:
        if not self._decided:  # on first use: a .npy without a given range scans itself once
            # uint8 and bool as they are, whatever range was given, as training's crops map them (an image-only
            # run's checkpoint holds the default [0, 1], which would turn every pixel above 1 into 255).
            self._scale, self._decided = array_scale(self.array, self.path, self._scale), True
        return self._scale(region)


def open_regions(path: str | Path, level: int = 0, *, scale: Scale | None = None, channels: int = 3,
                 keep_grey: bool = True) -> ArrayRegions | tiff.TiledTiff:
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
