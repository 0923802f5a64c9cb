"""Fixtures every test file shares: configs composed like the scripts compose them, small real data sets,
training runs shared across a session, and the rules of the suite (one torch thread, programs only in `slow`
tests, xdist on every core by default).

torch, torchvision and the trainer are imported inside the functions that use them, not here: under xdist the
controlling pytest process loads this file too, but runs no test, and importing them there cost ~3.4 s of CPU
before any worker started (in series: the quick tier's wall time grew by as much)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import composing, files, shared_runs
from training import schema

CONFIGS = str(Path(__file__).resolve().parent.parent / "configs")
schema.register()  # before any test composes, as train.py and evaluate.py do


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """`-n auto` (one xdist worker per core) unless the command says otherwise: set here, not in pyproject's
    addopts, so that `-p no:xdist` (a serial run, e.g. under a debugger) is accepted instead of failing on an
    unknown `-n`. xdist's workers run this hook too, and must not start workers of their own."""
    if config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput") \
            and config.option.numprocesses is None:
        config.option.numprocesses = "auto"
        # worksteal, not xdist's default `load`: an idle worker takes half of the other's queue, so the suite
        # does not end with one worker running the last slow tests it was dealt while the other waits; and
        # each worker keeps whole runs of a file's tests, whose session-scoped shared runs it then trains once.
        if config.option.dist == "no":
            config.option.dist = "worksteal"


def pytest_collection_modifyitems(config, items):
    """Slow tests first (their order kept), so that the last tests to run are short ones whichever worker
    takes them, and under xdist dealt in turn to each worker's share; tests marked `cuda` skip, saying why, where
    torch sees no GPU."""
    import torch

    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # a stable sort: files stay together
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    if workers > 1:
        items[:] = deal_slow_tests(items, workers)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def deal_slow_tests(items: list, workers: int) -> list:
    """`items` (slow tests first) reordered so that each of `workers` xdist workers starts on its turn of the
    slow tests, then quick ones. Worksteal first hands each worker one contiguous share of the list (the first
    len // workers tests to the first); with every slow test at the front, one worker was dealt them all and
    the others ran quick tests until they could steal, ending with one worker's last slow tests running alone.
    Every worker collects and orders the same way, as xdist requires."""
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    quick = iter(item for item in items if item.get_closest_marker("slow") is None)
    dealt, left = [], len(items)
    for worker in range(workers):
        share = left // (workers - worker)  # what worksteal sends this worker first
        left -= share
        turn = slow[worker::workers]
        dealt += turn + [item for _, item in zip(range(share - len(turn)), quick)]
    return dealt + list(quick)


@contextmanager
def torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_in_shared_fixtures():
    """The same for session- and module-scoped fixtures (shared runs), which pytest sets up before any per-test
    fixture: a strip-form run trained in one took 8 s of CPU on two threads under load, 0.6 s on one."""
    with torch_threads(1):
        yield


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests train tiny batches, where one thread beats two, and two threads on a busy 2-core machine stall
    on each other: two epochs of the crop fixture took 0.05 s on one thread, 1 to 5 s on two under load."""
    with torch_threads(1):
        yield


@pytest.fixture(autouse=True)
def programs_only_in_slow_tests(request, monkeypatch):
    """A test that starts a program (python train.py, torchrun, bash) pays its imports, seconds each: it must
    be marked `slow`, so that `-m "not slow"` stays the quick loop. Every subprocess call ends in
    Popen._execute_child, or in a program forked by tests/zygote.py's server; outside slow tests either fails
    the test, naming the program. (Forked children that run a function, as DataLoader workers and
    helpers.in_child do, start no program and are allowed.)"""
    if request.node.get_closest_marker("slow") is not None:
        return
    from tests import zygote

    def refuse(self, args, *rest, **kwargs):
        pytest.fail(f"this test starts a program ({args!r}): mark it @pytest.mark.slow", pytrace=False)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(zygote.ForkedProgram, "__init__",
                        lambda self, server, argv, *rest, **kwargs: refuse(self, argv))


def compose_train(run_dir: Path, *overrides: str):
    """configs/train.yaml composed like train.py does, with tiny CPU settings; `overrides` win."""
    base = [
        f"run_dir={run_dir}",
        "trainer.device=cpu",
        "trainer.progress=false",
        "trainer.epochs=1",
        "trainer.log_every=2",
        "trainer.warmup_steps=1",
    ]
    # The tiny runs' step counts and scores were written for a row split of the crop scenes (split_by=auto
    # holds out one of their four scenes); tests of the split rules set dataset.split_by themselves.
    if "dataset=cifar10" not in overrides and not any(o.startswith("dataset.split_by=") for o in overrides):
        base.append("dataset.split_by=row")
    return composing.compose(CONFIGS, "train", [*base, *overrides])


@pytest.fixture
def make_cfg(tmp_path):
    """Compose configs/train.yaml like train.py does, with tiny CPU settings and the run dir in tmp_path."""

    def make(*overrides: str, run_dir: Path | None = None):
        return compose_train(run_dir or tmp_path / "run", *overrides)

    return make


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path, with its content's SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class SharedRun:
    """A finished training run that tests read and never change; `copy` gives a test its own to change."""

    dir: Path
    metrics: dict
    digest: dict = field(repr=False)

    def checkpoint(self, name: str = "last") -> dict:
        import torch

        return torch.load(self.dir / "checkpoints" / f"{name}.pt", weights_only=True)

    def copy(self, to: Path) -> Path:
        """The run folder copied to `to` (a resume from its checkpoints/ continues the copy, not the original)."""
        shutil.copytree(self.dir, to)
        return to


@pytest.fixture(scope="session")
def shared_crop_csv(tmp_path_factory) -> Path:
    """The crop scenes of `crop_csv`, written once per session (per xdist worker) for shared runs: read only."""
    return files.write_crop_scenes(tmp_path_factory.mktemp("shared-crops"))


@pytest.fixture(scope="session")
def _shared_runs(tmp_path_factory, shared_crop_csv):
    runs: dict[tuple[str, ...], SharedRun] = {}

    import training

    def get(overrides: tuple[str, ...]) -> SharedRun:
        if overrides not in runs:
            run_dir = tmp_path_factory.mktemp("shared-run") / "run"
            with torch_threads(1):  # as every test trains (one_torch_thread), so bitwise comparisons hold
                metrics = training.run(compose_train(run_dir, f"dataset.csv={shared_crop_csv}", *overrides))
            runs[overrides] = SharedRun(run_dir, metrics, folder_digest(run_dir))
        return runs[overrides]

    return get, runs


@pytest.fixture
def shared_run(_shared_runs, shared_crop_csv):
    """shared_run(*overrides): the run `make_cfg` would compose with these overrides on the crop scenes of
    `shared_crop_csv`, trained once per session (per xdist worker) and shared by every test that asks for the
    same overrides. Tests only read it (or `copy` it into tmp_path); after each test its files, and the crop
    scenes', are checked unchanged, and a changed run is dropped so that later tests train a fresh one."""
    get, runs = _shared_runs
    scenes = folder_digest(shared_crop_csv.parent)
    used: list[tuple[str, ...]] = []

    def run(*overrides: str) -> SharedRun:
        used.append(overrides)
        return get(overrides)

    yield run
    changed = [overrides for overrides in dict.fromkeys(used) if folder_digest(runs[overrides].dir) != runs[overrides].digest]
    for overrides in changed:
        del runs[overrides]
    assert not changed, f"this test changed shared runs {changed}: copy one into tmp_path to change it"
    assert folder_digest(shared_crop_csv.parent) == scenes, "this test changed the shared crop scenes"


@dataclass
class ProgramRun:
    """A finished program that several tests read (never change): its working folder, the one folder it wrote
    its results to (None unless exactly one), its output and its exit code."""

    cwd: Path
    run_dir: Path | None
    stdout: str
    stderr: str
    returncode: int


def program_run(tmp_path_factory, name: str, start, results: str) -> ProgramRun:
    """start(folder) -> subprocess.CompletedProcess, run once per session (all xdist workers: each program costs
    ~4 s of CPU importing torch) in a folder of its own; `results` globs the folder it writes under that one."""

    def make(folder: Path) -> None:
        done = start(folder)
        (folder / ".stdout").write_text(done.stdout or "")
        (folder / ".stderr").write_text(done.stderr or "")
        (folder / ".returncode").write_text(str(done.returncode))

    folder = shared_runs.once(tmp_path_factory, name, make)
    found = list(folder.glob(results))
    return ProgramRun(folder, found[0] if len(found) == 1 else None, (folder / ".stdout").read_text(),
                      (folder / ".stderr").read_text(), int((folder / ".returncode").read_text()))


@pytest.fixture(scope="session")
def train_py_run(tmp_path_factory) -> ProgramRun:
    """`python train.py` on the crop scenes as a user types it (the bar left at its default, stdout and stderr
    redirected to one file as under nohup or SLURM: all of it in `stdout`), with a crop size and batch
    overridden and 2 epochs; its run folder is Hydra's default under outputs/."""
    from tests.helpers import TRAIN_PY, run_python  # here: helpers imports TensorBoard's reader

    def start(folder: Path):
        csv_path = files.write_crop_scenes(folder / "crops")
        with open(folder / "console.log", "w") as out:
            done = run_python(TRAIN_PY, f"dataset.csv={csv_path}", "dataset.width=48", "dataset.height=24",
                              "loader.batch_size=8", "trainer.epochs=2", "trainer.device=cpu", cwd=folder,
                              capture_output=False, stdout=out, stderr=subprocess.STDOUT)
        done.stdout = (folder / "console.log").read_text()
        return done

    return program_run(tmp_path_factory, "train-py", start, "outputs/*/*")


@pytest.fixture(scope="session")
def evaluate_py_run(tmp_path_factory, _shared_runs) -> ProgramRun:
    """`python evaluate.py` on best.pt of a two-epoch crop run (batch 8; `shared_run`'s, copied to run/ beside
    it), its folder left to Hydra's default under outputs/eval/."""
    from tests.helpers import ROOT, run_python

    get, _ = _shared_runs

    def start(folder: Path):
        run = get(("loader.batch_size=8", "trainer.epochs=2")).copy(folder / "run")
        return run_python(ROOT / "evaluate.py", f"checkpoint={run / 'checkpoints' / 'best.pt'}", "device=cpu",
                          cwd=folder)

    return program_run(tmp_path_factory, "evaluate-py", start, "outputs/eval/*/*")


@pytest.fixture
def make_eval_cfg(tmp_path):
    """Compose configs/evaluate.yaml like evaluate.py does, on the CPU, with the run dir in tmp_path."""

    def make(*overrides: str, run_dir: Path | None = None):
        return composing.compose(CONFIGS, "evaluate", [f"run_dir={run_dir or tmp_path / 'eval'}", "device=cpu",
                                                       *overrides])

    return make


@pytest.fixture
def make_preview_cfg(tmp_path):
    """Compose configs/preview.yaml like preview.py does, with the run dir in tmp_path."""

    def make(*overrides: str, run_dir: Path | None = None):
        return composing.compose(CONFIGS, "preview", [f"run_dir={run_dir or tmp_path / 'preview'}", *overrides])

    return make


@pytest.fixture
def build_crops(make_cfg, tmp_path):
    """The crop dataset as the composed config describes it, called directly, with disk caches in tmp_path."""

    def build(*overrides: str):
        cfg = make_cfg(f"dataset.cache_dir={tmp_path / 'cache'}", *overrides)
        from omegaconf import OmegaConf

        from datasets import crops

        keys = OmegaConf.to_container(cfg.dataset, resolve=True)
        assert keys.pop("_target_") == "datasets.crops.build"
        return crops.build(**keys, seed=0)

    return build


@pytest.fixture
def crop_csv(tmp_path):
    """A small learnable crop set: 4 PNG scenes (2 classes by brightness) with 16 boxes each."""
    return files.write_crop_scenes(tmp_path / "crops")


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """CIFAR-10 files in the real pickle layout; torchvision's expected MD5s are pointed at them, since
    the published sums can only match the published files."""
    from torchvision import datasets as tv

    root = tmp_path / "cifar"
    sums = files.write_cifar10(root)
    monkeypatch.setattr(tv.CIFAR10, "train_list", [[f"data_batch_{i}", sums[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(tv.CIFAR10, "test_list", [["test_batch", sums["test_batch"]]])
    monkeypatch.setattr(tv.CIFAR10, "meta", {**tv.CIFAR10.meta, "md5": sums["batches.meta"]})
    return root
