"""Write a checkpoint as an ONNX model (uint8 input, normalisation inside, any batch size):
python export.py checkpoint=PATH [output=model.onnx]"""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from errors import UserError
from training import schema
from training.onnx_model import run_export

log = logging.getLogger("export")
schema.register()  # before @hydra.main composes: the YAML files name the schemas as their base


@hydra.main(version_base="1.3", config_path="configs", config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        output = run_export(cfg)
    except UserError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", e)
        sys.exit(1)
    print(output)


if __name__ == "__main__":
    main()
