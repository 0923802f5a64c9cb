"""Every dataset key that says how items become the model's uint8 input, whatever the source: one place for
them, checked once, before any file is opened.

A family's builder (crops.build, folders.build_imagefolder, ...) takes the keys that say where its items come
from (csv, root, extensions, download) and hands the rest here, by keyword: a key this spec does not know is a
TypeError naming it, as a misspelt constructor argument is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import splits, values
from datasets.base import CACHE_MODES, check_image_keys
from datasets.splits import SplitRule
from errors import UserError

PROJECT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DataSpec:
    width: int = 32  # every item is resized to width x height (no resize when it already matches)
    height: int = 32
    channels: int = 3  # 1 (grey) or 3 (RGB)
    cache: str = "memory"  # none | memory | disk (datasets/pipeline.py)
    cache_dir: str | None = None  # null: .cache/<family> in the project folder
    val_fraction: float = 0.2  # for items without a split of their own
    mean: Any = (0.5,)  # per channel (or one for all), in 0..1 units, or auto
    std: Any = (0.5,)
    value_range: Any = None  # how .npy values become 0..255 (datasets/values.py); None: images only
    on_bad_rows: str = "error"  # error | skip: what a source does with items it cannot use (checked by it)
    allow_outside_root: bool = False  # true: items may name files outside the source's root
    verify: bool = False  # true: decode every item up front even with cache=none, listing every failure
    level: int = 0  # pyramid level items are cut from (tiled TIFF; 0: full resolution), boxes in level-0 pixels
    seed: int = 0  # draws the seeded split
    split_by: str = "auto"  # auto | file | region | row (datasets/splits.py)
    group_pattern: str | None = None  # a regex whose match in a file name names the file's group
    folds: int = 5  # with `fold`: the number of folds
    fold: int | None = None  # i: hold out fold i of `folds` instead of val_fraction
    # Not a config key: region blocks a file validation takes, 1 for a checkpoint's region split made before
    # the rule took 4 (training/build.py's saved_mapping), so such a run resumes and scores as it split.
    region_val_blocks: int = splits.VAL_BLOCKS

    @property
    def split_rule(self) -> SplitRule:
        return SplitRule(self.split_by, self.val_fraction, self.folds, self.fold, self.group_pattern, self.seed,
                         self.region_val_blocks)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) every item is seen as by the model."""
        return self.channels, self.height, self.width

    def check(self) -> None:
        """Every key whose validity does not depend on the data, before any file is opened."""
        check_image_keys(self.width, self.height, self.channels, self.val_fraction)
        self.split_rule.check()
        if self.value_range is not None:
            values.parse_value_range(self.value_range)
        values.parse_statistic(self.mean, "dataset.mean"), values.parse_statistic(self.std, "dataset.std")
        if self.cache not in CACHE_MODES:
            raise UserError(f"dataset.cache must be one of {', '.join(CACHE_MODES)}, got {self.cache!r}")

    def cache_folder(self, family: str) -> Path:
        """Where cache=disk keeps this family's files (and where a memory error suggests it)."""
        return Path(self.cache_dir) if self.cache_dir else PROJECT / ".cache" / family
