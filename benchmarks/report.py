"""What every benchmark does with its result: the JSON file, and a one-line error instead of a traceback."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from errors import UserError


def write(report: dict, out: Path) -> dict:
    """Write `report` as indented JSON to `out` (its folder made) and return it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report


def run(main: Callable[[], object]) -> None:
    """A benchmark's `__main__`: bad settings end in one line naming the problem."""
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
