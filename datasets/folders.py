"""torchvision's ImageFolder and DatasetFolder as a source: one class per subfolder, items resized to width x
height.

A root with train/ and val/ subfolders uses them as the splits; otherwise one folder is split by a
seeded, class-stratified draw of dataset.val_fraction (datasets/splits.py). cache=memory and disk decode
every file once (a grey folder is stored with one channel); verify=true with cache=none opens every file up
front and lists every one that fails, instead of stopping at the first.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset
from torchvision import datasets as tv

from datasets import guards, pipeline, values
from datasets.base import DataBundle, fill_items, outside_root, problem_list
from datasets.disk_cache import RowWriter
from datasets.regions import FileSource, LoadItem
from datasets.sources import Items, hint_codes
from datasets.spec import DataSpec
from datasets.transforms import DECODE_ERRORS, image_header
from errors import UserError
from progress import progress_bar


class _UserFolderMixin:
    """Hidden folders (.git, .ipynb_checkpoints) are not classes, and a file that fails to load is named."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise UserError(f"{directory}: no class subfolders; put each class's files in a folder named after it")
        guards.check_classes(classes, f"{directory}: its subfolders")  # before torchvision lists their files
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
        for path, _ in progress_bar(folder.samples, desc=f"verifying {folder.root}", unit="file"):
            try:
                folder.loader(path)
            except (*DECODE_ERRORS, UserError) as e:
                problems.append(f"{path}: {e}")
    if problems:
        raise UserError(f"dataset.verify: {len(problems)} unreadable file(s); replace or remove them:"
                        + problem_list(problems))


def _folder_sum(folders: list[tv.DatasetFolder]) -> Dataset:
    """The items of several folders as one per-item dataset, with their `targets` (labels_of reads them)."""
    joined = ConcatDataset(folders)
    joined.targets = [target for folder in folders for target in folder.targets]
    return joined


class FolderSource:
    """A class-per-subfolder tree as a source (datasets/sources.py), listed by torchvision's DatasetFolder:
    each file one item and its own group; files under train/ and val/ (when both exist) carry that split as
    their hint. The key is the listing (every file's path and class), so a cached run decodes nothing."""

    def __init__(self, root: str, spec: DataSpec, extensions: tuple[str, ...] | None = None):
        self.root, self.spec, self.extensions = Path(root), spec, extensions
        self.family = "imagefolder" if extensions is None else "datasetfolder"
        self.what = str(root)
        self.grey, self.scales = False, {}
        self.load = LoadItem(spec.height, spec.width, spec.channels)
        self.folders: list[tv.DatasetFolder] = []

    def _open(self, folder: Path) -> tv.DatasetFolder:
        if self.extensions is None:
            return _open(lambda d: ImageFolder(d, loader=self.load), folder)
        return _open(lambda d: DatasetFolder(d, loader=self.load, extensions=self.extensions), folder)

    def _list(self) -> list[tv.DatasetFolder]:
        root = self.root
        if (root / "train").is_dir() and (root / "val").is_dir():
            folders = [self._open(root / "train"), self._open(root / "val")]
            if folders[1].classes != folders[0].classes:
                raise UserError(
                    f"{root}: train/ has classes {folders[0].classes} but val/ has {folders[1].classes}; "
                    "give both the same class subfolders"
                )
        else:
            folders = [self._open(root)]
        if not self.spec.allow_outside_root:  # as for crop CSVs: a folder from elsewhere must not make the
            # trainer read any file
            escaped = outside_root([path for folder in folders for path, _ in folder.samples], root)
            if escaped:
                raise UserError(f"dataset.root {root}: {len(escaped)} file(s) resolve outside it through symlinks; "
                                "move them under dataset.root or set dataset.allow_outside_root=true:"
                                + problem_list(escaped))
        return folders

    def key(self) -> tuple[list, bytes]:
        self.folders = self._list()
        listing = "\n".join(f"{i}\t{target}\t{path}" for i, folder in enumerate(self.folders)
                            for path, target in folder.samples)
        return [str(self.root.resolve()), self.extensions], listing.encode()

    def items(self) -> Items:
        if not self.folders:
            self.folders = self._list()
        labels = np.array([t for folder in self.folders for t in folder.targets], dtype=np.int64)
        hints = ([None] * len(labels) if len(self.folders) == 1
                 else [split for split, folder in zip(("train", "val"), self.folders) for _ in folder.samples])
        if self.spec.cache != "none" and self.spec.channels == 3:  # only a store can keep grey items once
            self.grey = all(_is_grey(path) for path in self.files())
        return Items(list(self.folders[0].classes), labels, hint_codes(hints), np.arange(len(labels), dtype=np.int32),
                     group_names=[path for folder in self.folders for path, _ in folder.samples])

    def files(self) -> list[Path]:
        return [Path(path) for folder in self.folders for path, _ in folder.samples]

    def _place(self, index: int) -> tuple[tv.DatasetFolder, int]:
        """The folder holding item `index` and its index there (messages name it so)."""
        first = len(self.folders[0])
        return (self.folders[0], index) if index < first else (self.folders[1], index - first)

    def fill(self, out: torch.Tensor | RowWriter, indices: np.ndarray) -> None:
        stored, height, width = out.shape[1:]

        def load(index: int) -> torch.Tensor:
            folder, local = self._place(index)
            path = folder.samples[local][0]
            try:
                return FileSource(path, stored, self.scales.get(Path(path))).region(slice(None), slice(None),
                                                                                    height, width)
            except (*DECODE_ERRORS, UserError) as e:
                raise UserError(f"item {local} of {folder.root}: cannot load {path}: {e}") from e

        fill_items(out, [int(i) for i in indices], load, f"loading {self.root}")

    def per_item(self, indices: np.ndarray, labels: np.ndarray) -> Dataset:
        found = set(self.scales.values())
        # One mapping for every file (global, a given range, or a single file): LoadItem applies it; else
        # (per_file) each file is mapped by its own range as it is loaded, as the scan found.
        self.load.scale = found.pop() if len(found) == 1 else None
        offset = 0
        for folder in self.folders:
            local = indices - offset
            if np.array_equal(local, np.arange(len(folder))):  # a train/ or val/ folder whole: itself
                return folder
            if len(local) and local.min() >= 0 and local.max() < len(folder):  # messages name its own index
                return Subset(folder, local)
            offset += len(folder)
        return Subset(_folder_sum(self.folders), indices)

    def verify(self) -> None:
        verify_files(self.folders)


def _is_grey(path: Path) -> bool:
    """Whether a file holds one value per pixel, from its header; an unreadable one is left to the decode,
    which lists it with every other failure."""
    try:
        return image_header(path)[2]
    except (*DECODE_ERRORS, UserError):
        return False


def build_imagefolder(root: str, *, seed: int, **keys) -> DataBundle:
    """ImageFolder (configs/dataset/imagefolder.yaml): every key but `root` is a DataSpec field."""
    spec = DataSpec(seed=seed, **keys)
    spec.check()
    return pipeline.build(FolderSource(root, spec), spec)


def build_datasetfolder(root: str, extensions: list[str], *, seed: int, **keys) -> DataBundle:
    """DatasetFolder of arrays (configs/dataset/datasetfolder.yaml): files of `extensions` under root."""
    spec = DataSpec(seed=seed, **{"value_range": values.GLOBAL, **keys})
    spec.check()
    extensions = tuple(e if e.startswith(".") else f".{e}" for e in extensions)
    return pipeline.build(FolderSource(root, spec, extensions), spec)
