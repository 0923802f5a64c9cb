"""Train the tutorial CNN on the configured data: python train.py [dataset=crops|imagefolder|...] [key=value ...]"""

import logging
import os
import sys

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

import training
from errors import UserError

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        metrics = training.run(cfg)
    except (UserError, InstantiationException) as e:
        # instantiate wraps whatever a target raises, so a dataset's or model's UserError arrives as the cause.
        error = e.__cause__ if isinstance(e, InstantiationException) else e
        if not isinstance(error, UserError) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", error)
        sys.exit(1)
    return metrics["val/acc"]  # the value a sweeper would optimise


if __name__ == "__main__":
    main()
