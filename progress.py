"""The one rule for progress bars (training epochs, data preparation): drawn on a terminal only.

Redirected output (CI, nohup, a SLURM job's log) would otherwise fill with the bar's carriage-return
frames; there train.log's one line per epoch, also on the console, tells the same story.
"""

from __future__ import annotations

from collections.abc import Iterable

from tqdm import tqdm


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **options) -> tqdm:
    """tqdm over `iterable` (or updated by hand with `total=`), left on screen only while it runs."""
    # disable=None is tqdm's own test: off when its stream (stderr) is not a terminal.
    return tqdm(iterable, disable=None if enabled else True, leave=False, **options)
