"""The SLURM preset (configs/cluster/slurm.yaml) needs Hydra's submitit launcher, a plugin installed on the
cluster only (`pip install hydra-submitit-launcher`, not in requirements.txt). Without it Hydra's own report is
a screenful about a missing config; train.py checks first and says what to install in one line. Hydra's
launchers act only in multirun mode: without -m the preset would train on the login node, so that is refused too.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

PRESET = "cluster=slurm"
PLUGIN = "hydra_plugins.hydra_submitit_launcher"
INSTALL = "pip install hydra-submitit-launcher"


def require_launcher(argv: Sequence[str]) -> None:
    """Exit with one line (code 1) when train.py's arguments choose the SLURM preset and it cannot submit."""
    if PRESET not in argv:
        return
    if not _has_plugin():
        _exit(f"{PRESET} needs Hydra's submitit launcher, installed on the cluster only: {INSTALL}")
    if not {"-m", "--multirun"} & set(argv):
        _exit(f"{PRESET} submits jobs only in multirun mode: add -m (python train.py -m {PRESET} ...); without it "
              "training would run here")


def _has_plugin() -> bool:
    try:
        return importlib.util.find_spec(PLUGIN) is not None
    except ModuleNotFoundError:
        return False


def _exit(message: str) -> None:
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(1)
