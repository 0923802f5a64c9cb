"""A config read back from a file (a checkpoint, later an ONNX model's metadata) rebuilt from the config groups
this project ships, so nothing in the file can choose what code runs.

Hydra's instantiate imports and calls whatever a node's `_target_` names, with `_args_` as arguments: a
checkpoint is data a user downloads from someone else, and its config could name `shutil.copy` or
`os.system`. So a saved config is never instantiated as stored. Each group node is rebuilt from
configs/<group>/<choice>.yaml by its recorded choice name (`choices`: {"dataset": "crops", ...}), found by
listing those files (never by importing anything), and only the stored values of its plain keys are copied
in, through the group's typed schema. The wiring keys (`_target_`, `_partial_`, `_args_`, `_convert_`,
`_recursive_`, anything starting with `_`) always come from the shipped YAML; a stored one that differs
from it is refused, as is an unknown choice name, a nested mapping or a value of the wrong type.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from errors import UserError
from training import schema

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# The config groups a training config is built from, in the order train.yaml lists them.
GROUPS = ("dataset", "augment", "model", "loader", "optim", "scheduler", "trainer")
OPTIONAL = {"scheduler"}  # `scheduler: null` in train.yaml: a constant learning rate, no node at all
# Groups added after checkpoints were first written: a config saved before a group existed trained as its
# default choice did.
ADDED_LATER = {"augment": "none"}
# Keys added to a group after checkpoints were first written, with the value every earlier run trained with
# (not today's default): a run saved before dataset.split_by drew its validation rows at random.
KEYS_ADDED_LATER = {"dataset": {"split_by": "row"}}
# Top-level keys of a training config that are not groups; typed by schema.TrainSchema.
TOP_LEVEL = schema.TrainSchema


@lru_cache(maxsize=None)
def shipped(group: str) -> dict[str, dict]:
    """{choice name: its YAML as plain containers, without the `defaults` list} for configs/<group>/*.yaml.
    Read with OmegaConf.load, which parses YAML and imports nothing."""
    nodes = {}
    for path in sorted((CONFIGS / group).glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        node.pop("defaults", None)
        nodes[path.stem] = node
    return nodes


def _wiring(node: dict) -> dict:
    return {k: v for k, v in node.items() if str(k).startswith("_")}


def choices(cfg: DictConfig) -> dict[str, str | None]:
    """The shipped choice each group of `cfg` came from, by matching its wiring (`_target_`, `_partial_`)
    against the shipped YAML files: a lookup, never an import. None for a group `cfg` leaves out (no
    scheduler) or one no shipped file matches (a `dataset._target_=...` override: such a run trains, but its
    checkpoints cannot be resumed or evaluated). Where several choices share a wiring, Hydra's own record of
    the choice (under train.py) decides."""
    hydra_choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    found: dict[str, str | None] = {}
    for group in GROUPS:
        node = cfg.get(group)
        if node is None:
            found[group] = None
            continue
        stored = OmegaConf.to_container(node, resolve=True)
        matches = [name for name, shipped_node in shipped(group).items() if _wiring(shipped_node) == _wiring(stored)]
        if len(matches) > 1 and hydra_choices.get(group) in matches:
            matches = [hydra_choices[group]]
        # Choices sharing a wiring differ only in plain values (augment=none/standard/...): the one whose
        # values the config has, else any of them, since `rebuild` copies the stored values in anyway.
        exact = [name for name in matches if shipped(group)[name] == stored]
        found[group] = (exact or matches or [None])[0]
    return found


def rebuild(stored: dict, recorded: dict | None, source: str) -> DictConfig:
    """A training config composed from the shipped groups named in `recorded` (a checkpoint's `choices`;
    None for an older checkpoint, whose choices are looked up from its targets as `choices` does), with the
    stored plain values copied in through the typed schemas. `source` names the file for messages
    ("resume: outputs/.../last.pt"). Raises UserError, in one line naming the key, for anything else."""
    if not isinstance(stored, dict):
        raise UserError(f"{source}: its config is not a mapping: this trainer cannot rebuild it")
    stored, recorded = _before_augment(stored, recorded)
    if recorded is None:
        recorded = choices(OmegaConf.create({k: v for k, v in stored.items() if k in GROUPS and isinstance(v, dict)}))
    elif not isinstance(recorded, dict):
        raise UserError(f"{source}: its choices are not a mapping: this trainer cannot rebuild its config")
    root = OmegaConf.structured(TOP_LEVEL)
    for key, value in stored.items():
        if key in GROUPS:
            continue
        _copy_value(root, str(key), value, source, str(key))
    OmegaConf.set_struct(root, False)
    for group in GROUPS:
        node = _rebuild_group(group, stored.get(group), recorded.get(group), source)
        if node is not None:
            root[group] = node
    OmegaConf.set_struct(root, True)  # as Hydra leaves a composed config: a misspelt key fails when read
    return root


def _before_augment(stored: dict, recorded: dict | None) -> tuple[dict, dict | None]:
    """A config saved before the augment group existed flipped through dataset.hflip, which the datasets no
    longer take: it trained as augment=hflip (true) or augment=none (false)."""
    dataset = stored.get("dataset")
    if "augment" in stored or not isinstance(dataset, dict) or "hflip" not in dataset:
        return stored, recorded
    choice = "hflip" if dataset["hflip"] is True else "none"
    stored = {**stored, "dataset": {k: v for k, v in dataset.items() if k != "hflip"},
              "augment": dict(shipped("augment")[choice])}
    return stored, ({**recorded, "augment": choice} if isinstance(recorded, dict) else recorded)


def _rebuild_group(group: str, stored, name, source: str) -> DictConfig | None:
    options = shipped(group)
    if stored is None and name is None and group in ADDED_LATER:
        name, stored = ADDED_LATER[group], dict(options[ADDED_LATER[group]])
    if name is None:
        if stored is None and group in OPTIONAL:
            return None
        raise UserError(f"{source}: its config's {group} is none of the shipped choices "
                        f"({', '.join(options)}): this trainer cannot rebuild it")
    if not isinstance(name, str) or name not in options:
        raise UserError(f"{source} records {group}={name!r}, which this trainer does not ship "
                        f"(choices: {', '.join(options)}): refusing to rebuild its config")
    if not isinstance(stored, dict):
        raise UserError(f"{source}: its config has no {group} mapping for {group}={name}")
    shipped_node = options[name]
    for key, value in _wiring(stored).items():  # never copied; anything but the shipped wiring is refused
        if shipped_node.get(key) != value:
            raise UserError(f"{source}: its config sets {group}.{key}={value!r} but {group}={name} ships "
                            f"{shipped_node.get(key)!r}: a checkpoint may not choose what code runs; refusing it")
    for key, value in KEYS_ADDED_LATER.get(group, {}).items():
        if key in shipped_node and key not in stored:
            stored = {**stored, key: value}
    schemas = schema.GROUPS[group]
    schema_type = schemas.get(f"{name}_schema") or schemas["default_schema"]  # augment: one schema for all
    node = OmegaConf.merge(OmegaConf.structured(schema_type), shipped_node)
    for key, value in stored.items():
        if not str(key).startswith("_"):
            _copy_value(node, str(key), value, source, f"{group}.{key}")
    return node


def _plain(value) -> bool:
    """A value a command-line override could give: a scalar or a (nested) list of scalars."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _interpolates(value) -> bool:
    """Whether a string (or one in a list) holds `${`: OmegaConf would resolve it when the node is read, and a
    resolver such as oc.create can build a node with its own `_target_`. A saved config was stored resolved,
    so no value of ours holds one."""
    if isinstance(value, (list, tuple)):
        return any(_interpolates(v) for v in value)
    return isinstance(value, str) and "${" in value


def _copy_value(node: DictConfig, key: str, value, source: str, full_key: str) -> None:
    """Set node[key] = value through the node's schema: a declared key must take the value's type; a key the
    schema does not declare (what `+optim.dampening=0.1` adds) is kept when its value is plain. A mapping is
    copied key by key only where the schema declares a typed mapping there (trainer.early_stop); its wiring-like
    keys (`_target_`, ...) are refused."""
    if isinstance(value, dict) and key in node and OmegaConf.get_type(node, key) not in (dict, None) \
            and isinstance(node.get(key), DictConfig):
        for inner, inner_value in value.items():
            if str(inner).startswith("_"):
                raise UserError(f"{source}: its config sets {full_key}.{inner}, which this trainer never writes: "
                                "refusing to rebuild its config")
            _copy_value(node[key], str(inner), inner_value, source, f"{full_key}.{inner}")
        return
    if not _plain(value):
        raise UserError(f"{source}: its config's {full_key} holds a {type(value).__name__}, not a plain value: "
                        "refusing to rebuild its config")
    if _interpolates(value):
        raise UserError(f"{source}: its config's {full_key} holds an interpolation (${{...}}), which could choose what "
                        "code runs: refusing to rebuild its config")
    try:
        if key in node:
            node[key] = value
        else:
            with_extra = OmegaConf.is_struct(node)
            OmegaConf.set_struct(node, False)
            node[key] = value
            OmegaConf.set_struct(node, with_extra)
    except OmegaConfBaseException as e:
        reason = str(e).splitlines()[0]
        raise UserError(f"{source}: its config's {full_key}={value!r} does not fit the schema ({reason}): "
                        "refusing to rebuild its config") from None
