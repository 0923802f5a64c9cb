"""Map whole images with a trained model, window by window:
python predict.py checkpoint=PATH inputs=[scene.tif,other.png] [window=64] [stride=32] [tta=hflip]
Writes classmap.png, overlay.png and probabilities.npy per input and one predictions.json."""

import logging

import hydra
from omegaconf import DictConfig

from errors import one_line_or_exit
from training import schema

log = logging.getLogger("predict")
schema.register()  # before @hydra.main composes: the YAML files name the schemas as their base


@hydra.main(version_base="1.3", config_path="configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    # Imported here, not above: --help, --cfg and a refused run dir need only Hydra, not torch and the
    # rest of the command (~2-3 s of CPU at every start).
    from commands.prediction import run_prediction

    result = one_line_or_exit(lambda: run_prediction(cfg), log)
    for item in result["inputs"]:
        shares = ", ".join(f"{name} {share:.1%}" for name, share in item["fractions"].items())
        print(f"{item['file']}: {item['rows']}x{item['cols']} windows -> {item['folder']} ({shares})")


if __name__ == "__main__":
    main()
