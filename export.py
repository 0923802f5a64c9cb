"""Write a checkpoint as an ONNX model (uint8 input, normalisation inside, any batch size):
python export.py checkpoint=PATH [output=model.onnx]"""

import logging

import hydra
from omegaconf import DictConfig

from errors import one_line_or_exit
from training import schema

log = logging.getLogger("export")
schema.register()  # before @hydra.main composes: the YAML files name the schemas as their base


@hydra.main(version_base="1.3", config_path="configs", config_name="export")
def main(cfg: DictConfig) -> None:
    # Imported here, not above: --help, --cfg and a refused run dir need only Hydra, not torch and the
    # rest of the command (~2-3 s of CPU at every start).
    from commands.onnx_model import run_export

    output = one_line_or_exit(lambda: run_export(cfg), log)
    print(output)


if __name__ == "__main__":
    main()
