"""How array values become uint8 pixels (dataset.value_range), and the per-channel statistics of those pixels
(dataset.mean=auto, dataset.std=auto).

uint8 and bool arrays are pixels already (bool: 0/255). Every other dtype is mapped linearly from a range
[low, high] to 0..255 and clipped; the setting decides where the range comes from:
  per_file      each file's own range, by the rule below (the behaviour before dataset.value_range existed);
  global        one range over every array file of the data set, by the same rule;
  [low, high]   the range given; values outside are clipped and counted.
The rule, for the values seen: floats all within [0, 1] map from [0, 1] (times 255), integers all within
0..255 map from [0, 255] (as they are), anything else from its own minimum to maximum.

NaN and infinity have no place on that scale: a file holding any is refused, naming the file and the count.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.base import problem_list
from errors import UserError

log = logging.getLogger(__name__)

PER_FILE, GLOBAL = "per_file", "global"
AUTO = "auto"
CHUNK_VALUES = 1 << 22  # values read per step of a scan: bounds the temporaries to ~32 MiB of float64
MIN_STD = 1e-6  # the smallest std a normalisation may divide by (a channel that constant has no spread to learn)
STATS_BATCH = 4096  # items gathered per step of the mean/std pass: bounds the gathered copy's memory


def parse_value_range(setting, key: str = "dataset.value_range") -> str | tuple[float, float]:
    """per_file, global or a (low, high) pair of finite numbers with low < high."""
    if setting in (PER_FILE, GLOBAL):
        return setting
    if isinstance(setting, str) or not isinstance(setting, Sequence) or len(setting) != 2:
        raise UserError(f"{key} must be per_file, global or [low, high], got {setting!r}")
    try:
        low, high = float(setting[0]), float(setting[1])
    except (TypeError, ValueError):
        raise UserError(f"{key} must be per_file, global or [low, high] with two numbers, got {setting!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise UserError(f"{key}=[{low}, {high}]: give two finite numbers with low < high")
    return low, high


def is_pixels(dtype: np.dtype) -> bool:
    """uint8 and bool arrays are used as they are; no value range applies to them."""
    return dtype == np.uint8 or dtype == np.bool_


@dataclass(frozen=True)
class Scale:
    """Maps values linearly from [low, high] to 0..255, clipping what lies outside; picklable, so a lazy
    dataset's workers receive it with the dataset."""

    low: float
    high: float

    def __call__(self, values) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        return np.clip(np.rint((values - self.low) * (255.0 / (self.high - self.low))), 0, 255).astype(np.uint8)


def pixels(values) -> np.ndarray:
    """uint8 as it is, bool as 0/255 (the mapping of arrays that need no value range)."""
    values = np.asarray(values)
    return values.astype(np.uint8) * np.uint8(255) if values.dtype == np.bool_ else values


@dataclass
class ArrayStats:
    """One array's value range and the values a given range would clip."""

    low: float
    high: float
    is_float: bool
    outside: int = 0  # values below or above the range asked about (0 when none was asked)
    size: int = 0


def array_stats(array: np.ndarray, path, bounds: tuple[float, float] | None = None) -> ArrayStats:
    """Minimum and maximum of a (memory-mapped) array, read in chunks of rows; refuses NaN and infinity,
    naming `path` and how many values are affected. With `bounds`, also counts the values outside them."""
    rows_per_chunk = max(1, CHUNK_VALUES // max(1, array[0].size))
    low, high, outside, nonfinite = math.inf, -math.inf, 0, 0
    for start in range(0, len(array), rows_per_chunk):
        chunk = np.asarray(array[start:start + rows_per_chunk])
        chunk_low, chunk_high = float(chunk.min()), float(chunk.max())
        if not (math.isfinite(chunk_low) and math.isfinite(chunk_high)):  # min/max propagate NaN and inf
            nonfinite += int(np.count_nonzero(~np.isfinite(chunk)))
            continue
        low, high = min(low, chunk_low), max(high, chunk_high)
        if bounds is not None:
            outside += int(np.count_nonzero(chunk < bounds[0])) + int(np.count_nonzero(chunk > bounds[1]))
    if nonfinite:
        raise UserError(f"{path}: {nonfinite} of {array.size} values are NaN or infinite; replace them (e.g. "
                        "np.nan_to_num) or drop the file: they have no place on the 0..255 pixel scale")
    return ArrayStats(low, high, array.dtype.kind == "f", outside, array.size)


def _combined(stats: list[ArrayStats]) -> ArrayStats:
    """One file's statistics from those of its regions."""
    if len(stats) == 1:
        return stats[0]
    return ArrayStats(min(s.low for s in stats), max(s.high for s in stats), stats[0].is_float,
                      sum(s.outside for s in stats), sum(s.size for s in stats))


def rule_scale(stats: Sequence[ArrayStats]) -> Scale:
    """The range the rule picks for these arrays taken together (one file for per_file, all for global)."""
    low, high = min(s.low for s in stats), max(s.high for s in stats)
    if all(s.is_float for s in stats) and low >= 0.0 and high <= 1.0:
        return Scale(0.0, 1.0)
    if not any(s.is_float for s in stats) and low >= 0 and high <= 255:
        return Scale(0.0, 255.0)
    return Scale(low, high if high > low else low + 1.0)  # a constant file maps to 0


def resolve(setting: str | tuple[float, float], arrays: Iterable[tuple[object, np.ndarray]],
            problems: list[str]) -> tuple[dict, str | tuple[float, float]]:
    """One scan over every array file: {path: Scale} for the files that need one, and the resolved setting
    (per_file, or the (low, high) every file was mapped from). `arrays` yields (path, opened array) pairs,
    one file at a time; `problems` holds what opening them found, reported with the files this scan refuses.

    Refuses every file holding NaN or infinity in one error. An explicit range logs, once, how many values
    it clips."""
    started = time.perf_counter()
    bounds = setting if isinstance(setting, tuple) else None
    stats = {}
    for path, array in arrays:
        views = array if isinstance(array, list) else [array]  # regions of one file (its crops' windows)
        if is_pixels(views[0].dtype):
            continue
        try:
            stats[path] = _combined([array_stats(view, path, bounds) for view in views])
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise UserError(f"{len(problems)} array file(s) cannot be used; fix or remove them:" + problem_list(problems))
    if setting == PER_FILE:
        return {path: rule_scale([s]) for path, s in stats.items()}, PER_FILE
    scale = Scale(*bounds) if bounds is not None else rule_scale(list(stats.values())) if stats else Scale(0.0, 1.0)
    seconds = time.perf_counter() - started
    if bounds is not None and stats:  # images alone (no array files) have nothing to report
        outside, total = sum(s.outside for s in stats.values()), sum(s.size for s in stats.values())
        clipped_files = sum(1 for s in stats.values() if s.outside)
        (log.warning if outside else log.info)(
            "dataset.value_range=[%g, %g]: %d of %d values (%.3g%%) in %d of %d array file(s) lie outside and are "
            "clipped (scanned in %.2f s)", *bounds, outside, total, 100 * outside / max(total, 1), clipped_files,
            len(stats), seconds)
    elif stats:
        log.info("dataset.value_range=global: [%g, %g] over %d array file(s) (scanned in %.2f s)", scale.low,
                 scale.high, len(stats), seconds)
    return dict.fromkeys(stats, scale), (scale.low, scale.high)


def parse_statistic(value, key: str) -> str | list[float]:
    """dataset.mean / dataset.std: auto, or a list of numbers (one, or one per channel)."""
    if value == AUTO:
        return AUTO
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise UserError(f"{key} must be auto or a list of numbers (one, or one per channel), got {value!r}")
    try:
        numbers = [float(v) for v in value]
    except (TypeError, ValueError):
        raise UserError(f"{key} must be auto or a list of numbers (one, or one per channel), got {value!r}") from None
    if not all(map(math.isfinite, numbers)):
        raise UserError(f"{key}={numbers} holds NaN or infinity: give finite numbers (in 0..1 units) or auto")
    if key.endswith("std") and min(numbers) < MIN_STD:
        # Inputs are divided by std: 0 gave NaN losses, a negative one flipped every input, a tiny one overflows.
        raise UserError(f"{key}={numbers}: every std must be at least {MIN_STD:g} (pixel values span 0..1): "
                        "give the data's spread, or auto")
    return numbers


def channel_histograms(train: Dataset, channels: int) -> torch.Tensor:
    """(channels, 256) counts of every pixel value of the training split: one pass over uint8 data already in
    memory (a dataset with `.store` and `.indices`), else one decode of every item."""
    store, indices = getattr(train, "store", None), getattr(train, "indices", None)
    if store is not None and indices is not None:
        # Counted as stored: grey data held once for 3 channels has the same counts in each of them.
        held = store.stored_channels
        batches = (store.images[chunk] for chunk in torch.split(indices, STATS_BATCH))
    else:
        held = channels
        batches = (train[i][0].unsqueeze(0) for i in range(len(train)))
    counts = torch.zeros((held, 256), dtype=torch.int64)
    for batch in batches:
        for c in range(held):
            # bincount of uint8 per channel: ~10x faster than float sums of squares, and exact.
            counts[c] += torch.bincount(batch[:, c].reshape(-1), minlength=256)
    return counts.expand(channels, 256)


def normalization(mean, std, train: Dataset, channels: int) -> tuple[list[float], list[float]]:
    """dataset.mean/std as lists, `auto` resolved from the training split's pixels, in 0..1 units (applied
    after dividing by 255); a list given in the config is returned as it is (per_channel broadcasts it)."""
    mean, std = parse_statistic(mean, "dataset.mean"), parse_statistic(std, "dataset.std")
    if AUTO not in (mean, std):
        return mean, std
    if len(train) == 0:
        raise UserError("dataset.mean/std=auto: the training split is empty; give the values as numbers")
    started = time.perf_counter()
    counts = channel_histograms(train, channels).to(torch.float64)
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    n = counts.sum(dim=1)
    means = (counts @ levels) / n
    stds = ((counts @ levels**2) / n - means**2).clamp_min(0.0).sqrt()
    if std == AUTO and bool((stds < MIN_STD).any()):
        flat = [c for c in range(channels) if stds[c] < MIN_STD]
        raise UserError(f"dataset.std=auto: channel(s) {flat} hold one value over the whole training split, so "
                        "their std is 0; give dataset.std as numbers")
    found_mean, found_std = [round(float(v), 6) for v in means], [round(float(v), 6) for v in stds]
    log.info("dataset.mean/std=auto: mean %s, std %s over %d training items (%.2f s)", found_mean, found_std,
             len(train), time.perf_counter() - started)
    return (found_mean if mean == AUTO else mean), (found_std if std == AUTO else std)
