"""Writes docs/configuration.md from the two places a config key is defined: its type and accepted range in
training/schema.py and its default and comment in configs/. Generated, so the reference cannot drift from
the code: tests/test_docs.py fails when the page differs from what this writes.

    python -m docs.config_reference           # rewrite docs/configuration.md
    python -m docs.config_reference --check   # exit 1 when it is out of date (what the test runs)
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from training import schema

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
PAGE = ROOT / "docs" / "configuration.md"
ENTRY_POINTS = {"train": "train.py", "evaluate": "evaluate.py", "predict": "predict.py", "export": "export.py",
                "preview": "preview.py"}
# Groups in the order a newcomer meets them; a group directory not listed here still gets a section, after these.
GROUP_ORDER = ["dataset", "model", "augment", "loader", "optim", "scheduler", "trainer", "experiment"]
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?P<rest>.*)$")

INTRO = """\
# Configuration reference

Every key `train.py`, `evaluate.py`, `predict.py`, `export.py` and `preview.py` take, with its default, its type and
accepted range, and what it does. Generated from `training/schema.py` (types, ranges) and the YAML files
under `configs/` (defaults, comments) by `python -m docs.config_reference`; do not edit it by hand
(`python -m docs.config_reference --check` tells whether it is current, and the tests run that check).

Set a key on the command line as `key=value` (`trainer.epochs=20`, `dataset.mean=[0.4,0.5,0.6]`), pick a
group's choice as `group=choice` (`model=fastnet`), and add a key a config does not list with a leading `+`
(`+optim.dampening=0.1`). `python train.py --help` lists the groups and their choices; `python train.py
--cfg job` prints the composed config with your overrides.

A misspelt key, an unknown choice or a value of the wrong type (`dataset.width=abc`, `trainer.epochs=1.5`)
fails before anything runs, naming the key and the type it takes (types: `training/schema.py`). Values whose
validity does not depend on the data are checked next, in `train.py` and `evaluate.py` alike, before any file is read: each bad one is a
line naming the key, its accepted range and the value (`optim.lr must be greater than 0 and at most 1e+30, got -1.0`,
`loader.batch_size must be at least 1, got 0`); the "range" column below is that check, declared beside the
types in `training/schema.py` (`lr: float = ranged(above=0)`). Keys typed "any" take words as well as numbers
(`auto`, a list); the code that uses them checks them, in one line too. What each error means:
[troubleshooting.md](troubleshooting.md#config-keys-and-values).
"""


@dataclasses.dataclass
class Key:
    """One key as a YAML file writes it: the literal default and the comment that explains it."""

    name: str
    default: str
    comment: str


@dataclasses.dataclass
class YamlFile:
    header: str  # the comment lines that open the file: what the choice is
    keys: list[Key]  # top-level keys, in file order; nested ones (an experiment's loader.batch_size) dotted
    schema: type | None  # the dataclass the file extends, None for an experiment
    target: str | None
    chosen: frozenset[str] = frozenset()  # the groups among `keys` whose choice it overrides (`override /g: c`)


def _comment(text: str) -> tuple[str, str]:
    """A YAML line's value and its trailing comment (a `#` after whitespace; `${...}` holds no `#`)."""
    match = re.search(r"\s#", text)
    if match is None:
        return text.strip(), ""
    return text[:match.start()].strip(), text[match.end():].strip()


def read_yaml(path: Path) -> YamlFile:
    header: list[str] = []
    keys: list[Key] = []
    above: list[str] = []  # comment lines directly above a key belong to it
    parents: list[tuple[int, str]] = []  # (indent, key) of the mappings the current line is inside
    in_header = True
    continues = False  # the last line was a key with a comment that an indented comment line may continue
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if text.startswith("@package"):
                continue
            if line[0].isspace() and keys and continues:  # an indented comment goes on with the key's above it
                keys[-1].comment = f"{keys[-1].comment} {_prose(text)}".strip()
                continue
            (header if in_header else above).append(_prose(text))
            continue
        continues = False
        in_header = False
        match = KEY_LINE.match(line)
        if not match:
            above = []
            continue
        indent, name = len(match["indent"]), match["key"]
        parents = [(i, k) for i, k in parents if i < indent]
        value, comment = _comment(match["rest"])
        dotted = ".".join([k for _, k in parents] + [name])
        parents.append((indent, name))
        if dotted.split(".")[0] in ("defaults", "hydra") or name.startswith("_"):
            above = []
            continue
        if value:  # a mapping's own line (loader:) is no key; its children are
            keys.append(Key(dotted, value, " ".join([*above, _prose(comment)]).strip()))
            continues = bool(comment)
        above = []
    loaded = OmegaConf.load(path)
    # An experiment's `override /scheduler: warmup_cosine` is a setting too: scheduler=warmup_cosine.
    chosen = [Key(group.removeprefix("override /"), str(choice), "")
              for entry in loaded.get("defaults") or [] if not isinstance(entry, str)
              for group, choice in entry.items() if group.startswith("override /")]
    return YamlFile(" ".join(header), chosen + keys, _schema_of(loaded), loaded.get("_target_"),
                    frozenset(key.name for key in chosen))


def _prose(text: str) -> str:
    """A comment as Markdown: a command line as code, and `<class>` kept visible (not read as an HTML tag)."""
    if text.startswith("python "):
        return f"`{text}`"
    command = text.find("python ")
    if command > 0 and text[command - 1] == " " and text[:command].rstrip().endswith(("e.g.", ":")):
        return f"{text[:command]}`{text[command:]}`"
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _schema_of(loaded: Any) -> type | None:
    """The dataclass a YAML file names in its defaults: `/dataset_crops_schema@_here_` or `train_schema`."""
    for entry in loaded.get("defaults") or []:
        if not isinstance(entry, str):
            continue
        stored = entry.lstrip("/").split("@")[0]
        if stored in schema.PRIMARY:
            return schema.PRIMARY[stored]
        for group, schemas in schema.GROUPS.items():
            for name, cls in schemas.items():
                if schema.stored_name(group, name) == stored:
                    return cls
    return None


def _type_name(annotation: Any) -> str:
    if annotation is Any:
        return "any"
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Union:
        return f"{_type_name(args[0])} or null"
    if origin in (list, typing.List):
        return f"list of {_type_name(args[0])}"
    return getattr(annotation, "__name__", str(annotation))


def type_and_range(cls: type | None, name: str) -> str:
    """What the schema says of a key: `int, at least 1`; keys the schema does not declare take anything."""
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else {}
    if name not in fields:
        return "any"
    field = fields[name]
    limits = field.metadata.get("range")
    hints = typing.get_type_hints(cls)
    text = _type_name(hints[name])
    return f"{text}, {limits.describe()}" if limits is not None else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def key_table(prefix: str, yaml: YamlFile) -> list[str]:
    rows = ["| key | default | type, range | what |", "| --- | --- | --- | --- |"]
    for key in yaml.keys:
        rows.append(f"| `{prefix}{key.name}` | `{_cell(key.default)}` | {_cell(type_and_range(yaml.schema, key.name))} "
                    f"| {_cell(key.comment)} |")
    return rows


def group_defaults() -> dict[str, str | None]:
    """Each group's choice in train.yaml when the command names none."""
    chosen: dict[str, str | None] = {}
    for entry in OmegaConf.load(CONFIGS / "train.yaml").defaults:
        if not isinstance(entry, str):
            for group, choice in entry.items():
                chosen[group] = choice
    return chosen


def groups() -> list[str]:
    found = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())
    return [g for g in GROUP_ORDER if g in found] + [g for g in found if g not in GROUP_ORDER]


def render() -> str:
    lines = [INTRO]
    for name, script in ENTRY_POINTS.items():
        yaml = read_yaml(CONFIGS / f"{name}.yaml")
        lines += [f"## `{script}`", "", f"`configs/{name}.yaml`. {yaml.header}", "", *key_table("", yaml), ""]
    defaults = group_defaults()
    for group in groups():
        default = defaults.get(group)
        none_chosen = f" Without a choice: `{group}` is not used (`{group}: null` in `configs/train.yaml`)." \
            if group in defaults and default is None else ""
        lines += [f"## `{group}`", "", f"`{group}=CHOICE`, from `configs/{group}/`.{none_chosen}", ""]
        for path in sorted((CONFIGS / group).glob("*.yaml")):
            yaml = read_yaml(path)
            mark = " (default)" if path.stem == default else ""
            builds = f" Builds `{yaml.target}`." if yaml.target else ""
            lines += [f"### `{group}={path.stem}`{mark}", "", f"{yaml.header}{builds}".strip(), ""]
            if not yaml.keys:
                lines += ["No keys of its own.", ""]
            elif yaml.schema is None:  # an experiment or a preset: overrides of other groups' keys and choices
                lines += ["| sets | to |", "| --- | --- |"]
                lines += [f"| `{key.name}` (choice) | `{key.default}` |" if key.name in yaml.chosen
                          else f"| `{key.name}` | `{_cell(key.default)}` |" for key in yaml.keys] + [""]
            else:
                lines += [*key_table(f"{group}.", yaml), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if PAGE.exists() and PAGE.read_text() == text:
            return 0
        print(f"{PAGE.relative_to(ROOT)} is out of date: run python -m docs.config_reference", file=sys.stderr)
        return 1
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
