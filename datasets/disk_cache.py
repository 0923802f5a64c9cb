"""dataset.cache=disk for every source: the uint8 array is written once and memory-mapped by later runs.

Two files per (source key, item geometry, value-range setting), named by a hash of those; the source key is
what the source reads cheaply to know its items (a crop CSV's bytes and root, a folder's listing):
  <family>-<key>.json            the manifest: every file's size and mtime, every item's class, split hint
                                 and group, the items left out (on_bad_rows=skip), and the array's file name;
  <family>-<key>-<files>.npy     the array (N, C, H, W), named also by the files' sizes and mtimes; C is 1
                                 where every item is grey, whatever dataset.channels (the manifest's shape).
A later run reads the source key and stats the files, nothing per item: no CSV parsing, no header reads, no
decoding (parsing a crop CSV alone is ~17 us per row, 0.3 s for 20k rows, longer than the rest of a cached
run). A changed key gives a new cache; a changed file size or mtime makes the manifest stale and the items
are decoded again. Both files go to a temp name first and are renamed into place, array before manifest,
so a killed run never leaves a manifest pointing at a half-written array.

Runs share a cache folder safely: a run that finds no cache takes <family>-<key>.lock (flock, released by the
kernel even on SIGKILL) before building, so runs started together build it once; the others wait, then
find and map it. The manifest records the array's byte size, shape and a digest of SAMPLES blocks spread
over it; an array that was truncated, replaced or damaged is reported in one line and built again. A full
checksum would catch a lone flipped byte too, but reads the whole file on every run: 0.25 s per 200 MiB
(crc32, warm page cache) against 0.013 s for the samples, on a cache that otherwise maps in milliseconds.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from datasets.base import check_fits_on_disk
from datasets.sources import Items
from errors import UserError

log = logging.getLogger(__name__)

FORMAT = 9  # bump when the files' layout or the pixel pipeline changes: old caches are then never read
# (6: grey data is stored with one channel, where 5 stored it three times; 7: any source, items as codes;
# 8: the items' region sizes, for predict.py's default window;
# 9: the items' group names and crop boxes, which the split reads)
SAMPLES, SAMPLE_BYTES = 64, 2**16  # the array's digest: 64 blocks of 64 KiB, first and last included


@dataclass
class Cached:
    images: torch.Tensor  # uint8 (N, C, H, W) as stored (C=1 for grey sources), memory-mapped copy-on-write
    items: Items
    value_range: str | tuple[float, float] | None  # per_file, or the (low, high) every .npy file was mapped from


def manifest_path(cache_dir: Path, family: str, key: tuple[list, bytes], shape: tuple[int, int, int],
                  value_range: str | tuple[float, float] | None) -> Path:
    """`key`: the source's key (JSON-able parts, and bytes such as a CSV's content, read once for both the key
    and the items); `value_range`: the dataset.value_range setting (per_file, global or a pair), which decides
    every .npy item's pixels."""
    parts, content = key
    digest = hashlib.sha256(json.dumps([FORMAT, family, *parts, *shape, value_range]).encode())
    digest.update(content)
    return cache_dir / f"{family}-{digest.hexdigest()[:24]}.json"


def _source_stats(paths) -> dict[str, list[int]]:
    """{resolved path: [size in bytes, mtime in ns]}, sorted by path."""
    stats = {}
    for path in sorted(str(Path(p).resolve()) for p in paths):
        stat = os.stat(path)
        stats[path] = [stat.st_size, stat.st_mtime_ns]
    return stats


def _sample_digest(path: Path) -> str:
    """A digest of SAMPLES blocks spread evenly over the file (the whole file when it is smaller)."""
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for i in range(SAMPLES):
            f.seek(i * max(size - SAMPLE_BYTES, 0) // (SAMPLES - 1))
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


# Per-item columns travel in the manifest as base64 of their bytes: parsing 64k JSON integers per column took
# longer than the rest of a cached run (~15 ms of ~40), decoding the text takes well under 1 ms.
COLUMNS = {"labels": np.int64, "hints": np.int8, "groups": np.int32}


def _encoded(array: np.ndarray, dtype) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def _items(entry: dict) -> Items:
    labels, hints, groups = (np.frombuffer(base64.b64decode(entry[name]), dtype=dtype).copy()
                             for name, dtype in COLUMNS.items())
    sizes, boxes = entry["sizes"], entry["boxes"]
    if sizes is not None:
        sizes = np.frombuffer(base64.b64decode(sizes), dtype=np.int32).reshape(-1, 2).copy()
    if boxes is not None:
        boxes = np.frombuffer(base64.b64decode(boxes), dtype=np.int32).reshape(-1, 4).copy()
    return Items(entry["classes"], labels, hints, groups, entry["skipped"], sizes, entry["group_names"], boxes)


def load(manifest: Path, what: str, report: bool = True) -> Cached | None:
    """The cached items, or None when there are none, any source file changed (or vanished) since, or the
    array does not match its manifest (reported in one warning line unless `report` is false)."""
    try:
        entry = json.loads(manifest.read_text())
        # A skipped row's file is not among the sources (missing, unreadable, over max_image_pixels): one
        # fixed since would go unseen, so a cache that left rows out is built again rather than trusted.
        if entry["skipped"] or _source_stats(entry["sources"]) != entry["sources"]:
            return None
        items = _items(entry)
        array_path = manifest.with_name(entry["array"])
        size, expected = array_path.stat().st_size, entry["array_bytes"]
    except (OSError, ValueError, KeyError):  # missing, vanished or unreadable (bad base64 too): decode again
        return None
    try:
        problem = (f"{size} bytes instead of {expected}" if size != expected
                   else "its content differs from the manifest's digest" if _sample_digest(array_path) != entry["digest"]
                   else None)
        images = None if problem else np.load(array_path, mmap_mode="c")
        if images is not None and (list(images.shape) != entry["shape"] or images.dtype != np.uint8):
            problem = f"it holds {images.dtype} {list(images.shape)} instead of uint8 {entry['shape']}"
    except (OSError, ValueError) as e:  # a header numpy cannot read
        problem = f"it cannot be read ({e})"
    if problem:
        if report:
            log.warning("%s: %s is damaged (%s): building it again", what, array_path, problem)
        return None
    resolved = entry["value_range"]
    return Cached(torch.from_numpy(images), items, tuple(resolved) if isinstance(resolved, list) else resolved)


@contextmanager
def build_lock(manifest: Path, what: str) -> Iterator[None]:
    """Held while one run builds the cache of `manifest`: other runs wait here, with one line saying so. The
    kernel drops the lock when its holder exits, killed or not; the small .lock file stays for the next run."""
    try:
        manifest.parent.mkdir(parents=True, exist_ok=True)
        lock = open(manifest.with_suffix(".lock"), "a")  # "a": never truncates what another run holds
    except OSError as e:  # read-only, or a file in the way
        raise UserError(f"dataset.cache_dir {manifest.parent}: cannot create it ({e.strerror or e}): point "
                        "dataset.cache_dir at a writable folder, or set dataset.cache=memory") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another run is building %s; waiting for it", what, manifest)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on one file system
    finally:
        tmp.unlink(missing_ok=True)


class RowWriter:
    """A uint8 (N, C, H, W) .npy file written by rows: `writer[rows] = values` as into a tensor, each call
    going straight to the file (os.pwrite), so nothing of the array stays in this process's memory (a
    memory-mapped file kept every page written resident until the end: the peak grew with the data set)."""

    def __init__(self, fd: int, shape: tuple[int, ...]):
        self.fd, self.shape = fd, shape
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
        self.offset, self.row_bytes = header.tell(), int(np.prod(shape[1:]))
        os.pwrite(fd, header.getvalue(), 0)
        os.ftruncate(fd, self.offset + self.row_bytes * shape[0])

    def __setitem__(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        rows_np = rows.numpy()
        data = values.expand(len(rows_np), *self.shape[1:]).contiguous().numpy()  # no copy when already whole
        if np.any(np.diff(rows_np) <= 0):  # out of order: sort (a copy); in order, the data goes out as it is
            order = np.argsort(rows_np, kind="stable")
            rows_np, data = rows_np[order], data[order]
        # One write per run of consecutive rows: a CSV that lists a file's rows together writes once per file.
        breaks = np.flatnonzero(np.diff(rows_np) != 1) + 1
        for start, end in zip([0, *breaks.tolist()], [*breaks.tolist(), len(rows_np)]):
            self._write_all(memoryview(data[start:end]).cast("B"), self.offset + int(rows_np[start]) * self.row_bytes)

    def _write_all(self, buffer: memoryview, offset: int) -> None:
        """pwrite may write less than asked (at most ~2 GiB a call on Linux, less on a nearly full disk)."""
        while buffer:
            written = os.pwrite(self.fd, buffer, offset)
            buffer, offset = buffer[written:], offset + written


@dataclass
class Contents:
    """What a new cache holds: the items, the files they read, and how they were decoded."""

    items: Items
    files: list[Path]
    shape: tuple[int, int, int]  # (C, H, W) per item, as stored
    value_range: str | tuple[float, float] | None


def write(manifest: Path, what: str, contents: Contents, fill: Callable[[RowWriter], None]) -> Cached:
    """Decode the items (`fill` writes them into the array it is given, by rows) into a new cache; return it
    mapped. Called under build_lock."""
    # A build killed midway (SIGKILL runs no cleanup) left its temp files; none is in use while this run holds
    # the lock, and they would count against the free space checked next.
    for stale in manifest.parent.glob(f"{manifest.stem}*.tmp-*"):
        stale.unlink(missing_ok=True)
    # The folder exists: build_lock made it. The size is known before any item is decoded: refuse what cannot
    # fit rather than fill the disk.
    items, shape = contents.items, contents.shape
    check_fits_on_disk(len(items) * int(np.prod(shape)), manifest.parent, f"the {what} at {'x'.join(map(str, shape))}")
    # Stats taken before decoding: a file edited meanwhile makes this cache stale next time, never wrongly fresh.
    sources = _source_stats(contents.files)
    sources_key = hashlib.sha256(json.dumps(sources).encode()).hexdigest()[:12]
    array_path = manifest.with_name(f"{manifest.stem}-{sources_key}.npy")

    def write_array(tmp: Path) -> None:
        # Plain writes (os.pwrite), not stores through a memory map: a full disk is an ordinary OSError here,
        # where a store into a sparse mapped file would kill the process with SIGBUS.
        with open(tmp, "wb") as f:
            fill(RowWriter(f.fileno(), (len(items), *shape)))

    def write_manifest(tmp: Path) -> None:
        tmp.write_text(json.dumps({"array": array_path.name, "array_bytes": array_path.stat().st_size,
                                   "shape": [len(items), *shape], "digest": _sample_digest(array_path),
                                   "sources": sources, "classes": items.classes,
                                   **{name: _encoded(getattr(items, name), dtype) for name, dtype in COLUMNS.items()},
                                   "sizes": None if items.sizes is None else _encoded(items.sizes, np.int32),
                                   "skipped": items.skipped, "value_range": contents.value_range,
                                   "group_names": items.group_names,
                                   "boxes": None if items.boxes is None else _encoded(items.boxes, np.int32)}))

    previous = _previous_array(manifest)
    try:
        _replace_atomically(array_path, write_array)  # the temp file goes on any error, this one included
        _replace_atomically(manifest, write_manifest)
    except OSError as e:
        raise UserError(f"dataset.cache_dir {manifest.parent}: cannot write the {what} ({e.strerror or e}): free "
                        "space there, point dataset.cache_dir at another folder, or set dataset.cache=memory") from None
    if previous is not None and previous != array_path:
        previous.unlink(missing_ok=True)  # the stale array of the same key; runs mapping it keep their copy
    return Cached(torch.from_numpy(np.load(array_path, mmap_mode="c")), items, contents.value_range)


def _previous_array(manifest: Path) -> Path | None:
    try:
        return manifest.with_name(json.loads(manifest.read_text())["array"])
    except (OSError, ValueError, KeyError):
        return None
