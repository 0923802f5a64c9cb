"""Presets that need an optional Hydra plugin, not in requirements.txt: the SLURM preset (configs/cluster/slurm.yaml,
Hydra's submitit launcher, installed on the cluster only) and the hyperparameter search
(configs/hparams_search/optuna.yaml, Hydra's Optuna sweeper). Without the plugin Hydra's own report is a screenful
about a missing config; train.py checks first and says what to install in one line. Launchers and sweepers act
only in multirun mode: without -m the SLURM preset would train on the login node and the search would train one
run with the defaults, so that is refused too.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    choice: str  # as typed on the command line
    plugin: str  # the module the plugin installs
    what: str  # the plugin, in words
    install: str
    acts: str  # what it does in multirun mode
    without_m: str  # what would happen without -m


PRESETS = (
    Preset("cluster=slurm", "hydra_plugins.hydra_submitit_launcher", "Hydra's submitit launcher, installed on the "
           "cluster only", "pip install hydra-submitit-launcher", "submits jobs", "training would run here"),
    # The sweeper's last release (1.3.0) pins optuna < 3; these two install together and work with hydra-core 1.3.
    Preset("hparams_search=optuna", "hydra_plugins.hydra_optuna_sweeper", "Hydra's Optuna sweeper",
           "pip install hydra-optuna-sweeper==1.3.0 optuna==2.10.1", "searches",
           "one run would train with the defaults"),
)


def require_plugins(argv: Sequence[str]) -> None:
    """Exit with one line (code 1) when train.py's arguments choose a preset whose plugin is missing, or choose
    it without -m."""
    for preset in PRESETS:
        if preset.choice not in argv:
            continue
        if not installed(preset.plugin):
            _exit(f"{preset.choice} needs {preset.what}: {preset.install}")
        if not {"-m", "--multirun"} & set(argv):
            _exit(f"{preset.choice} {preset.acts} only in multirun mode: add -m (python train.py -m {preset.choice} ...); "
                  f"without it {preset.without_m}")


def installed(module: str) -> bool:
    """Whether `module` (a plugin's, under the hydra_plugins namespace) can be imported here."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _exit(message: str) -> None:
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(1)
