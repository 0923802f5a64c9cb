"""Checks on what a checkpoint or an exported ONNX model says about itself, before any of it is used.

Both load as data (torch.load with weights_only=True; ONNX metadata as JSON), so reading one runs no code, but
every field may still have been written by someone else: a `classes` list shorter than the model's outputs
labelled predictions wrongly with exit code 0, std 0 or NaN gave NaN probabilities, 1e9 channels asked for a
600 GB first layer, and a 1.5 MB deflated archive expanded to ~0.9 GB inside torch.load. Each field is
checked here, in one line naming the file and the field, before anything is allocated from it.
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from datasets import guards, values
from errors import UserError

CHANNELS = (1, 3)  # what every data family yields (dataset.channels)
# The pixels of one model input a file may ask for: PIL's default image limit (also max_image_pixels' default).
# The tutorial CNN's first dense layer grows with them; the memory check there counts that layer.
MAX_INPUT_PIXELS = 89_478_485
# Nesting levels a stored config may have: ours has 3 (root, group, a list such as mean). Deeper ones are
# refused before anything walks them recursively (a 10,000-deep list printed a 1,996-line RecursionError).
MAX_DEPTH = 16
# torch.save stores its archive's entries uncompressed; a few kB of zip headers and alignment padding aside,
# what a checkpoint expands to is its size on disk. Compressed entries are not torch's doing.
ARCHIVE_SLACK_BYTES = 1 << 20


def check_container(path: Path, key: str) -> None:
    """Before torch.load: a zip archive (torch's format since 1.6) must not expand beyond its size on disk, and
    anything else must at least start as a pickle (torch's legacy format) rather than be refused as "pickled
    Python objects" when it is an image or a text file."""
    if not zipfile.is_zipfile(path):
        if not _PICKLE_START.match(_head(path)):
            raise UserError(f"{key}: {path} is not a checkpoint ({_what_file(path)}); point it at "
                            "checkpoints/last.pt or best.pt of a run")
        return
    try:
        with zipfile.ZipFile(path) as archive:
            expanded = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # torch.load names what is wrong with it
    on_disk = path.stat().st_size
    if expanded > on_disk + ARCHIVE_SLACK_BYTES:
        raise UserError(f"{key}: {path} expands from {on_disk / 2**20:.1f} MiB to {expanded / 2**20:.1f} MiB when "
                        "loaded (compressed entries; torch.save writes none): refused unread; use the checkpoint "
                        "as the run saved it")


# Protocol 2+ pickles start with PROTO (0x80) and the protocol number; torch's legacy format starts with one.
_PICKLE_START = re.compile(rb"\x80[\x02-\x05]")
# What a file wrongly given as a checkpoint most often is, by its first bytes.
_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"\x93NUMPY", "a .npy array"),
          (b"\x08", "perhaps an ONNX model: name it .onnx"), (b"{", "JSON text"), (b"\x7fELF", "a program"))


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(16)


def _what_file(path: Path) -> str:
    head = _head(path)
    if not head:
        return "an empty file"
    return next((name for magic, name in _MAGIC if head.startswith(magic)), "not a file torch.save wrote")


def depth_problem(value, limit: int = MAX_DEPTH) -> str | None:
    """Where a nested value (dicts and lists) goes deeper than `limit`, found without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            return f"nested more than {limit} levels deep"
        stack.extend((child, depth + 1) for child in children)
    return None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value) -> bool:
    """A whole number of pixels, at least 1."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_description(described: dict, source: str, max_pixels: int = MAX_INPUT_PIXELS) -> None:
    """The fields a checkpoint and an ONNX model's metadata share: classes, input_shape, normalization,
    value_range, epoch, config and choices. `source` names the file ("checkpoint=PATH")."""
    classes = described.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(name, str) for name in classes):
        raise UserError(f"{source}: its classes must be a non-empty list of names, got {_short(classes)}: the file "
                        "was edited or is damaged")
    guards.check_classes(classes, f"{source}: its classes")

    shape = described.get("input_shape")
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) for n in shape)):
        raise UserError(f"{source}: its input_shape must be three integers (C, H, W), got {_short(shape)}")
    channels, height, width = shape
    if channels not in CHANNELS or height < 1 or width < 1 or height * width > max_pixels:
        raise UserError(f"{source}: its input_shape {tuple(shape)} (C, H, W) is not one this trainer makes: "
                        f"C must be 1 or 3 and H x W between 1 and {max_pixels:,} pixels")
    if "channels" in described and described["channels"] != channels:
        raise UserError(f"{source}: its channels {_short(described['channels'])} differ from its input_shape "
                        f"{tuple(shape)}")

    normalization = described.get("normalization")
    if not isinstance(normalization, dict):
        raise UserError(f"{source}: its normalization must hold mean and std lists, got {_short(normalization)}")
    for name in ("mean", "std"):
        numbers = normalization.get(name)
        if not (isinstance(numbers, list) and len(numbers) in (1, channels) and all(map(_number, numbers))):
            raise UserError(f"{source}: its normalization {name} must be 1 or {channels} finite numbers, got "
                            f"{_short(numbers)}")
    if any(s < values.MIN_STD for s in normalization["std"]):
        raise UserError(f"{source}: its normalization std {normalization['std']} holds values below "
                        f"{values.MIN_STD:g}, which would give infinite or NaN inputs: the file was edited or is damaged")

    value_range = described.get("value_range")
    if not (value_range is None or value_range in ("per_file", "global")
            or (isinstance(value_range, list) and len(value_range) == 2 and all(map(_number, value_range))
                and value_range[0] < value_range[1])):
        raise UserError(f"{source}: its value_range must be per_file or [low, high] with low < high, got "
                        f"{_short(value_range)}")

    box_size = described.get("box_size")  # absent from files written before predict.py
    if not (box_size is None or (isinstance(box_size, list) and len(box_size) == 2
                                 and all(n is None or _count(n) for n in box_size[:1]) and _count(box_size[1]))):
        raise UserError(f"{source}: its box_size must be [height or null, width] in pixels, got {_short(box_size)}: "
                        "the file was edited or is damaged")

    split = described.get("split")  # absent from ONNX metadata and from checkpoints made before split_by
    if not (split is None or (isinstance(split, dict) and split.get("by") in ("given", "row", "file", "region")
                              and isinstance(split.get("val_digest"), str) and isinstance(split.get("val"), int))):
        raise UserError(f"{source}: its split must say how it split (by, val, val_digest), got {_short(split)}: "
                        "the file was edited or is damaged")
    val_blocks = None if split is None else split.get("val_blocks")  # absent: a split made before it was recorded
    if val_blocks is not None and not (_count(val_blocks) and val_blocks <= 1000):
        raise UserError(f"{source}: its split's val_blocks must be a count of blocks from 1 to 1000, got "
                        f"{_short(val_blocks)}: the file was edited or is damaged")

    epoch = described.get("epoch")
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0):
        raise UserError(f"{source}: its epoch must be a count, got {_short(epoch)}")

    for name in ("config", "choices"):
        problem = depth_problem(described.get(name))
        if problem is not None:
            raise UserError(f"{source}: its {name} is {problem}: this trainer cannot rebuild it")


def check_weights(model: nn.Module, source: str) -> None:
    """Weights as loaded: a NaN or infinite value makes every output NaN (probabilities too, with exit code 0)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"{source}: its weight {name} holds NaN or infinite values: the file was edited or is "
                            "damaged; use another checkpoint of the run")


def check_outputs(logits: torch.Tensor, classes: int, source: str, what: str = "") -> None:
    """Logits as the model gave them: one finite score for each of `classes` classes for each item."""
    if logits.ndim != 2 or logits.shape[1] != classes:
        raise UserError(f"{source}: the model gives outputs of shape {tuple(logits.shape)} but the file names "
                        f"{classes} classes: each output would be labelled wrongly; export the model again")
    if not bool(torch.isfinite(logits).all()):
        raise UserError(f"{source}: the model gives NaN or infinite scores{what}: its weights or normalisation "
                        "were edited or are damaged")


def reading_only(dataset_cfg: DictConfig) -> DictConfig:
    """A stored dataset config that may read its data again, but whose cache goes where the command's default
    puts it and which downloads nothing: a file someone else wrote does not choose where evaluate.py writes or
    what it fetches."""
    node = dataset_cfg.copy()
    if "cache_dir" in node:
        node.cache_dir = None
    if "download" in node:
        node.download = False
    return node


def finite_or_none(value):
    """`value` with every NaN or infinite float replaced by None, for strict JSON (bare NaN is not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def _short(value) -> str:
    """A value for a message, cut to one short line (a crafted field may be megabytes long)."""
    try:
        text = repr(value).replace("\n", " ")
    except RecursionError:  # a list nested thousands deep
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= 60 else f"{text[:57]}..."
