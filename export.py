"""Write a checkpoint as an ONNX model (uint8 input, normalisation inside, any batch size):
python export.py checkpoint=PATH [output=model.onnx]"""

import logging

import hydra
from omegaconf import DictConfig

from errors import one_line_or_exit
from training import schema
from commands.onnx_model import run_export

log = logging.getLogger("export")
schema.register()  # before @hydra.main composes: the YAML files name the schemas as their base


@hydra.main(version_base="1.3", config_path="configs", config_name="export")
def main(cfg: DictConfig) -> None:
    output = one_line_or_exit(lambda: run_export(cfg), log)
    print(output)


if __name__ == "__main__":
    main()
