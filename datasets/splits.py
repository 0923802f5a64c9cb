"""Which items train and which validate: items that bring a split of their own (a CSV's split column, train/
and val/ folders, CIFAR10's test set) keep it; the rest are drawn by a seeded, class-stratified split.

Kept apart from the sources and the pipeline so another rule (a split by group: whole source files or
regions on one side) is one more function here, fed by the items' `groups`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from datasets.base import check_val_fraction
from errors import UserError

SPLIT_HINTS = (None, "train", "val")  # an item's split hint is its index here (int8)


def stratified(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split, stratified by class so small classes appear in both parts; returns sorted indices."""
    check_val_fraction(val_fraction)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        # A class with one item trains on it; otherwise at least one item on each side.
        n_val = 0 if len(members) == 1 else min(max(1, round(len(members) * val_fraction)), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def by_hint_then_drawn(hints: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int,
                       what: str) -> tuple[np.ndarray, np.ndarray]:
    """Items with a hint keep it; the rest get a seeded, class-stratified split. Sorted item indices.
    `what` names the source in the error raised when either side is empty (e.g. "the crop CSV")."""
    train, val, free = (np.flatnonzero(hints == SPLIT_HINTS.index(split)) for split in ("train", "val", None))
    if len(free):
        free_train, free_val = stratified(labels[free], val_fraction, seed)
        train, val = np.sort(np.concatenate([train, free[free_train]])), np.sort(np.concatenate([val, free[free_val]]))
    if not len(train) or not len(val):
        missing = "training" if not len(train) else "validation"  # an all-val CSV was asked for more val
        raise UserError(
            f"{what} gives {len(train)} training and {len(val)} validation items: "
            f"mark some for {missing} in its split column or train/ and val/ folders, or leave "
            "them unmarked for a seeded split"
        )
    return train, val
