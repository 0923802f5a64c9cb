"""Sliding windows over a whole image: where they go (Grid), and the batches of model inputs they give, read by
region in a background thread so that reading and resizing overlap the model's work.

A window of `window` source pixels becomes one model input, resized exactly as training resized its crops
(datasets.transforms.same_size_regions + resize_many, the code crops.extract cuts with). Windows step by
`stride`; the grid is centred, so the pixels no window reaches (less than one stride) are split between the
two edges. A strip-form run (crop CSV rows `path,start,end,label`: columns over the full height) slides along
columns only: its windows take the image's full height, and the grid has one row, a class track.

Windows are never all in memory: the image is read in blocks of a few grid rows and columns (at most
BLOCK_BYTES of source pixels), each block's windows are cut, resized and handed over a queue of QUEUE_DEPTH
batches, and the producer waits while the queue is full. Peak memory is then the blocks and batches in flight
and the output grid, whatever the image's size (plus a decoded image for formats read whole: PNG, JPEG).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from datasets.crops import REGION_BYTES_PER_CALL
from datasets.transforms import resize_many, same_size_regions, to_channels
from errors import UserError

# Source bytes read at once: a block of 256 grid windows of 128 x 128 RGB is 12 MiB; larger blocks save
# little (a tiled TIFF's tiles are decoded once per block either way, bar the window overlap at block edges).
BLOCK_BYTES = 32 * 2**20
QUEUE_DEPTH = 3  # batches prepared ahead of the model: one being filled, two waiting
_DONE = object()


def pair(value, key: str) -> tuple[int, int] | None:
    """A window or stride setting: null, N (N x N) or [HEIGHT, WIDTH], in source pixels, each >= 1."""
    if value is None:
        return None
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value, value]
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise UserError(f"{key}={value}: give a whole number of source pixels N (N x N) or [HEIGHT, WIDTH], each >= 1")
    return values[0], values[1]


@dataclass(frozen=True)
class Grid:
    """Windows (window[0] x window[1] source pixels, (height, width)) stepping by `stride`, the first one's
    top-left corner at `origin` (row, column); rows x cols of them."""

    window: tuple[int, int]
    stride: tuple[int, int]
    origin: tuple[int, int]
    rows: int
    cols: int

    def __len__(self) -> int:
        return self.rows * self.cols

    def tops(self, rows: np.ndarray) -> np.ndarray:
        return self.origin[0] + rows * self.stride[0]

    def lefts(self, cols: np.ndarray) -> np.ndarray:
        return self.origin[1] + cols * self.stride[1]

    def as_dict(self) -> dict:
        return {"window": list(self.window), "stride": list(self.stride), "origin": list(self.origin),
                "rows": self.rows, "cols": self.cols}


def windows_for(box_size: Sequence | None, window, stride, checkpoint: str) -> tuple[tuple | None, tuple | None, bool]:
    """(window, stride, strip) from the settings and the checkpoint's stored box size: window (height or None
    for the image's full height, width), stride likewise (None: half the window); strip for strip-form runs."""
    strip = box_size is not None and box_size[0] is None
    size = pair(window, "window")
    if size is None and box_size is None:
        raise UserError(f"checkpoint={checkpoint} stores no training box size (written before predict.py, or not "
                        "trained on a crop CSV): give window=N or window=[HEIGHT,WIDTH] in source pixels")
    if strip:
        if window is not None and not isinstance(window, int):
            raise UserError(f"window={window}: the run was trained on strip-form crops (full-height columns), so its "
                            "window is a width: give window=N in source pixels")
        width = size[1] if size is not None else box_size[1]
        step = pair(stride, "stride")
        if stride is not None and not isinstance(stride, int):
            raise UserError(f"stride={stride}: a strip-form run slides along columns only: give stride=N in source "
                            "pixels")
        return (None, width), (None, step[1] if step else max(1, width // 2)), True
    size = size or (box_size[0], box_size[1])
    step = pair(stride, "stride") or (max(1, size[0] // 2), max(1, size[1] // 2))
    return size, step, False


def grid(shape: tuple[int, int], window: tuple, stride: tuple, path) -> Grid:
    """The centred grid of windows over an image of `shape` (height, width); window/stride height None: the
    image's full height, one grid row."""
    height, width = shape
    window = (height if window[0] is None else window[0], window[1])
    stride = (height if stride[0] is None else stride[0], stride[1])
    if window[0] > height or window[1] > width:
        raise UserError(f"window={window[1]}x{window[0]} (width x height) is larger than {path}, which is "
                        f"{width}x{height}: give a smaller window= (in source pixels)")
    rows, cols = (height - window[0]) // stride[0] + 1, (width - window[1]) // stride[1] + 1
    # Centred: the pixels left over (fewer than a stride) are shared between the two edges.
    origin = ((height - window[0] - (rows - 1) * stride[0]) // 2, (width - window[1] - (cols - 1) * stride[1]) // 2)
    return Grid(window, stride, origin, rows, cols)


def blocks(g: Grid, channels: int) -> Iterator[tuple[slice, slice]]:
    """Grid rows and columns read together: as many as fit BLOCK_BYTES of source pixels (at least one window),
    whole grid rows first, row by row."""
    def span(n: int, axis: int) -> int:
        return (n - 1) * g.stride[axis] + g.window[axis]

    cols = g.cols
    while cols > 1 and span(1, 0) * span(cols, 1) * channels > BLOCK_BYTES:
        cols = math.ceil(cols / 2)
    rows = 1
    while rows < g.rows and span(rows * 2, 0) * span(cols, 1) * channels <= BLOCK_BYTES:
        rows *= 2
    for r in range(0, g.rows, rows):
        for c in range(0, g.cols, cols):
            yield slice(r, min(r + rows, g.rows)), slice(c, min(c + cols, g.cols))


def _in_channels(region: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (h, w, C) in the model's channels, a grey region kept as one channel (repeated on the device)."""
    if region.shape[2] == 1 or region.shape[2] == channels:
        return region
    return to_channels(region, channels)


def batches(reader, g: Grid, input_shape: tuple[int, int, int], batch_size: int,
            read: Callable[[int, int, int, int], np.ndarray] | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(flat grid indices, uint8 (n, C, H, W) model inputs) for every window, n = batch_size but for the last;
    C is 1 for a grey source (the caller repeats it). `reader`: a datasets/regions.py reader (shape, channels,
    read(top, bottom, left, right), to_uint8(region)); `read` replaces its read (one keeping tiles)."""
    read = read or reader.read
    channels, height, width = input_shape
    pending_index: list[np.ndarray] = []
    pending: list[torch.Tensor] = []
    held = 0
    for rows, cols in blocks(g, reader.channels):
        top, left = int(g.tops(np.array(rows.start))), int(g.lefts(np.array(cols.start)))
        bottom = int(g.tops(np.array(rows.stop - 1))) + g.window[0]
        right = int(g.lefts(np.array(cols.stop - 1))) + g.window[1]
        block = _in_channels(reader.to_uint8(read(top, bottom, left, right)), channels)
        r, c = np.meshgrid(np.arange(rows.start, rows.stop), np.arange(cols.start, cols.stop), indexing="ij")
        r, c = r.reshape(-1), c.reshape(-1)
        # Cut and resized in calls of at most REGION_BYTES_PER_CALL, as crops are: 256 windows of 256 x 256 RGB
        # would otherwise copy 48 MB at once.
        per_call = min(batch_size, max(4, REGION_BYTES_PER_CALL // (g.window[0] * g.window[1] * block.shape[2])))
        for part in range(0, len(r), per_call):
            rr, cc = r[part:part + per_call], c[part:part + per_call]
            cut = same_size_regions(block, g.tops(rr) - top, g.lefts(cc) - left, *g.window)
            pending.append(resize_many(cut, height, width))
            pending_index.append(rr * g.cols + cc)
            held += len(rr)
            while held >= batch_size:
                merged, index = torch.cat(pending), np.concatenate(pending_index)
                yield index[:batch_size], merged[:batch_size].contiguous()
                pending, pending_index = [merged[batch_size:]], [index[batch_size:]]
                held -= batch_size
        del block  # before the next one is read: one block in memory at a time
    if held:
        yield np.concatenate(pending_index), torch.cat(pending).contiguous()


def in_background(items: Iterator, depth: int = QUEUE_DEPTH) -> Iterator:
    """The items of `items`, produced by a background thread at most `depth` ahead. An error in the thread
    is raised here; leaving the loop early (an error in the consumer) stops the thread at its next item."""
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, which raises it with its traceback
            put(e)

    thread = threading.Thread(target=produce, name="predict-reader", daemon=True)
    thread.start()
    try:
        while (item := handoff.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
