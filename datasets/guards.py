"""Checks on what the data names before anything is opened or allocated: the kind of each file, the labels
and how many classes there are.

Why before opening: open() on a FIFO (named pipe) waits for a writer that never comes, so a CSV row or a file in
an image folder naming one hung the run forever with no output; a character device such as /dev/zero reads
without end. os.stat answers without opening, in ~1 us a file. Why labels: they reach classes.json, log lines
and TensorBoard tags and captions, where a line break splits a record and a 100 kB label made every caption
slow; and each validation pass holds a (classes x classes) int64 confusion matrix (80 GB at 100k classes).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from errors import UserError

# A data set of more classes is refused: its confusion matrix is classes² int64 values (1,000 classes: 8 MB;
# 100,000: 80 GB), and every class gets its own TensorBoard scalar and PR curve each epoch.
MAX_CLASSES = 1_000
# Class names are shown in log lines, image captions and TensorBoard tags; the longest CIFAR/ImageNet names
# are under 100 characters.
MAX_LABEL_CHARS = 200
# What a label may not hold: control characters (C0 such as NUL, tab and line breaks, DEL, C1) and Unicode's
# line and paragraph separators, which split log lines and classes.json records.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class NotAFile(OSError):
    """A path that exists but is no regular file (a FIFO, device, socket or folder). An OSError, so every
    reader that reports unreadable files (DECODE_ERRORS, bad CSV rows, checkpoint loads) reports it too."""


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), which would wait forever for a writer"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def require_regular(path: str | Path) -> None:
    """Raise NotAFile (or FileNotFoundError) unless `path` is a regular file (a symlink to one counts);
    never opens it."""
    kind = _kind(os.stat(path).st_mode)
    if kind is not None:
        raise NotAFile(f"{path} is {kind}, not a file")


def require_file(path: str | Path, key: str, what: str = "file") -> Path:
    """A command-line file (checkpoint=, predict=, dataset.csv) as one line naming `key` when it is missing
    or is no regular file, before it is opened."""
    path = Path(path)
    try:
        require_regular(path)
    except FileNotFoundError:
        raise UserError(f"{key}: {what} not found: {path.resolve()}") from None
    except OSError as e:  # NotAFile, or a path that cannot be looked at (permissions, a too-long name)
        reason = str(e) if isinstance(e, NotAFile) else f"{path}: {e.strerror or e}"
        raise UserError(f"{key}: {reason}; give the path of a {what}") from None
    return path


def pixel_limit() -> int:
    """max_image_pixels as datasets.base.limit_image_pixels set it (PIL refuses above twice its MAX_IMAGE_PIXELS)."""
    return int(2 * Image.MAX_IMAGE_PIXELS)


def check_region_pixels(height: int, width: int) -> None:
    """A region of a memory-mapped .npy array (a crop, or a whole file for predict= and dataset folders) is
    read and mapped through float64, 8 bytes a value: regions over max_image_pixels are refused as PIL refuses
    such images, with the same error, before a byte is read."""
    if height * width > pixel_limit():
        raise Image.DecompressionBombError(f"a {width}x{height} region has {height * width:,} pixels")


def label_problem(label: str) -> str | None:
    """Why a class name cannot be used, or None when it can."""
    if len(label) > MAX_LABEL_CHARS:
        return f"label of {len(label):,} characters is longer than {MAX_LABEL_CHARS}: use a short class name"
    if CONTROL_CHARACTERS.search(label):
        return f"label {label[:40]!r} holds a line break or control character: remove it"
    return None


def check_classes(classes: Sequence[str], source: str) -> None:
    """The class list a data set, checkpoint or ONNX model brings: distinct names, each usable, at most
    MAX_CLASSES of them. `source` names where they came from."""
    if len(classes) > MAX_CLASSES:
        raise UserError(f"{source}: {len(classes):,} classes, more than the {MAX_CLASSES:,} this trainer takes "
                        "(its confusion matrix grows with the square of the count): merge or drop classes")
    for name in classes:
        problem = label_problem(name)
        if problem is not None:
            raise UserError(f"{source}: class {problem}")
    if len(set(classes)) != len(classes):
        repeated = sorted({name for name in classes if classes.count(name) > 1})[:5]
        raise UserError(f"{source}: class names repeat ({', '.join(map(repr, repeated))}): each class needs its own name")
