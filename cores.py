"""How many cores this process may use. A top-level module of its own because both sides need it: datasets
decode files on that many threads, training sizes its loader workers and torch threads by it, and neither
package may import the other's modules for it (datasets sit below training)."""

from __future__ import annotations

import os


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_processes() -> int:
    """Processes torchrun started on this machine (1 without torchrun): they share its cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def cores_per_process() -> int:
    """This process's share of the machine's cores: all of them, or a torchrun process's part."""
    return max(1, available_cores() // local_processes())
