"""Show what training would use, before training: python preview.py [dataset=CHOICE dataset.key=value ...]
Writes sources/<file>.png (CSV boxes on each source) and classes.png, prints class counts and bad rows."""

import logging
import sys

import hydra
from omegaconf import DictConfig

from errors import one_line_or_exit
from training import group_keys, schema

log = logging.getLogger("preview")
schema.register()  # before @hydra.main composes: the YAML files name the schemas as their base


@hydra.main(version_base="1.3", config_path="configs", config_name="preview")
def main(cfg: DictConfig) -> None:
    # Imported here, not above: --help, --cfg and a refused run dir need only Hydra, not torch and the
    # rest of the command (~2-3 s of CPU at every start).
    from commands.preview import report, run_preview

    result = one_line_or_exit(lambda: run_preview(cfg), log)
    print(report(result, cfg.dataset.get("csv")))
    print(f"wrote {result['classes_png']}" + (f" and {len(result['sources'])} file(s) in "
                                              f"{result['sources'][0].parent}" if result["sources"] else ""))


if __name__ == "__main__":
    group_keys.refuse(sys.argv[1:], "preview")  # one line for a key the chosen dataset does not take
    main()
