"""Tiled (and pyramidal) TIFF files read by window: a box costs the tiles it touches, never the whole image.

Why: microscopy slides, satellite scenes and scanned documents are 20,000-100,000 pixels a side, stored as
tiled TIFF (OME-TIFF, BigTIFF, GeoTIFF, SVS). Decoded whole, a 50,000 x 50,000 grey slide is 2.5 GB per
decoding thread, and a per-item read (cache=none) decoded all of it for every 64-pixel crop. tifffile reads the
header (the tile offsets of every level) and imagecodecs decodes one tile at a time (zstd: ~0.1 ms for a
256 x 256 grey tile here, deflate ~0.5 ms), so a crop costs one to four tiles.

TiledTiff(path, level) opens the first image series' pyramid level `level` (0: full resolution; levels come
from SubIFDs or the series' reduced pages, as tifffile lists them) from its header alone. `read(top, bottom,
left, right)` returns that box as (h, w, channels) in the file's sample type (uint8, uint16, ...); segments
are tiles, or strips on a striped lower level. Tiles are read with os.pread on one descriptor, so threads and
forked loader workers share an opened file safely; a TileCache passed to read() keeps decoded tiles that
neighbouring boxes share. `opened(path, level)` keeps a few opened files per process, so a per-item reader
(cache=none) parses a header once, not once per item.

Which files come here is decided by datasets/regions.py: TIFFs whose full-resolution level is tiled, or any
TIFF read at a level above 0. Strip-organised TIFFs at level 0 keep PIL's whole-image path.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from datasets import guards, values
from errors import UserError

# The first bytes of a classic TIFF and a BigTIFF, little- and big-endian.
MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
INSTALL = "pip install tifffile imagecodecs"  # both pinned in requirements.txt
# Opened files kept per process (LRU): each holds its header (8-16 bytes of offsets per tile, 0.6 MB for a
# 50,000-pixel slide in 256-pixel tiles) and one file descriptor.
OPENED_FILES = 16
# Photometric interpretations read as they are: min-is-white (0, inverted), min-is-black (1), RGB (2) and
# YCbCr (6), which JPEG tiles decode to RGB. Palette, CMYK and the rest have no direct grey/RGB reading.
PHOTOMETRICS = (0, 1, 2, 6)


def is_tiff(path: str | Path) -> bool:
    """Whether the file starts as a TIFF or BigTIFF does (whatever its name ends with)."""
    guards.require_regular(path)  # a FIFO would hang open()
    with open(path, "rb") as f:
        return f.read(4) in MAGIC


def _tifffile():
    try:
        import tifffile
    except ImportError:
        raise UserError(f"reading TIFF files needs the tifffile package: {INSTALL}") from None
    return tifffile


class TileCache:
    """Decoded tiles, least recently used first out, up to `budget` bytes: boxes cut in spatial order (crops of
    one file sorted by position) decode each shared tile once. One per thread: it is not locked."""

    def __init__(self, budget: int):
        self.budget, self.held = budget, 0
        self.tiles: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def get(self, key: tuple) -> np.ndarray | None:
        tile = self.tiles.get(key)
        if tile is not None:
            self.tiles.move_to_end(key)
        return tile

    def put(self, key: tuple, tile: np.ndarray) -> None:
        self.tiles[key] = tile
        self.held += tile.nbytes
        while self.held > self.budget and len(self.tiles) > 1:
            self.held -= self.tiles.popitem(last=False)[1].nbytes


class TiledTiff:
    """One pyramid level of a TIFF's first image series, read by window (see the module docstring).

    levels: (height, width) of every level, 0 first; shape: this level's; channels: samples per pixel as read
    (1 grey, also for grey + alpha; 3 RGB; 4 RGBA); dtype: the samples' numpy type (native byte order)."""

    def __init__(self, path: str | Path, level: int = 0):
        self.path, self._fd = Path(path), -1
        tifffile = _tifffile()
        try:
            with tifffile.TiffFile(self.path) as tif:
                series = tif.series[0]
                self.levels = [(_page(s).imagelength, _page(s).imagewidth) for s in series.levels]
                if not 0 <= level < len(self.levels):
                    raise level_error(self.path, level, len(self.levels))
                page = _page(series.levels[level])
                self._describe(page)
        except (tifffile.TiffFileError, IndexError, KeyError) as e:
            raise ValueError(f"not a readable TIFF ({type(e).__name__}: {e})") from None
        self.level = level
        self.shape = self.levels[level]
        self._fd = os.open(self.path, os.O_RDONLY)

    def _describe(self, page) -> None:
        """What reading a box of `page` needs, from its header; unreadable layouts refused in one line."""
        if page.imagedepth > 1 or page.photometric not in PHOTOMETRICS:
            raise ValueError(f"TIFF layout not supported (photometric {page.photometric!s}, depth "
                             f"{page.imagedepth}): save it as grey or RGB(A) tiles")
        self.tiled = page.is_tiled
        self.invert = page.photometric == 0  # min-is-white: 0 is white, as PIL reads it too
        self.samples, self.planar = page.samplesperpixel, page.planarconfig == 2 and page.samplesperpixel > 1
        # Grey + alpha reads as grey (alpha dropped, as PIL's LA becomes L); JPEG's YCbCr decodes to RGB.
        self.channels = 3 if page.photometric == 6 else 1 if self.samples == 2 else self.samples
        if page.dtype is None:
            raise ValueError(f"TIFF sample type not supported ({page.bitspersample}-bit, format "
                             f"{page.sampleformat!s}): save it as 8- or 16-bit samples")
        self.dtype = np.dtype(page.dtype).newbyteorder("=")
        self.segment = (page.tilelength, page.tilewidth) if self.tiled else (page.rowsperstrip, page.imagewidth)
        height, width = page.imagelength, page.imagewidth
        self.grid = (-(-height // self.segment[0]), -(-width // self.segment[1]))  # segments down, across
        self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self.counts = np.asarray(page.databytecounts, dtype=np.int64)
        size = self.path.stat().st_size
        beyond = np.flatnonzero(self.offsets + self.counts > size)
        if len(beyond):
            raise ValueError(f"truncated: {len(beyond)} of {len(self.offsets)} tiles lie beyond the end of the file "
                             f"({size:,} bytes); copy the file again")
        self.jpeg = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader}
        self.fill = page.nodata  # what a tile never written holds
        self._decode = page.decode
        try:  # an unsupported codec or sample layout raises here, whatever the data
            self._decode(None, 0, **self.jpeg)
        except (ValueError, NotImplementedError, KeyError) as e:
            problem = str(e).strip("'\"")
            if "imagecodecs" in problem:
                raise UserError(f"{self.path}: decoding its {page.compression!s} tiles needs the imagecodecs "
                                f"package: {INSTALL}") from None
            raise UserError(f"{self.path}: TIFF compression {page.compression!s} cannot be decoded ({problem}): "
                            "save it with zstd, deflate, LZW or JPEG tiles") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()

    def read(self, top: int, bottom: int, left: int, right: int, tiles: TileCache | None = None) -> np.ndarray:
        """The box [top, bottom) x [left, right) of this level as a new (h, w, channels) array of self.dtype,
        decoding only the segments it touches (those in `tiles` are reused, new ones added)."""
        height, width = self.shape
        if not (0 <= top < bottom <= height and 0 <= left < right <= width):
            raise ValueError(f"{self.path}: box rows {top}..{bottom}, columns {left}..{right} is outside level "
                             f"{self.level} ({width}x{height}, width x height)")
        guards.check_region_pixels(bottom - top, right - left)
        seg_h, seg_w = self.segment
        out = np.empty((bottom - top, right - left, self.channels), dtype=self.dtype)
        for row in range(top // seg_h, (bottom - 1) // seg_h + 1):
            for col in range(left // seg_w, (right - 1) // seg_w + 1):
                tile = self._tile(row, col, tiles)
                y0, y1 = max(top, row * seg_h), min(bottom, (row + 1) * seg_h)
                x0, x1 = max(left, col * seg_w), min(right, (col + 1) * seg_w)
                out[y0 - top:y1 - top, x0 - left:x1 - left] = tile[y0 - row * seg_h:y1 - row * seg_h,
                                                                   x0 - col * seg_w:x1 - col * seg_w]
        return out

    def strided(self, step: int) -> np.ndarray:
        """Every `step`-th pixel of every `step`-th row of this level, (ceil(h / step), ceil(w / step), channels):
        read one band of segments at a time (held to max_image_pixels), so the level is never held whole."""
        height, width = self.shape
        seg_h, seg_w = self.segment
        columns = max(seg_w, guards.pixel_limit() // seg_h // seg_w * seg_w)  # pixels across one read
        out = np.empty((-(-height // step), -(-width // step), self.channels), dtype=self.dtype)
        for top in range(0, height, seg_h):
            first = -(-top // step) * step  # the first row at a multiple of step in this band
            bottom = min(height, top + seg_h)
            if first >= bottom:
                continue  # no sampled row in this band: its segments are not decoded
            for left in range(0, width, columns):
                right = min(width, left + columns)
                band = self.read(top, bottom, left, right)
                start = -(-left // step) * step
                out[first // step:-(-bottom // step), start // step:-(-right // step)] = band[first - top::step,
                                                                                              start - left::step]
        return out

    def _tile(self, row: int, col: int, tiles: TileCache | None) -> np.ndarray:
        key = (self.level, row, col)
        tile = tiles.get(key) if tiles is not None else None
        if tile is None:
            index = row * self.grid[1] + col
            # Separate planes (planar configuration 2) store each sample's segments one plane after another.
            planes = range(self.channels) if self.planar else (0,)
            parts = [self._decoded(index + plane * self.grid[0] * self.grid[1]) for plane in planes]
            tile = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)
            tile = tile[:, :, :self.channels]
            if tiles is not None:
                tiles.put(key, tile)
        return tile

    def _decoded(self, index: int) -> np.ndarray:
        """Segment `index` as (h, w, samples) native-order values."""
        count = int(self.counts[index])
        data = os.pread(self._fd, count, int(self.offsets[index])) if count else None
        try:
            decoded, _, shape = self._decode(data, index, **self.jpeg)
        except Exception as e:  # imagecodecs raises its own error types per codec (ZstdError, JpegError, ...)
            raise ValueError(f"tile {index} cannot be decoded ({type(e).__name__}: {e}); the file is damaged or "
                             "truncated: copy it again") from None
        if decoded is None:  # a tile never written: the file's fill value
            return np.full(shape[1:], self.fill, dtype=self.dtype)
        tile = decoded[0].astype(self.dtype, copy=False)
        if self.invert:
            tile = np.iinfo(self.dtype).max - tile if self.dtype.kind == "u" else -tile
        return tile

    def to_uint8(self, region: np.ndarray) -> np.ndarray:
        return self.scale()(region)

    def scale(self) -> Callable[[np.ndarray], np.ndarray]:
        """How read boxes become 0..255, by the rules images follow (transforms.load_image): uint8 and bool
        as they are, 16-bit scaled by 255/65535, anything wider or float by the level's own range (one streamed
        pass over its tiles, once per opened file)."""
        if values.is_pixels(self.dtype):
            return values.pixels
        if self.dtype == np.uint16:
            return values.Scale(0.0, 65535.0)
        if not hasattr(self, "_own_range"):
            stats = [values.array_stats(self._tile(row, col, None), self.path)
                     for row in range(self.grid[0]) for col in range(self.grid[1])]
            self._own_range = values.rule_scale(stats)
        return self._own_range


def level_error(path, level: int, count: int) -> UserError:
    return UserError(f"{path}: no pyramid level {level}: the file has {count} level(s), 0..{count - 1}; set "
                     "dataset.level within them")


def _page(level_series):
    """The first page (plane) of one pyramid level of a series."""
    return level_series.keyframe


_opened: OrderedDict[tuple, TiledTiff | None] = OrderedDict()
_opening = threading.Lock()


def opened(path: str | Path, level: int = 0) -> TiledTiff | None:
    """TiledTiff(path, level) for a TIFF read by window: its level 0 is tiled, or `level` is above 0; None for
    a strip-organised TIFF at level 0 (PIL decodes it whole, as any image). Reused while the file's size and
    modification time stay the same."""
    info = os.stat(path)
    key = (os.path.abspath(path), level, info.st_size, info.st_mtime_ns)
    with _opening:
        if key not in _opened:
            _opened[key] = TiledTiff(path, level) if level > 0 or header(path)[1] else None
            while len(_opened) > OPENED_FILES:
                _opened.popitem(last=False)  # closed when no reader holds it any more (__del__)
        _opened.move_to_end(key)
        return _opened[key]


def header(path: str | Path) -> tuple[list[tuple[int, int]], bool, int, np.dtype]:
    """(levels, tiled, channels, dtype) of a TIFF's first series, from its header: `tiled` says whether level
    0 is stored in tiles (else strips, which PIL decodes as today)."""
    tifffile = _tifffile()
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            page = _page(series.levels[0])
            levels = [(_page(s).imagelength, _page(s).imagewidth) for s in series.levels]
            channels = 3 if page.photometric == 6 else page.samplesperpixel
            return levels, page.is_tiled, channels, np.dtype(page.dtype or np.uint8).newbyteorder("=")
    except (tifffile.TiffFileError, IndexError, KeyError) as e:
        raise ValueError(f"not a readable TIFF ({type(e).__name__}: {e})") from None
