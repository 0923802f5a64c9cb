"""Which items train and which validate, as one pure function of the items and the split keys (`split`), so
a resumed run and evaluate.py draw exactly the items the run did.

Items that bring a split of their own (a CSV's split column, train/ and val/ folders, CIFAR10's test set) keep
it in every mode and fold. The rest are split by `dataset.split_by`:
  row     a seeded, class-stratified draw of items (the only rule before split_by existed);
  file    whole groups on one side: a crop CSV's source files, or the groups `dataset.group_pattern` names
          (patients, bursts), for any family; seeded and stratified by class over groups;
  region  crops only: each source file is cut into a grid of about VAL_BLOCKS / val_fraction blocks (folds:
          VAL_BLOCKS x `folds`), blocks are split as groups (a crop goes where its centre is), and a drawn
          training crop that overlaps any validation crop is left out;
  auto    file where every class has crops from enough source files (two; `folds` with folds) for both sides, else
          region (row where the blocks leave a side empty: a handful of crops); for folders, file with a
          group_pattern and row without one (each file is its own item).
Why: crops of one image on both sides of a row split overlap or neighbour each other, and the validation
accuracy then measures memory (real photos, 10 classes: 76% reported against 57% on unseen photo halves).
`dataset.fold=i` holds out the i-th of `dataset.folds` (default 5) class-stratified folds of the same units
(items, groups or blocks) instead of `val_fraction`: `python train.py -m dataset.fold=0,1,2,3,4` is 5-fold
cross-validation.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np

from datasets.base import check_val_fraction
from errors import UserError

SPLIT_HINTS = (None, "train", "val")  # an item's split hint is its index here (int8)
SPLIT_BY = ("auto", "file", "region", "row")
# A region block is at least this many typical (median) crop sides across: a crop straddling a block's edge
# overlaps few crops of the next block, so few training crops are left out.
BLOCK_SIDES = 4
# Validation takes about this many region blocks of each file (blocks allowing). One block is one kind of
# content (sky, a face): its accuracy swings with what that block shows and with each epoch's model, so with
# one block a file (the rule before `val_blocks` was recorded) the default split read 8.7 points below
# accuracy on unseen photo halves (colour, 8 seeds; grey 10.1), against +3.3 and -4.5 with 4
# (benchmarks/split_leak.py). The price: more block edges, so more training crops left out (12% against 7%).
VAL_BLOCKS = 4
# Pairs of boxes compared per numpy call when looking for overlaps: bounds the temporary arrays (~8 bytes x
# 4 columns a pair: 128 MiB at most) whatever the number of crops in one file.
PAIRS_PER_CALL = 2**22


@dataclass(frozen=True)
class SplitRule:
    """The keys that decide a split (dataset.split_by, val_fraction, folds, fold, group_pattern, the seed)."""

    by: str = "auto"
    val_fraction: float = 0.2
    folds: int = 5
    fold: int | None = None  # None: hold out val_fraction; i: hold out fold i of `folds`
    group_pattern: str | None = None
    seed: int = 0
    val_blocks: int = VAL_BLOCKS  # region: blocks a file validation takes (1: a checkpoint made before it was 4)

    def check(self) -> None:
        """Every split key on its own, before any file is opened."""
        check_val_fraction(self.val_fraction)
        if self.by not in SPLIT_BY:
            raise UserError(f"dataset.split_by must be one of {', '.join(SPLIT_BY)}, got {self.by!r}")
        if not (isinstance(self.folds, int) and self.folds >= 2):
            raise UserError(f"dataset.folds must be an integer >= 2, got {self.folds!r}")
        if self.fold is not None and not 0 <= self.fold < self.folds:
            raise UserError(f"dataset.fold must be between 0 and {self.folds - 1} for dataset.folds={self.folds} "
                            f"(or null: no folds), got {self.fold}")
        if self.group_pattern is not None:
            _compiled(self.group_pattern)


@dataclass(frozen=True)
class Split:
    """Sorted item indices of each side, and what the log and the checkpoint say about them."""

    train: np.ndarray
    val: np.ndarray
    by: str  # the rule used: row, file or region (auto resolved), or given (every item brought its own)
    reason: str  # why that rule, for the log
    left_out: int = 0  # region: drawn training items left out for overlapping a validation item
    overlaps: int = 0  # row: training items overlapping a validation item of the same source file

    def record(self, rule: SplitRule) -> dict:
        """What a checkpoint keeps: the rule as resolved, and a digest of the validation items to check that a
        resumed run or evaluate.py rebuilt the same split."""
        record = {"by": self.by, "folds": rule.folds if rule.fold is not None else None, "fold": rule.fold,
                  "train": int(len(self.train)), "val": int(len(self.val)), "left_out": self.left_out,
                  "val_digest": digest(self.val)}
        if self.by == "region":  # absent: a region split made before it was recorded, with one block a file
            record["val_blocks"] = rule.val_blocks
        return record


def digest(indices: np.ndarray) -> str:
    """A short fingerprint of a set of item indices (16 hex digits of SHA-256)."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


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


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of each item: each class's items in a seeded order dealt round the folds, each class
    starting where the last one stopped, so folds differ in size by at most one item."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    start = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = (start + np.arange(len(members))) % folds
        start += len(members)
    return fold


def group_bins(labels: np.ndarray, groups: np.ndarray, shares: Sequence[float], seed: int) -> np.ndarray:
    """The bin (index into `shares`) of each group id in 0..groups.max(): every group whole in one bin, each
    class's items shared among the bins as near `shares` as whole groups allow.

    First every class gets a group in every bin where it has groups enough (rarest classes first, the smallest
    group to the smallest share); then the other groups, largest first (seeded order among equals), each go to
    the bin that brings the per-class counts nearest their targets (least squared shortfall, relative to the
    class's size)."""
    rng = np.random.default_rng(seed)
    n_groups, n_classes, n_bins = int(groups.max()) + 1, int(labels.max()) + 1, len(shares)
    counts = np.zeros((n_groups, n_classes), dtype=np.int64)
    np.add.at(counts, (groups, labels), 1)
    totals = counts.sum(axis=0)
    targets = np.outer(np.asarray(shares, dtype=np.float64), totals)  # (bins, classes)
    weight = 1.0 / np.maximum(totals, 1)
    held = np.zeros((n_bins, n_classes), dtype=np.float64)
    assigned = np.full(n_groups, -1, dtype=np.int64)
    order = rng.permutation(n_groups)  # the seeded order every tie falls back on

    def put(group: int, bin_: int) -> None:
        assigned[group] = bin_
        held[bin_] += counts[group]

    by_share = np.argsort(np.asarray(shares), kind="stable")
    groups_of_class = (counts > 0).sum(axis=0)
    for c in np.argsort(groups_of_class, kind="stable"):
        if groups_of_class[c] < n_bins:
            continue  # too few groups for every bin: the greedy pass below places them
        for bin_ in by_share:
            if held[bin_, c] > 0:
                continue
            free = order[(assigned[order] < 0) & (counts[order, c] > 0)]
            if len(free):
                put(int(free[np.argmin(counts[free].sum(axis=1))]), int(bin_))  # first of the smallest
    rest = order[assigned[order] < 0]
    rest = rest[np.argsort(-counts[rest].sum(axis=1), kind="stable")]
    for group in rest.tolist():
        members = np.flatnonzero(counts[group])
        before = ((held[:, members] - targets[:, members]) ** 2 * weight[members]).sum(axis=1)
        after = ((held[:, members] + counts[group, members] - targets[:, members]) ** 2 * weight[members]).sum(axis=1)
        put(group, int(np.argmin(after - before)))
    return assigned


def pattern_groups(names: Sequence[str], pattern: str) -> np.ndarray:
    """Group ids (int32) of files by `dataset.group_pattern` searched in each file's name (not its folder): the
    first parenthesised group of the match, or the whole match. A name it does not match is a one-line error."""
    regex = _compiled(pattern)
    keys, unmatched = [], []
    for name in names:
        match = regex.search(PurePath(name).name)
        if match is None:
            unmatched.append(name)
            continue
        keys.append(match.group(1) if regex.groups else match.group(0))
    if unmatched:
        raise UserError(f"dataset.group_pattern {pattern!r} matches no part of {len(unmatched)} file name(s) "
                        f"(e.g. {PurePath(unmatched[0]).name!r}): every file needs a group; change the pattern")
    _, codes = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
    return codes.reshape(-1).astype(np.int32)


def _compiled(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(f"dataset.group_pattern {pattern!r} is not a regular expression ({e}); e.g. '^[^_]+' "
                        "groups files by the name's part before the first underscore") from None


def region_blocks(boxes: np.ndarray, files: np.ndarray, val_share: float, val_blocks: int = VAL_BLOCKS) -> np.ndarray:
    """The block id (int64) of each box (x0, y0, x1, y1) by its centre, over a grid per source file spanning
    its boxes: about val_blocks / val_share blocks a file, so validation takes about `val_blocks` large blocks
    of it (parts of the image away from most training crops, but not one kind of content only), no block
    under BLOCK_SIDES median crop sides across, and at least two blocks a file."""
    block = np.empty(len(boxes), dtype=np.int64)
    next_id = 0
    target = math.ceil(val_blocks / val_share - 1e-9)
    order = np.argsort(files, kind="stable")
    _, starts = np.unique(files[order], return_index=True)
    for rows in np.split(order, starts[1:]):
        b = boxes[rows].astype(np.int64)  # products of coordinates below overflow int32
        width, height = int(b[:, 2].max()), int(b[:, 3].max())
        strips = height == 1  # strip form: every crop spans the full height, blocks are column ranges
        sides = (b[:, 2] - b[:, 0]) if strips else np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]).astype(float))
        smallest = BLOCK_SIDES * float(np.median(sides))
        side = max(smallest, width / target if strips else math.sqrt(width * height / target))
        nx, ny = max(1, round(width / side)), 1 if strips else max(1, round(height / side))
        while nx * ny < target:  # split the longer blocks again while they stay wide enough
            if width / nx >= height / ny or strips:
                if width / (nx + 1) < smallest:
                    break
                nx += 1
            else:
                if height / (ny + 1) < smallest:
                    break
                ny += 1
        if nx * ny == 1:  # two blocks along the longer side, so a one-file class can be split at all
            nx, ny = (2, 1) if strips or width >= height else (1, 2)
        cx = np.minimum(((b[:, 0] + b[:, 2]) * nx) // (2 * width), nx - 1)
        cy = np.minimum(((b[:, 1] + b[:, 3]) * ny) // (2 * height), ny - 1)
        block[rows] = next_id + cy * nx + cx
        next_id += nx * ny
    return block


def overlapping(boxes: np.ndarray, files: np.ndarray, candidates: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Which of the items `candidates` share pixels with any item of `others` in the same source file (boxes
    half-open, x0, y0, x1, y1). Sorted by file and x0, only pairs whose x ranges can meet are compared."""
    hit = np.zeros(len(candidates), dtype=bool)
    if not len(candidates) or not len(others):
        return hit
    boxes = boxes.astype(np.int64, copy=False)  # sort keys below are file * span + x0
    max_width = int((boxes[others, 2] - boxes[others, 0]).max())
    # One sort key for (file, x0): others of the same file with x0 in (cand.x0 - max_width, cand.x1) can meet it.
    span = int(boxes[:, 2].max()) + max_width + 1
    key_others = files[others].astype(np.int64) * span + boxes[others, 0]
    order = np.argsort(key_others, kind="stable")
    sorted_others, sorted_keys = others[order], key_others[order]
    base = files[candidates].astype(np.int64) * span
    lo = np.searchsorted(sorted_keys, base + boxes[candidates, 0] - max_width, side="right")
    hi = np.searchsorted(sorted_keys, base + boxes[candidates, 2], side="left")
    counts = hi - lo
    bounds = np.concatenate([[0], np.cumsum(counts)])
    start = 0
    while start < len(candidates):  # candidates in runs of at most PAIRS_PER_CALL pairs (at least one)
        stop = max(start + 1, int(np.searchsorted(bounds, bounds[start] + PAIRS_PER_CALL, side="right")) - 1)
        stop = min(stop, len(candidates))
        run = np.arange(start, stop)
        which = np.repeat(run, counts[run])
        offsets = np.arange(len(which)) - np.repeat(bounds[run] - bounds[start], counts[run])
        other = sorted_others[lo[which] + offsets]
        a, b = boxes[candidates[which]], boxes[other]
        meets = (a[:, 0] < b[:, 2]) & (b[:, 0] < a[:, 2]) & (a[:, 1] < b[:, 3]) & (b[:, 1] < a[:, 3])
        hit[np.unique(which[meets])] = True
        start = stop
    return hit


def split(items, rule: SplitRule, what: str) -> Split:
    """The split of a source's items by `rule`.

    Args:
        items: datasets.sources.Items: per item its class (`labels`), SPLIT_HINTS code (`hints`) and group
            (source file) id (`groups`); `group_names`, the file each group id stands for (for group_pattern),
            or None; `boxes`, crops' regions (n, 4) x0, y0, x1, y1 in their files, or None; `classes`.
        rule: the split keys; `what` names the source in errors ("the crop CSV data/crops.csv").
    """
    labels, groups = items.labels, items.groups
    train, val, free = (np.flatnonzero(items.hints == SPLIT_HINTS.index(side)) for side in ("train", "val", None))
    left_out = overlaps = 0
    if not len(free):
        if rule.fold is not None:
            raise UserError(f"dataset.fold={rule.fold}: every item of {what} has a split of its own (a split "
                            "column, train/ and val/ folders), so there is nothing to fold; leave split "
                            "values out of the items to fold, or drop dataset.fold")
        by, reason = "given", "every item brings its own split"
    else:
        by, reason, unit = _resolve(labels[free], groups[free], items, rule, what)
        drawn = _drawn(by, unit, items, free, train, val, rule)
        if rule.by == "auto" and by == "region" and not (len(drawn[0]) and len(drawn[1])):
            # Blocks too few to give both sides items (a handful of crops): the row split, with its warning.
            by, reason = "row", "split_by=auto: row, too few crops for region blocks on both sides"
            drawn = _drawn(by, None, items, free, train, val, rule)
        train, val, left_out, overlaps = drawn
    if not len(train) or not len(val):
        missing = "training" if not len(train) else "validation"  # an all-val CSV was asked for more val
        raise UserError(
            f"{what} gives {len(train)} training and {len(val)} validation items: "
            f"mark some for {missing} in its split column or train/ and val/ folders, or leave "
            "them unmarked for a seeded split"
        )
    return Split(train, val, by, reason, left_out, overlaps)


def _drawn(by: str, unit: np.ndarray | None, items, free: np.ndarray, train: np.ndarray, val: np.ndarray,
           rule: SplitRule) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The items `free` (no split of their own) drawn by rule `by` and added to the given `train` and `val`:
    sorted indices of each side, the training crops left out (region) and those overlapping (row)."""
    labels, groups, boxes = items.labels, items.groups, items.boxes
    left_out = overlaps = 0
    folding = rule.fold is not None
    shares = [1 / rule.folds] * rule.folds if folding else [1 - rule.val_fraction, rule.val_fraction]
    held_bin = rule.fold if folding else 1
    if by == "row":
        if folding:
            in_val = stratified_folds(labels[free], rule.folds, rule.seed) == held_bin
            free_train, free_val = np.flatnonzero(~in_val), np.flatnonzero(in_val)
        else:  # exactly the split every run drew before split_by existed (old checkpoints keep it)
            free_train, free_val = stratified(labels[free], rule.val_fraction, rule.seed)
    else:
        if by == "region":
            unit = region_blocks(boxes[free], groups[free], shares[held_bin], rule.val_blocks)
        _, unit = np.unique(unit, return_inverse=True)
        in_val = group_bins(labels[free], unit.reshape(-1), shares, rule.seed)[unit.reshape(-1)] == held_bin
        free_train, free_val = np.flatnonzero(~in_val), np.flatnonzero(in_val)
    drawn_train = free[free_train]
    val = np.sort(np.concatenate([val, free[free_val]]))
    if boxes is not None:
        hits = overlapping(boxes, groups, drawn_train, val)
        if by == "region":  # a crop straddling a block edge shares pixels with the next block's crops
            left_out, drawn_train = int(hits.sum()), drawn_train[~hits]
        elif by == "row":
            overlaps = int(hits.sum())
    return np.sort(np.concatenate([train, drawn_train])), val, left_out, overlaps


def _resolve(labels: np.ndarray, groups: np.ndarray, items, rule: SplitRule,
             what: str) -> tuple[str, str, np.ndarray | None]:
    """The rule `auto` stands for here and why, and the units a file split keeps whole (group ids)."""
    crops = items.boxes is not None
    if rule.group_pattern is not None:
        if items.group_names is None:
            raise UserError(f"dataset.group_pattern: {what} names no files to group; leave the key out")
        units = pattern_groups(items.group_names, rule.group_pattern)[groups]
        unit_name = f"groups of dataset.group_pattern {rule.group_pattern!r}"
    else:
        units, unit_name = groups, "source files"
    needed = rule.folds if rule.fold is not None else 2
    if rule.by == "row":
        return "row", "split_by=row", None
    if rule.by == "region":
        if not crops:
            raise UserError(f"dataset.split_by=region needs crops (regions of source files); {what} holds whole "
                            "files: use split_by=file with dataset.group_pattern, or row")
        return "region", "split_by=region", None
    if not crops and rule.group_pattern is None:
        if rule.by == "file":
            raise UserError(f"dataset.split_by=file for {what} needs dataset.group_pattern (a regular expression "
                            "whose match in a file name names its group, e.g. '^[^_]+'): each file is an item "
                            "already")
        return "row", "split_by=auto: each file is its own item (no dataset.group_pattern)", None
    per_class = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    pairs = np.unique(np.stack([labels, units]), axis=1)
    np.add.at(per_class, pairs[0], 1)
    present = np.unique(labels)
    fewest = int(present[np.argmin(per_class[present])])
    name = items.classes[fewest]
    enough = per_class[fewest] >= needed
    if rule.by == "file":
        if per_class[fewest] < 2:
            raise UserError(f"dataset.split_by=file: class {name!r} of {what} has all its items in one of "
                            f"its {unit_name}, so a file split cannot put it on both sides: add files, or use "
                            "split_by=region (crops) or row")
        return "file", f"split_by=file over {len(np.unique(units))} {unit_name}", units
    if enough:
        return "file", (f"split_by=auto: file, every class has items in at least {needed} {unit_name} "
                        f"({len(np.unique(units))} in all)"), units
    if not crops:
        raise UserError(f"dataset.group_pattern: class {name!r} of {what} has items in "
                        f"{per_class[fewest]} group(s), too few for a group split ({needed} needed): change "
                        "the pattern, or set dataset.split_by=row")
    return "region", (f"split_by=auto: region, class {name!r} has crops from {per_class[fewest]} of its {unit_name} only "
                      f"(a file split needs {needed})"), None
