"""Decode images and arrays into the one item format every dataset yields: a uint8 tensor (C, H, W).

Normalisation is not here: it runs on whole batches on the training device (training/loop.py), so the
same uint8 data feeds every loader mode and per-item work stays at decode + crop + resize.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

from errors import UserError

NPY_SUFFIX = ".npy"
# ITU-R 601-2 luma weights, the ones PIL uses for RGB -> L, so a grey .npy matches a grey PNG.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# What a missing, broken or hostile file raises while being opened or decoded: PIL raises OSError (truncated,
# unidentified), SyntaxError (broken PNG chunks) or DecompressionBombError; numpy raises ValueError (bad
# header, pickles, a file shorter than its header says).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# PIL modes whose RGB conversion repeats one grey value (alpha dropped): such a file can be held and resized as
# one channel and repeated afterwards, with the same result as converting it to RGB first, at a third of the work.
GREY_MODES = ("1", "L", "LA")


def is_array_file(path: str | Path) -> bool:
    return str(path).lower().endswith(NPY_SUFFIX)


def open_array(path: str | Path) -> np.ndarray:
    """Memory-map a .npy file: only the rows a crop touches are read from disk.

    allow_pickle=False: loading a pickle runs code the file chooses, so object arrays are refused unread.
    """
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise UserError(
            f"{path}: cannot load as a plain .npy array ({e}); pickled and object arrays are refused: "
            "save a numeric array with np.save"
        ) from e
    if array.dtype.kind not in "biuf" or array.ndim not in (2, 3):
        raise UserError(f"{path}: expected a numeric array (H, W) or (H, W, C), got {array.dtype} {array.shape}")
    return array


def load_image(path: str | Path, channels: int, keep_grey: bool = False) -> np.ndarray:
    """Decode an image of any PIL mode to uint8 (H, W, C) with the requested channels (1 = grey, 3 = RGB).

    keep_grey: a grey file (GREY_MODES) stays (H, W, 1) even for channels=3; the caller repeats it.
    """
    with Image.open(path) as img:
        grey = channels == 1 or (keep_grey and img.mode in GREY_MODES)
        converted = img.convert("L" if grey else "RGB")
    array = np.array(converted)  # a writable copy: torch refuses to share read-only buffers
    return array[:, :, None] if array.ndim == 2 else array


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image or .npy array, read from its header without decoding the pixels."""
    if is_array_file(path):
        shape = open_array(path).shape
        return shape[0], shape[1]
    with Image.open(path) as img:
        return img.height, img.width


def uint8_scaler(array: np.ndarray):
    """How to bring one file's values to 0..255, decided once per file so every crop of it scales alike.

    uint8 stays as is; bool becomes 0/255; floats within [0, 1] are multiplied by 255; integers within
    0..255 are cast; anything else (dB spectrograms, raw counts) is min-max scaled over the whole file.
    """
    if array.dtype == np.uint8:
        return lambda a: np.asarray(a)
    if array.dtype == np.bool_:
        return lambda a: np.asarray(a, dtype=np.uint8) * np.uint8(255)
    low, high = float(np.min(array)), float(np.max(array))
    if array.dtype.kind == "f" and low >= 0.0 and high <= 1.0:
        return lambda a: np.rint(np.asarray(a, dtype=np.float32) * 255.0).astype(np.uint8)
    if array.dtype.kind in "iu" and low >= 0 and high <= 255:
        return lambda a: np.asarray(a).astype(np.uint8)
    span = (high - low) or 1.0
    return lambda a: np.rint((np.asarray(a, dtype=np.float64) - low) * (255.0 / span)).astype(np.uint8)


def to_channels(hwc: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (H, W, C) -> (H, W, channels): grey repeats to RGB, RGB(A) becomes luma, alpha is dropped."""
    have = hwc.shape[2]
    if have == channels:
        return hwc
    if channels == 3 and have == 1:
        return np.repeat(hwc, 3, axis=2)
    if channels == 3 and have == 4:
        return hwc[:, :, :3]
    if channels == 1 and have in (3, 4):
        return np.rint(hwc[:, :, :3].astype(np.float32) @ _LUMA)[:, :, None].astype(np.uint8)
    raise UserError(f"cannot turn {have} channels into {channels}: use dataset.channels=1 or 3 with 1, 3 or 4 channels")


def array_region(array: np.ndarray, rows: slice, cols: slice, scale, channels: int) -> np.ndarray:
    """Cut a region of a (H, W) or (H, W, C) array and return uint8 (h, w, channels)."""
    region = scale(array[rows, cols])
    if region.ndim == 2:
        region = region[:, :, None]
    return to_channels(region, channels)


def to_tensor(hwc: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 (h, w, C) -> uint8 tensor (C, height, width); resized (bilinear, antialiased) only when needed."""
    # A whole memory-mapped .npy arrives read-only; torch needs its own writable copy then, and only then.
    chw = torch.from_numpy(np.require(hwc, requirements=["C", "W"])).permute(2, 0, 1)
    if chw.shape[1:] != (height, width):
        chw = TF.resize(chw, [height, width], antialias=True)
    return chw.contiguous()


def resize_many(regions: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 (n, h, w, C) regions of one size -> uint8 (n, C, height, width), each one equal to what to_tensor
    gives for it alone (the same antialiased bilinear uint8 kernel, called once for the whole batch)."""
    n, h, w, c = regions.shape
    batch = torch.from_numpy(regions)
    if (h, w) == (height, width):
        return batch.permute(0, 3, 1, 2)
    if c != 1:
        return F.interpolate(batch.permute(0, 3, 1, 2), size=(height, width), mode="bilinear", antialias=True)
    # The uint8 kernel is vectorised over 4 interleaved channels (RGBA): one grey channel leaves 3/4 of it idle
    # (measured ~4x slower per crop). So 4 grey crops travel as the 4 channels of one image; channels never mix.
    pad = -n % 4
    if pad:
        batch = torch.cat([batch, batch[-1:].expand(pad, -1, -1, -1)])  # filler, dropped after
    packed = batch.view(-1, 4, h, w).contiguous(memory_format=torch.channels_last)
    resized = F.interpolate(packed, size=(height, width), mode="bilinear", antialias=True)
    return resized.contiguous().view(-1, 1, height, width)[:n]


def same_size_regions(hwc: np.ndarray, y0: np.ndarray, x0: np.ndarray, h: int, w: int) -> np.ndarray:
    """The n regions [y0, y0 + h) x [x0, x0 + w) of a uint8 (H, W, C) array as one (n, h, w, C) copy."""
    rows, cols, c = hwc.shape
    s_row, s_col, s_chan = hwc.strides
    # Every h x w window of the array, as a view; indexing it copies the n windows wanted, row by row.
    windows = np.lib.stride_tricks.as_strided(hwc, shape=(rows - h + 1, cols - w + 1, h, w, c),
                                              strides=(s_row, s_col, s_row, s_col, s_chan), writeable=False)
    return windows[y0, x0]


class FileSource:
    """One file opened for cutting regions: an image decoded whole, or a .npy array memory-mapped (only the
    rows a region touches are read). `scaler` reuses a .npy file's scaling decided earlier.

    keep_grey: a grey image stays one channel (see load_image); region() still returns `channels`, regions()
    returns one channel for such a file, to be repeated by whoever stores it (broadcasting does).
    """

    def __init__(self, path: str | Path, channels: int, scaler=None, keep_grey: bool = False):
        self.channels = channels
        self.is_array = is_array_file(path)
        if self.is_array:
            self.array = open_array(path)
            self.scale = scaler or uint8_scaler(self.array)
        else:
            self.array = load_image(path, channels, keep_grey)
            self.scale = lambda a: a

    def region(self, rows: slice, cols: slice, height: int, width: int) -> torch.Tensor:
        """uint8 (C, height, width) of array[rows, cols], resized only when its size differs."""
        return to_tensor(array_region(self.array, rows, cols, self.scale, self.channels), height, width)

    @property
    def shape(self) -> tuple[int, int]:
        return self.array.shape[0], self.array.shape[1]

    def regions(self, y0: np.ndarray, x0: np.ndarray, h: int, w: int, height: int, width: int) -> torch.Tensor:
        """uint8 (n, C, height, width) of n regions of one size h x w, each equal to region() of it; C is 1 for
        a grey image kept as one channel, else `channels`."""
        if self.is_array:  # memory-mapped: cut and scale only the rows each region touches
            return torch.stack([self.region(slice(y, y + h), slice(x, x + w), height, width)
                                for y, x in zip(y0.tolist(), x0.tolist())])
        return resize_many(same_size_regions(self.array, y0, x0, h, w), height, width)


class LoadItem:
    """A picklable per-file loader for torchvision's folder datasets: file -> uint8 (C, H, W)."""

    def __init__(self, height: int, width: int, channels: int):
        self.height, self.width, self.channels = height, width, channels

    def __call__(self, path: str) -> torch.Tensor:
        return FileSource(path, self.channels).region(slice(None), slice(None), self.height, self.width)
