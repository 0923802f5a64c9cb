"""CIFAR10 through torchvision; its test split is the validation set.

torchvision already holds all 60k images in memory as uint8 (N, 32, 32, 3): we view them as
(N, C, H, W) without copying, so every CIFAR10 run is an in-memory run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision import datasets as tv
from torchvision.datasets.utils import check_integrity

from datasets import values
from datasets.base import ArrayStore, DataBundle, InMemoryDataset, per_channel
from errors import UserError

LAYOUT = "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}"


def _bad_files(root: str) -> list[str]:
    """Which of CIFAR10's files are missing or fail their MD5: torchvision's message does not say."""
    folder = Path(root) / tv.CIFAR10.base_folder
    expected = [*tv.CIFAR10.train_list, *tv.CIFAR10.test_list, [tv.CIFAR10.meta["filename"], tv.CIFAR10.meta["md5"]]]
    bad = []
    for name, md5 in expected:
        if not (folder / name).is_file():
            bad.append(f"{name} missing")
        elif not check_integrity(str(folder / name), md5):
            bad.append(f"{name} corrupt (MD5 mismatch)")
    return bad


def _split(root: str, train: bool, download: bool) -> tuple[InMemoryDataset, list[str]]:
    try:
        data = tv.CIFAR10(root, train=train, download=download)
    except RuntimeError as e:
        hint = "set dataset.download=true to fetch it" if not download else "check the files or delete them and retry"
        bad = _bad_files(root)
        which = f" [{', '.join(bad)}]" if bad else ""
        raise UserError(f"CIFAR10 at {root}: {e}{which} (expected {root}/{LAYOUT}); {hint}") from e
    except OSError as e:  # a download that cannot reach the server
        raise UserError(
            f"CIFAR10: could not download to {root} ({e}); place {tv.CIFAR10.filename} there or its "
            f"extracted {LAYOUT}, then set dataset.download=false"
        ) from e
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2)  # a view: no second copy of 150 MB
    return InMemoryDataset(ArrayStore(images, torch.tensor(data.targets))), list(data.classes)


def build(root: str, download: bool, mean: list[float] | str, std: list[float] | str, seed: int) -> DataBundle:
    """`seed` is accepted like every family's, and unused: CIFAR10's splits are fixed."""
    values.parse_statistic(mean, "dataset.mean"), values.parse_statistic(std, "dataset.std")
    train, classes = _split(root, True, download)
    val, _ = _split(root, False, False)  # the first call downloaded everything if asked to
    mean, std = values.normalization(mean, std, train, 3)  # from the 50k training images, never the test split
    return DataBundle(
        train=train,
        val=val,
        classes=classes,
        input_shape=(3, 32, 32),
        mean=per_channel(mean, 3, "dataset.mean"),
        std=per_channel(std, 3, "dataset.std"),
    )
