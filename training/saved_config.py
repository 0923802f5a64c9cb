"""A config read back from a file (an exported ONNX model's metadata) rebuilt from the config groups this
project ships, so nothing in the file can choose what code runs.

Hydra's instantiate imports and calls whatever a node's `_target_` names: a model file is data a user may get
from someone else. So a saved config is never instantiated as stored: each group is composed from
configs/<group>/<choice>.yaml by its recorded choice name ({"dataset": "crops", ...}), and only the stored
values of its plain keys (not starting with `_`) are copied in. An unknown choice name is refused.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# The config groups a training config is built from, in the order train.yaml lists them.
GROUPS = ("dataset", "model", "loader", "optim", "scheduler", "trainer")


@lru_cache(maxsize=None)
def shipped(group: str) -> dict[str, dict]:
    """{choice name: its YAML as plain containers, without `defaults`} for configs/<group>/*.yaml; OmegaConf
    parses YAML and imports nothing."""
    nodes = {}
    for path in sorted((CONFIGS / group).glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        node.pop("defaults", None)
        nodes[path.stem] = node
    return nodes


def _wiring(node: dict) -> dict:
    return {k: v for k, v in node.items() if str(k).startswith("_")}


def choices(cfg: DictConfig) -> dict[str, str | None]:
    """The shipped choice each group of a training config came from, by matching its `_target_` and
    `_partial_` against the shipped YAML files (a lookup, never an import); None for a group left out or
    matched by no shipped file, or by several."""
    found: dict[str, str | None] = {}
    for group in GROUPS:
        node = cfg.get(group)
        wiring = _wiring(OmegaConf.to_container(node, resolve=False)) if isinstance(node, DictConfig) else None
        matches = [name for name, shipped_node in shipped(group).items() if _wiring(shipped_node) == wiring]
        found[group] = matches[0] if len(matches) == 1 else None
    return found


def rebuild(stored: dict, recorded: dict | None, source: str) -> DictConfig:
    """The groups named in `recorded` (None: looked up with `choices`) composed from the shipped files, with
    the stored plain values copied in. `source` names the file for messages ("checkpoint=model.onnx")."""
    if not isinstance(stored, dict):
        raise UserError(f"{source}: its config is not a mapping: this trainer cannot rebuild it")
    recorded = choices(OmegaConf.create(stored)) if recorded is None else recorded
    if not isinstance(recorded, dict):
        raise UserError(f"{source}: its choices are not a mapping: this trainer cannot rebuild its config")
    root = OmegaConf.create({k: v for k, v in stored.items() if k not in GROUPS and not str(k).startswith("_")})
    for group in GROUPS:
        name, values = recorded.get(group), stored.get(group)
        if name is None and values is None:
            continue  # an optional group left out (scheduler: null)
        options = shipped(group)
        if name not in options:
            raise UserError(f"{source} records {group}={name!r}, which this trainer does not ship "
                            f"(choices: {', '.join(options)}): refusing to rebuild its config")
        node = OmegaConf.create(options[name])
        for key, value in (values or {}).items():
            if not str(key).startswith("_"):
                node[key] = value
        root[group] = node
    return root
