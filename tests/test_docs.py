"""The README and docs/ stay true to the code: the configuration reference holds every key and nothing gone, every
link and file path resolves, and every one-line error a user can meet is explained in docs/troubleshooting.md."""

import ast
import functools
import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from docs import config_reference
from tests import helpers

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.glob("*.md"))]
CONFIGS = ROOT / "configs"
ENTRY_CONFIGS = list(config_reference.ENTRY_POINTS)
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir())
# Groups of `# @package _global_` files: they set keys of other groups (experiment recipes, the cluster preset).
GLOBAL_GROUPS = tuple(group for group in GROUPS
                      if any("@package _global_" in p.read_text() for p in (CONFIGS / group).glob("*.yaml")))
# UserErrors whose message is not written at the call: each names where its text comes from instead.
MESSAGES_MADE_ELSEWHERE = {
    ("training/schema.py", "check_ranges"): "one 'KEY must be RANGE, got VALUE' line per key (Range.describe)",
    ("training/loaders.py", "_without_worker_traceback"): "a worker's UserError passed on: its own message is checked",
}


def _keys(node: DictConfig, prefix: str = "") -> set[str]:
    """Dotted keys a user sets, as the reference names them (`_target_` and `_partial_` are wiring, not settings)."""
    keys = set()
    for key, value in node.items_ex(resolve=False):
        if str(key).startswith("_") or key in ("hydra", "defaults"):
            continue
        if isinstance(value, DictConfig):
            keys |= _keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def _documented() -> dict[str, set[str]]:
    """The keys docs/configuration.md lists under each heading: `train.py`, `dataset=crops`, ..."""
    sections: dict[str, set[str]] = {}
    current = None
    for line in config_reference.PAGE.read_text().splitlines():
        heading = re.match(r"^#{2,3} `([^`]+)`", line)
        if heading:
            current = sections.setdefault(heading[1], set())
        cell = re.match(r"^\| `([^`]+)`( \(choice\))?", line)
        if cell and current is not None:
            current.add(cell[1] + (cell[2] or ""))
    return sections


def test_configuration_page_is_current():
    """docs/configuration.md is what the generator writes from today's schemas and YAML files."""
    assert config_reference.PAGE.read_text() == config_reference.render(), \
        "docs/configuration.md is out of date: run python -m docs.config_reference"
    assert config_reference.main(["--check"]) == 0


def test_every_config_key_is_documented_and_no_documented_key_is_gone():
    """Composed with Hydra, as the entry points compose, independently of how the generator reads the files."""
    documented = _documented()
    expected: dict[str, set[str]] = {}
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        for name in ENTRY_CONFIGS:
            cfg = compose(config_name=name)
            expected[f"{name}.py"] = {k for k in _keys(cfg) if k.split(".")[0] not in GROUPS}
        choices = {group: sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")) for group in GROUPS}
        for group in GLOBAL_GROUPS:  # their keys are the settings they override in other groups
            for choice in choices.pop(group, []):
                own = OmegaConf.load(CONFIGS / group / f"{choice}.yaml")
                chosen = {f"{g.removeprefix('override /')} (choice)" for entry in own.get("defaults", [])
                          if not isinstance(entry, str) for g in entry}
                expected[f"{group}={choice}"] = _keys(own) | chosen
        # One composition per round takes the next choice of every group (each compose costs ~0.15 s).
        for round_ in range(max(map(len, choices.values()))):
            picked = {group: names[round_] for group, names in choices.items() if round_ < len(names)}
            cfg = compose(config_name="train", overrides=[f"{group}={name}" for group, name in picked.items()])
            for group, name in picked.items():
                expected[f"{group}={name}"] = _keys(cfg[group], f"{group}.")
    assert set(documented) >= set(expected), f"sections missing from docs/configuration.md: " \
        f"{sorted(set(expected) - set(documented))}; run python -m docs.config_reference"
    for section, keys in expected.items():
        assert documented[section] == keys, (
            f"docs/configuration.md, {section}: missing {sorted(keys - documented[section])}, gone "
            f"{sorted(documented[section] - keys)}; run python -m docs.config_reference")


def test_every_config_key_has_a_comment():
    """The reference's "what" column comes from the YAML comments: a key without one would be documented blank."""
    blank = [f"{path.relative_to(ROOT)}: {key.name}" for path in sorted(CONFIGS.rglob("*.yaml"))
             if path.parent.name not in GLOBAL_GROUPS for key in config_reference.read_yaml(path).keys
             if not key.comment]
    assert not blank, "keys without a comment in their YAML file (add `# what it does, with units`): " \
        + ", ".join(blank)


def _links(page: Path) -> list[tuple[int, str]]:
    found = []
    in_code = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
        if not in_code:
            found += [(number, target) for target in re.findall(r"\]\(([^)\s]+)\)", line)]
    return found


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in page.read_text().splitlines():
        heading = re.match(r"^#+ (.*)$", line)
        if heading:
            anchors.add(re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    """Each link names a file of the repository (and a heading in it, after #); none leaves the repository."""
    broken = []
    for number, target in _links(page):
        if re.match(r"^[a-z]+:", target):
            broken.append(f"line {number}: {target} points outside the repository")
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or ROOT not in [linked, *linked.parents]:
            broken.append(f"line {number}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"line {number}: {target} (no heading #{anchor} in {linked.name})")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_path_named_exists(page):
    """A path such as `training/schema.py` in the text names a file that is still there (modules move)."""
    tops = "|".join(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
                    and p.name not in ("outputs", "data", "multirun"))
    named = set(re.findall(rf"`((?:{tops})/[\w./-]*\.(?:py|yaml|sh|md|png))`", page.read_text()))
    named |= {f"{name}.py" for name in re.findall(r"`(\w+)\.py`", page.read_text())
              if (ROOT / f"{name}.py").exists() or name in ("train", "evaluate", "export", "preview", "predict")}
    gone = sorted(path for path in named if not (ROOT / path).exists())
    assert not gone, f"{page.relative_to(ROOT)} names files that do not exist: {gone}"


def _fragments(node: ast.AST) -> list[str] | None:
    """The fixed text of a message expression (a literal, an f-string, literals joined by +); None when none
    of it is written at the call."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [part.value for part in node.values if isinstance(part, ast.Constant)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _fragments(node.left), _fragments(node.right)
        if left is None and right is None:
            return None
        return (left or []) + (right or [])
    return None


def _sources() -> dict[str, ast.Module]:
    """The application's modules (not tests, docs or data), parsed."""
    trees = {}
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in ("tests", "docs", "outputs", "data") or relative.parts[0].startswith("."):
            continue
        trees[str(relative)] = ast.parse(path.read_text())
    return trees


def _user_error_types(trees: dict[str, ast.Module]) -> set[str]:
    """UserError and the classes derived from it (NonFiniteLoss, ...): raising any of them prints one line."""
    names = {"UserError"}
    classes = [node for tree in trees.values() for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    grown = True
    while grown:
        before = len(names)
        names |= {c.name for c in classes if any(getattr(b, "id", getattr(b, "attr", None)) in names for b in c.bases)}
        grown = len(names) > before
    return names


@functools.cache
def user_errors() -> tuple[tuple[str, int, str, list[str] | None], ...]:
    """(file, line, enclosing function, fixed fragments) of every UserError(...) the application raises; read
    once per process for the two tests that use it (parsing every module: ~0.6 s CPU)."""
    found = []
    trees = _sources()
    types = _user_error_types(trees)
    for relative, tree in trees.items():
        for function in [tree, *[n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]]:
            for node in ast.walk(function):
                called = getattr(node, "func", None)
                name = getattr(called, "id", None) or getattr(called, "attr", None)
                if isinstance(node, ast.Call) and name in types and node.args:
                    found.append((relative, node.lineno, getattr(function, "name", "<module>"),
                                  _fragments(node.args[0])))
    # The walk from the module visits every call once more than the walk from its function: keep the innermost.
    innermost = {}
    for file, line, function, fragments in found:
        if (file, line) not in innermost or innermost[(file, line)][2] == "<module>":
            innermost[(file, line)] = (file, line, function, fragments)
    return tuple(sorted(innermost.values()))


def fixed_parts(fragments: list[str]) -> list[str]:
    """The pieces of a message that are the same every time, without the punctuation at their ends: every one of
    12 characters or more, or the longest where all are shorter (`CIFAR10 at {root}: {e}...`)."""
    pieces = sorted((f.strip(" :;,.=()'\"\n") for f in fragments), key=len, reverse=True)
    return [p for p in pieces if len(p) >= 12] or [p for p in pieces[:1] if p]


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\\|", "|"))


def test_the_error_scan_finds_user_errors():
    """The scan below reads what the code raises: it finds the known messages (so it cannot pass by finding none)."""
    found = {part for _, _, _, f in user_errors() if f for part in fixed_parts(f)}
    assert len(found) > 50
    assert "dataset.root: folder not found" in found


def test_every_user_error_is_explained_in_troubleshooting():
    """Each errors.UserError message's fixed part is quoted in docs/troubleshooting.md, so a user who searches
    for the line they got finds what it means and what to do."""
    page = _plain((DOCS / "troubleshooting.md").read_text())
    missing, unexplained = [], []
    for file, line, function, fragments in user_errors():
        if fragments is None or not fixed_parts(fragments):
            if (file, function) not in MESSAGES_MADE_ELSEWHERE:
                unexplained.append(f"{file}:{line}")
            continue
        missing += [f"{file}:{line} {_plain(part)!r}" for part in fixed_parts(fragments) if _plain(part) not in page]
    assert not unexplained, ("UserError messages not written at the call; write the text there, or name where it "
                             f"comes from in MESSAGES_MADE_ELSEWHERE: {unexplained}")
    assert not missing, "add a row to docs/troubleshooting.md quoting each of these (its fixed part): " \
        + "; ".join(missing)


def test_every_measured_table_is_stamped():
    """Each table in docs/performance.md has a stamp just above it: the hardware, the versions and the date."""
    lines = (DOCS / "performance.md").read_text().splitlines()
    tables = [i for i, line in enumerate(lines) if line.startswith("| ---")]
    assert tables
    unstamped = []
    for i in tables:
        above = [line for line in lines[max(0, i - 4):i] if line.startswith("> Stamp:")]
        if not above or not re.search(r"torch \d", above[-1]) or not re.search(r"\d{4}-\d{2}-\d{2}", above[-1]):
            unstamped.append(f"line {i}: {lines[i - 1]}")
    assert not unstamped, "tables without a '> Stamp: hardware · torch X · YYYY-MM-DD' line above: " \
        + "; ".join(unstamped)


def _as_documented(tag: str, classes: list[str]) -> str:
    """A tag as monitoring.md names it: a class name as <class>, TEXT's /text_summary suffix dropped."""
    tag = tag.removesuffix("/text_summary")
    for name in classes:
        for prefix in ("val/acc_class/", "val/pr/"):
            if tag == prefix + name:
                return prefix + "<class>"
    return tag


def test_monitoring_page_names_every_tag_and_metric_a_run_writes(shared_run):
    """What a real run wrote (read back with TensorBoard's own reader) and what docs/monitoring.md lists agree,
    both ways: every tag and metrics.json key is described, and every tag described is written."""
    run = shared_run()
    classes = json.loads((run.dir / "classes.json").read_text())
    logged = helpers.events(run.dir).Tags()
    written = {_as_documented(tag, classes) for kind in ("scalars", "images", "tensors") for tag in logged[kind]
               if not tag.startswith("_hparams_") and tag != "custom_scalars__config__"}
    page = (DOCS / "monitoring.md").read_text()
    table = page[page.index("## Every tag"):page.index("## HPARAMS")]
    described = set(re.findall(r"^\| `([a-z_]+/[^`]+)` \|", table, flags=re.M))
    assert written == described, f"docs/monitoring.md's tag table: missing {sorted(written - described)}, " \
        f"no longer written {sorted(described - written)}"
    metrics = {_as_documented(key, classes) for key in json.loads((run.dir / "metrics.json").read_text())}
    section = page[page.index("## metrics.json"):]
    listed = set(re.findall(r"`([a-z_]+(?:/[^`]+)?)`", section.split("\n| key |", 1)[1].split("\n\n", 1)[0]))
    assert metrics == listed, f"docs/monitoring.md's metrics.json table: missing {sorted(metrics - listed)}, " \
        f"not written {sorted(listed - metrics)}"


def _code_lines(text: str) -> list[str]:
    """Each line's code without its comment or indentation; blank, comment-only and elided (`...`) lines left
    out. A `#` inside a string would be cut too: the example and datasets/listed.py hold none."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line and line != "..."]


def test_contributings_source_example_is_the_real_listed_source():
    """CONTRIBUTING.md's "Adding a source" shows datasets/listed.py, which test_sources.py runs through every
    cache mode: each code line of the example must be a line of that module, so the example cannot drift
    into code that was never run."""
    section = (ROOT / "CONTRIBUTING.md").read_text().split("## Adding a source", 1)[1]
    example = _code_lines(section.split("```python", 1)[1].split("```", 1)[0])
    source = set(_code_lines((ROOT / "datasets" / "listed.py").read_text()))
    assert len(example) >= 15
    assert [line for line in example if line not in source] == []
