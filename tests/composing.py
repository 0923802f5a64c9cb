"""Hydra's compose for the tests' fixtures, each set of group choices composed once per process. Composing
configs/train.yaml costs ~90 ms of CPU (the defaults tree, ~20 YAML files, a schema merge for each), and the
quick tier composed ~500 times: ~50 of its ~100 CPU-seconds. Hydra builds a config in two steps: the group
choices (`dataset=cifar10`, `+experiment=fast`) pick the files to merge, then the value overrides
(`trainer.epochs=2`, `dataset.csv=...`) are applied one by one to the merged config
(ConfigLoaderImpl._apply_overrides_to_config). The first step depends only on the group choices, so its result
is kept; each call copies it (~2 ms) and applies its value overrides with Hydra's own function (~5 ms).

Whatever the shortcut does not cover (a hydra.* or sweep override, an override Hydra refuses) is composed by
Hydra itself, so that a test sees Hydra's result and Hydra's error. tests/test_composing.py checks both paths
agree; test_schema.py and test_docs.py, which test composition itself, call Hydra directly."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import hydra
from hydra import initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

# (config_dir, config_name, group overrides) -> the config Hydra composed from them (None: Hydra refused them),
# read only: each call copies it.
_by_groups: dict[tuple[str, str, tuple[str, ...]], DictConfig | None] = {}


def compose(config_dir: str, config_name: str, overrides: Iterable[str] = ()) -> DictConfig:
    """What `hydra.compose(config_name, overrides)` returns under `initialize_config_dir(config_dir)`."""
    overrides = list(overrides)
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = _shortcut(config_dir, config_name, overrides)
        return cfg if cfg is not None else hydra.compose(config_name=config_name, overrides=overrides)


def _shortcut(config_dir: str, config_name: str, overrides: list[str]) -> DictConfig | None:
    """The composed config from the kept composition of its group choices, or None where Hydra should compose
    it whole: any error here is one Hydra raises again, with its own message, from the whole override list."""
    split = _split(overrides)
    if split is None:
        return None
    groups, values = split
    key = (config_dir, config_name, tuple(override.input_line for override in groups))
    if key not in _by_groups:
        try:
            _by_groups[key] = hydra.compose(config_name=config_name, overrides=list(key[2]))
        except Exception:  # a group choice Hydra refuses: it says so below
            _by_groups[key] = None
    if _by_groups[key] is None:
        return None
    cfg = copy.deepcopy(_by_groups[key])
    try:
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    except Exception:  # a value Hydra refuses (wrong type, unknown key): it says so below
        return None
    return cfg


def _split(overrides: list[str]):
    """(group overrides, value overrides), parsed and sorted as Hydra's defaults list sorts them (a key naming a
    config group, with a value that is no dict, picks a file), or None where Hydra alone should compose: a hydra.*
    or sweep override, or one that does not parse."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra's own parse error, from hydra.compose
        return None
    if any(override.is_hydra_override() or override.is_sweep_override() for override in parsed):
        return None
    repository = GlobalHydra.instance().config_loader().repository
    groups, values = [], []
    for override in parsed:
        is_group = repository.group_exists(override.key_or_group) and not isinstance(override.value(), dict)
        (groups if is_group else values).append(override)
    return groups, values
