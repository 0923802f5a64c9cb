"""The one exception type for mistakes a user can fix (bad config, bad data, missing files), and how the
entry points (train.py, evaluate.py, export.py, preview.py) report it: one line without a traceback
(HYDRA_FULL_ERROR=1 shows one); everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem in the user's config or data; the message names the key, file or row and what to do."""


def one_line_or_exit(work: Callable[[], T], log: logging.Logger, reraise: bool = False) -> T:
    """`work()`, or, on a UserError, its message logged as one line and exit code 1. `reraise` (a sweep job,
    whose failure Hydra records while the other jobs run) and HYDRA_FULL_ERROR=1 raise it instead."""
    try:
        return work()
    except UserError as e:
        if reraise or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", e)
        sys.exit(1)
