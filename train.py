"""Train the tutorial CNN on the configured data: python train.py [dataset=crops|imagefolder|...] [key=value ...]"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import training
from errors import one_line_or_exit
from training import group_keys, launch, plugins, schema

log = logging.getLogger("train")
schema.register()  # before @hydra.main composes: the YAML files name the schemas as their base


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    # Imported here, with the runner (training.run), not above: --help, --cfg and a config Hydra refuses never
    # need torch (training/__init__.py).
    from training import stop

    try:
        # In a sweep, Hydra records the failed job and runs the others; exiting would end the sweep.
        metrics = one_line_or_exit(lambda: training.run(cfg), log, reraise=HydraConfig.get().mode == RunMode.MULTIRUN)
    except stop.Stopped as stopped:
        stop.hand_on(stopped)  # exits 128 + the signal (130 Ctrl-C, 143 SIGTERM); last.pt is saved, events flushed
    except KeyboardInterrupt:
        sys.exit(130)  # the shell's code for Ctrl-C
    return metrics["val/acc_best"]  # what a sweeper maximises (hparams_search=optuna): the best epoch's accuracy


if __name__ == "__main__":
    # Under torchrun, ranks other than 0 keep Hydra's files out of outputs/: rank 0's run dir is the run's.
    sys.argv += launch.hydra_overrides(launch.from_environment())
    plugins.require_plugins(sys.argv[1:])  # one line, not Hydra's report, when a preset's optional plugin is missing
    group_keys.refuse(sys.argv[1:])  # likewise for a key of another dataset choice (dataset=cifar10 dataset.fold=1)
    main()
