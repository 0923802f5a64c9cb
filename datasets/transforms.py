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

from datasets import guards, tiff, values
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
    guards.require_regular(path)  # a FIFO would hang np.load's open()
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


# PIL modes holding more than 8 bits per pixel, which convert("L") would clip at 255 (a 16-bit PNG opens
# as I;16, older Pillow gave I): their values are scaled to 8 bits by their depth instead.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_WIDE_MODES = (*_SIXTEEN_BIT_MODES, "I", "F")


def load_image(path: str | Path, channels: int, keep_grey: bool = False) -> np.ndarray:
    """Decode an image of any PIL mode to uint8 (H, W, C) with the requested channels (1 = grey, 3 = RGB).

    High-depth grey images are scaled, not clipped: 16-bit values (I;16, and I within 0..65535) by
    255/65535; wider integers (I) and floats (F) by the image's own range, NaN and infinity refused.
    keep_grey: a grey file (GREY_MODES, or a high-depth one) stays (H, W, 1) even for channels=3; the caller
    repeats it."""
    guards.require_regular(path)  # a FIFO would hang PIL's open()
    with Image.open(path) as img:
        if img.mode in _WIDE_MODES:
            grey = _wide_to_uint8(np.asarray(img), img.mode, path)[:, :, None]
            return grey if keep_grey else to_channels(grey, channels)
        mode = "L" if channels == 1 or (keep_grey and img.mode in GREY_MODES) else "RGB"
        # convert() to the mode a file already has is a copy of the whole image: skipping it keeps a decoding
        # thread at two copies of its file (PIL's and the array), not three (1 MiB less per 1024^2 grey PNG).
        converted = img if img.mode == mode else img.convert(mode)
        array = np.array(converted)  # a writable copy: torch refuses to share read-only buffers
    return array[:, :, None] if array.ndim == 2 else array


def _wide_to_uint8(array: np.ndarray, mode: str, path) -> np.ndarray:
    stats = values.array_stats(array, path)
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and stats.low >= 0 and stats.high <= 65535):
        return values.Scale(0.0, 65535.0)(array)
    return values.rule_scale([stats])(array)


def image_header(path: str | Path) -> tuple[int, int, bool]:
    """(height, width, grey) of an image or .npy array, read from its header without decoding the pixels.
    grey: one value per pixel, which dataset.channels=3 repeats: a grey PIL mode (GREY_MODES) or a deep one
    (16-bit, I, F), an array (H, W) or (H, W, 1), or a tiled TIFF of one sample (plus alpha)."""
    if is_array_file(path):
        shape = open_array(path).shape
        return shape[0], shape[1], len(shape) == 2 or shape[2] == 1
    if tiff.is_tiff(path) and (tiled := tiff.opened(path)) is not None:  # is_tiff refuses FIFOs, unopened
        # Read by window (datasets/tiff.py): PIL would refuse a slide's header size as a decompression bomb.
        return *tiled.shape, tiled.channels == 1
    with Image.open(path) as img:
        return img.height, img.width, img.mode in GREY_MODES or img.mode in _WIDE_MODES


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image or .npy array, read from its header without decoding the pixels."""
    return image_header(path)[:2]


def array_scale(array: np.ndarray, path, scale: values.Scale | None = None):
    """How one .npy file's values become 0..255, decided once per file so every crop of it scales alike:
    uint8 and bool as they are, anything else by `scale` (found by a scan over the data set) or, without
    one, by the file's own range (dataset.value_range=per_file; see datasets/values.py)."""
    if values.is_pixels(array.dtype):
        return values.pixels
    return scale or values.rule_scale([values.array_stats(array, path)])


def scan_arrays(paths, setting, windows: dict | None = None) -> tuple[dict, str | tuple[float, float]]:
    """dataset.value_range resolved over the .npy files among `paths` (memory-mapped, one at a time):
    {path: Scale} for every array that needs one, and per_file or the (low, high) they all use.
    `windows` ({path: regions (y0, y1, x0, x1)}, crops.CropTable.windows): a file listed there is scanned over
    those regions only, so one 10x10 crop of a 14 GB array reads ~10 rows of it, not 14 GB."""
    problems: list[str] = []

    def opened():
        for path in dict.fromkeys(p for p in paths if is_array_file(p)):
            try:
                array = open_array(path)
                yield path, array if windows is None or path not in windows else window_views(array, windows[path])
            except (*DECODE_ERRORS, UserError) as e:
                problems.append(f"{path}: {e}")

    return values.resolve(values.parse_value_range(setting), opened(), problems)


def window_views(array: np.ndarray, boxes: np.ndarray) -> list[np.ndarray]:
    """Views of a memory-mapped array, one per region (y0, y1, x0, x1; y1 -1 for the full height); nothing is
    read. Regions covering half the file or more give the whole array instead: one sequential pass then reads
    less than the overlapping regions would."""
    height = array.shape[0]
    y1 = np.where(boxes[:, 1] < 0, height, boxes[:, 1])
    area = int(((y1 - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).sum())
    if area * 2 >= array.shape[0] * array.shape[1]:
        return [array]
    return [array[y0:y_end, x0:x1] for (y0, _, x0, x1), y_end in zip(boxes.tolist(), y1.tolist())]


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


def to_tensor(hwc: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 (h, w, C) -> uint8 tensor (C, height, width); resized (bilinear, antialiased) only when needed."""
    # A whole memory-mapped .npy arrives read-only; torch needs its own writable copy then, and only then.
    chw = torch.from_numpy(np.require(hwc, requirements=["C", "W"])).permute(2, 0, 1)
    if chw.shape[1:] != (height, width):
        # torch's own antialiased bilinear uint8 kernel, the one torchvision's resize calls for a CPU uint8
        # tensor (tests/test_crops.py checks them equal); not through torchvision, whose import loads torch._dynamo:
        # ~1.2 CPU-s at the start of evaluate.py and predict.py (training loads it anyway, for torch's optimisers).
        chw = F.interpolate(chw.unsqueeze(0), size=(height, width), mode="bilinear", antialias=True)[0]
    return chw.contiguous()


def resize_many(regions: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 (n, h, w, C) regions of one size -> uint8 (n, C, height, width), each one equal to what to_tensor
    gives for it alone (the same antialiased bilinear uint8 kernel, called once for the whole batch)."""
    n, h, w, c = regions.shape
    batch = torch.from_numpy(regions)
    if (h, w) == (height, width):
        return batch.permute(0, 3, 1, 2)
    # The uint8 kernel is vectorised over 4 interleaved channels (RGBA): one grey channel leaves 3/4 of it idle
    # (measured ~4x slower per crop). So 4 grey crops travel as the 4 channels of one image; channels never mix.
    # Below 4 crops the packing's padding costs more than it saves (us of CPU per crop, 1 thread, plain vs
    # packed: 1 crop 24 vs 45, 2 crops 17 vs 23, 3 crops 15 vs 16, 4 crops 13 vs 10.5, 8 crops 12.6 vs 8).
    if c != 1 or n < 4:
        return F.interpolate(batch.permute(0, 3, 1, 2), size=(height, width), mode="bilinear", antialias=True)
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
