"""Score a checkpoint or classify files with it:
python evaluate.py checkpoint=PATH [dataset=CHOICE ...] [predict=[a.png,b.npy]]"""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from errors import UserError
from training import schema
from training.evaluation import run_evaluation

log = logging.getLogger("evaluate")
schema.register()  # before @hydra.main composes: the YAML files name the schemas as their base


def table(result: dict) -> str:
    """Per-class accuracy and confusion counts (columns: predicted class index), or one line per file."""
    if "predictions" in result:
        width = max(len(p["file"]) for p in result["predictions"])
        return "\n".join(f"{p['file']:<{width}}  {p['class']}  {p['probability']:.3f}" for p in result["predictions"])
    classes = result["classes"]
    width = max(len(name) for name in [*classes, "all"]) + 4
    lines = [f"{'class':<{width}} {'items':>6} {'acc':>7}   " + " ".join(f"{j:>5}" for j in range(len(classes)))]
    for i, (name, row) in enumerate(zip(classes, result["confusion"])):
        acc = result["per_class_acc"][name]
        lines.append(f"{f'{i} {name}':<{width}} {sum(row):>6} {'-' if acc is None else f'{acc:.1%}':>7}   "
                     + " ".join(f"{n:>5}" for n in row))
    total = sum(map(sum, result["confusion"]))
    lines.append(f"{'all':<{width}} {total:>6} {result['acc']:>7.1%}   loss {result['loss']:.4f}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        result = run_evaluation(cfg)
    except UserError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("%s", e)
        sys.exit(1)
    print(table(result))


if __name__ == "__main__":
    main()
