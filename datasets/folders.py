"""torchvision's ImageFolder and DatasetFolder: one class per subfolder, items resized to width x height.

A root with train/ and val/ subfolders uses them as the splits; otherwise one folder is split by a
seeded, class-stratified draw of dataset.val_fraction. cache=memory decodes every file once.
verify=true opens every file up front and lists every one that fails, instead of stopping at the first.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset, Subset
from torchvision import datasets as tv
from tqdm import tqdm

from datasets.base import (DataBundle, check_image_keys, materialize, outside_root, per_channel, problem_list,
                           split_indices)
from datasets.transforms import DECODE_ERRORS, LoadItem
from errors import UserError

FOLDER_CACHE_MODES = ("none", "memory")


class _UserFolderMixin:
    """Hidden folders (.git, .ipynb_checkpoints) are not classes, and a file that fails to load is named."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise UserError(f"{directory}: no class subfolders; put each class's files in a folder named after it")
        return classes, {name: i for i, name in enumerate(classes)}

    def __getitem__(self, index: int):
        # Raised inside a DataLoader worker too; training/loaders.py passes the message on without the
        # worker's traceback.
        try:
            return super().__getitem__(index)
        except (*DECODE_ERRORS, UserError) as e:
            raise UserError(f"item {index} of {self.root}: cannot load {self.samples[index][0]}: {e}") from e


class ImageFolder(_UserFolderMixin, tv.ImageFolder):
    pass


class DatasetFolder(_UserFolderMixin, tv.DatasetFolder):
    pass


def _open(make, root: Path) -> tv.DatasetFolder:
    if not root.is_dir():
        raise UserError(f"dataset.root: folder not found: {root.resolve()}")
    try:
        return make(str(root))
    except FileNotFoundError as e:  # torchvision names every empty class at once
        raise UserError(f"dataset.root {root}: {e}; add files to those folders or remove them") from e


def verify_files(folders: list[tv.DatasetFolder]) -> None:
    """Load every file as training would (full decode, so truncated files fail); list all that fail."""
    problems = []
    for folder in folders:
        for path, _ in tqdm(folder.samples, desc=f"verifying {folder.root}", unit="file", leave=False):
            try:
                folder.loader(path)
            except (*DECODE_ERRORS, UserError) as e:
                problems.append(f"{path}: {e}")
    if problems:
        raise UserError(f"dataset.verify: {len(problems)} unreadable file(s); replace or remove them:"
                        + problem_list(problems))


def _build(make, root, width, height, channels, cache, val_fraction, mean, std, seed, verify, hflip,
           allow_outside_root) -> DataBundle:
    check_image_keys(width, height, channels, val_fraction)
    if cache not in FOLDER_CACHE_MODES:
        raise UserError(f"dataset.cache must be one of {', '.join(FOLDER_CACHE_MODES)} for folders, got {cache!r}")
    root = Path(root)
    train_set: Dataset
    if (root / "train").is_dir() and (root / "val").is_dir():
        train_set, val_set = _open(make, root / "train"), _open(make, root / "val")
        if val_set.classes != train_set.classes:
            raise UserError(
                f"{root}: train/ has classes {train_set.classes} but val/ has {val_set.classes}; "
                "give both the same class subfolders"
            )
        classes = train_set.classes
        folders = [train_set, val_set]
    else:
        full = _open(make, root)
        train_idx, val_idx = split_indices(full.targets, val_fraction, seed)
        train_set, val_set, classes = Subset(full, train_idx), Subset(full, val_idx), full.classes
        folders = [full]
    if not allow_outside_root:  # as for crop CSVs: a folder from elsewhere must not make the trainer read any file
        escaped = outside_root([path for folder in folders for path, _ in folder.samples], root)
        if escaped:
            raise UserError(f"dataset.root {root}: {len(escaped)} file(s) resolve outside it through symlinks; move "
                            "them under dataset.root or set dataset.allow_outside_root=true:" + problem_list(escaped))
    if verify and cache != "memory":  # cache=memory decodes every file up front anyway and lists the failures
        verify_files(folders)
    shape = (channels, height, width)
    if cache == "memory":
        train_set = materialize(train_set, shape, f"loading {root} train")
        val_set = materialize(val_set, shape, f"loading {root} val")
    return DataBundle(
        train=train_set,
        val=val_set,
        classes=list(classes),
        input_shape=shape,
        mean=per_channel(mean, channels, "dataset.mean"),
        std=per_channel(std, channels, "dataset.std"),
        hflip=hflip,
    )


def build_imagefolder(root, width, height, channels, cache, val_fraction, mean, std, seed, verify=False,
                      hflip=False, allow_outside_root=False) -> DataBundle:
    load = LoadItem(height, width, channels)
    return _build(lambda d: ImageFolder(d, loader=load), root, width, height, channels, cache, val_fraction,
                  mean, std, seed, verify, hflip, allow_outside_root)


def build_datasetfolder(root, extensions, width, height, channels, cache, val_fraction, mean, std, seed,
                        verify=False, hflip=False, allow_outside_root=False) -> DataBundle:
    load = LoadItem(height, width, channels)
    extensions = tuple(e if e.startswith(".") else f".{e}" for e in extensions)
    return _build(lambda d: DatasetFolder(d, loader=load, extensions=extensions), root, width, height, channels,
                  cache, val_fraction, mean, std, seed, verify, hflip, allow_outside_root)
