"""Score a checkpoint or classify files with it:
python evaluate.py checkpoint=PATH [dataset=CHOICE ...] [predict=[a.png,b.npy]]"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from errors import one_line_or_exit
from training import group_keys, schema

log = logging.getLogger("evaluate")
schema.register()  # before @hydra.main composes: the YAML files name the schemas as their base


def table(result: dict) -> str:
    """Per-class accuracy, precision, recall, F1 and confusion counts (columns: predicted class index), or one
    line per file."""
    if "predictions" in result:
        width = max(len(p["file"]) for p in result["predictions"])
        return "\n".join(f"{p['file']:<{width}}  {p['class']}  {p['probability']:.3f}" for p in result["predictions"])
    classes = result["classes"]
    width = max(len(name) for name in [*classes, "all"]) + 4
    columns = ("acc", "precision", "recall", "f1")
    lines = [f"{'class':<{width}} {'items':>6} " + " ".join(f"{c:>9}" for c in columns) + "   "
             + " ".join(f"{j:>5}" for j in range(len(classes)))]
    for i, (name, row) in enumerate(zip(classes, result["confusion"])):
        values = [result["per_class_acc"][name], *(result[c][name] for c in columns[1:])]
        lines.append(f"{f'{i} {name}':<{width}} {sum(row):>6} "
                     + " ".join(f"{'-' if v is None else f'{v:.1%}':>9}" for v in values) + "   "
                     + " ".join(f"{n:>5}" for n in row))
    total = sum(map(sum, result["confusion"]))
    f1_macro = "-" if result["f1_macro"] is None else f"{result['f1_macro']:.1%}"
    lines.append(f"{'all':<{width}} {total:>6} {result['acc']:>9.1%}   macro-F1 {f1_macro}   "
                 f"loss {result['loss']:.4f}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    # Imported here, not above: --help, --cfg and a refused run dir need only Hydra, not torch and the
    # rest of the command (~2-3 s of CPU at every start).
    from commands.evaluation import run_evaluation

    result = one_line_or_exit(lambda: run_evaluation(cfg), log)
    print(table(result))


if __name__ == "__main__":
    group_keys.refuse(sys.argv[1:], "evaluate")  # one line for a key the chosen dataset does not take
    main()
