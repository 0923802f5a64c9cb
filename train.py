"""Train the tutorial CNN on the configured data: python train.py [dataset=crops|imagefolder|...] [key=value ...]"""

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import training
from errors import UserError
from training import schema

log = logging.getLogger("train")
schema.register()  # before @hydra.main composes: the YAML files name the schemas as their base


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        metrics = training.run(cfg)
    except UserError as e:
        # In a sweep, Hydra records the failed job and runs the others; exiting would end the sweep.
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        log.error("%s", e)
        sys.exit(1)
    return metrics["val/acc"]  # the value a sweeper would optimise


if __name__ == "__main__":
    main()
