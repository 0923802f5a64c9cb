"""A key given on the command line for a group choice that does not take it, though another choice does
(`dataset=cifar10 dataset.fold=1`): one line naming the key, the choices that take it and what to do, before Hydra
composes. Hydra's own report, `Key 'fold' not in 'Cifar10Schema'` over several lines, names a schema class and
not the way out. Keys no choice of the group has (misspellings) are left to Hydra, whose report names them.

Which choice a group gets is read as Hydra does, from the command line: the last `group=choice` (every choice of
a sweep), else an experiment's `override /group:` (configs/experiment/), else the primary config's default.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from errors import UserError
from training import schema

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Why a choice lacks keys its siblings take, where a reason helps more than the list of choices.
SPLIT_KEYS = ("val_fraction", "split_by", "group_pattern", "folds", "fold")
REASONS = {("dataset", "cifar10", key): "CIFAR10's validation set is its test split, so there is nothing to split "
           "or fold" for key in SPLIT_KEYS}


def check(argv: Sequence[str], config_name: str = "train") -> None:
    """A UserError for the first `group.key=value` in `argv` whose group's choice lacks `key` while another
    choice of the group has it; nothing when the arguments do not parse (Hydra reports those)."""
    overrides = _parse(argv)
    for override in overrides:
        group, _, key = override.key_or_group.partition(".")
        if not key or "." in key or override.is_delete() or not (CONFIGS / group).is_dir():
            continue
        for choice in _choices(group, overrides, config_name):
            if key in keys(group, choice):
                continue
            others = [other for other in _options(group) if other != choice and key in keys(group, other)]
            if others:
                reason = REASONS.get((group, choice, key))
                raise UserError(f"{group}.{key} is not a key of {group}={choice}"
                                + (f": {reason}" if reason else "")
                                + f"; remove {group}.{key}, or use it with {group}={_either(others)}")


def refuse(argv: Sequence[str], config_name: str = "train") -> None:
    """check() as an entry point's first step: its line on stderr (`Error: ...`) and exit code 1."""
    try:
        check(argv, config_name)
    except UserError as e:
        sys.exit(f"Error: {e}")


def keys(group: str, choice: str) -> set[str]:
    """The keys choice `choice` of `group` takes: its YAML file's, and its schema's (training/schema.py)."""
    path = CONFIGS / group / f"{choice}.yaml"
    if not path.is_file():
        return set()
    node = OmegaConf.load(path)
    defaults = [str(entry) for entry in node.get("defaults", [])]
    found = {str(key) for key in node if key != "defaults"}
    for name, schema_type in schema.GROUPS.get(group, {}).items():
        if any(f"/{schema.stored_name(group, name)}@" in entry for entry in defaults):
            found |= {field.name for field in dataclasses.fields(schema_type)}
    return found


def _either(choices: list[str]) -> str:
    return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIGS / group).glob("*.yaml"))


def _parse(argv: Sequence[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides([arg for arg in argv if not arg.startswith("-")])
    except HydraException:
        return []


def _values(override) -> list[str]:
    return list(override.sweep_string_iterator()) if override.is_sweep_override() else [str(override.value())]


def _choices(group: str, overrides: list, config_name: str) -> list[str]:
    """The choices `group` gets: given on the command line, else set by the experiment(s), else the default."""
    given = [override for override in overrides if override.key_or_group == group and not override.is_delete()]
    if given:
        return _values(given[-1])
    experiments = [override for override in overrides if override.key_or_group == "experiment"]
    chosen = [_default(CONFIGS / "experiment" / f"{name}.yaml", f"override /{group}")
              for name in (_values(experiments[-1]) if experiments else [])]
    if chosen and all(choice is not None for choice in chosen):
        return chosen
    default = _default(CONFIGS / f"{config_name}.yaml", group)
    return [choice for choice in chosen if choice is not None] + ([default] if default is not None else [])


def _default(path: Path, entry: str) -> str | None:
    """The choice a config file's defaults list gives `entry` (`dataset` or `override /dataset`), if any."""
    if not path.is_file():
        return None
    for item in OmegaConf.load(path).get("defaults", []):
        if OmegaConf.is_dict(item) and entry in item and item[entry] is not None:
            return str(item[entry])
    return None
