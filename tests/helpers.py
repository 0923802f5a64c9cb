"""What many tests do the same way, written once: start the project's scripts as programs, read TensorBoard
back with TensorBoard's own reader, compare two training states bit for bit, and run a body in a forked child
where it changes process-wide state (an rlimit, a signal handler) that must not leak into pytest itself."""

from __future__ import annotations

import atexit
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests import zygote

ROOT = Path(__file__).resolve().parent.parent
TRAIN_PY = ROOT / "train.py"
# Two processes through torchrun on the CPU (gloo); the caller adds train.py's overrides.
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN_PY]
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def program_env(**changes: str) -> dict[str, str]:
    """The environment a user's shell gives a program, plus `changes`: without HYDRA_FULL_ERROR (it turns the
    one-line errors the tests check into tracebacks) or a torchrun launch's RANK/WORLD_SIZE (a plain run would
    join a process group); unbuffered, so a killed program's output is whole; one OpenMP thread, as in-process
    tests train (conftest), so runs compare bit for bit and parallel programs do not fight over 2 cores."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR" and k not in LAUNCH_VARIABLES}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **changes}


_server: zygote.Server | None = None
FORKED_OPTIONS = {"stdin", "stdout", "stderr", "text", "start_new_session"}


def _forking_server(args: Sequence[str | Path], env: dict[str, str], options: dict) -> zygote.Server | None:
    """This pytest process's program server (tests/zygote.py: saves each program ~2.7 CPU-s of imports), or
    None where `python *args` must start fresh: interpreter flags or -c/-m first, options it does not take, an
    environment that changes how torch imports, or TESTS_FRESH_PROCESSES=1 (every program fresh, to check that
    the suite passes the same way)."""
    global _server
    if (os.environ.get("TESTS_FRESH_PROCESSES") == "1" or not str(args[0]).endswith(".py")
            or not set(options) <= FORKED_OPTIONS):
        return None
    if _server is None:
        _server = zygote.Server(program_env())
        atexit.register(_server.close)
    return _server if _server.serves(env) else None


def run_python(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 150,
               **kwargs) -> subprocess.CompletedProcess:
    """`python *args` to its end in `cwd`, output captured as text (stdout, stderr) unless kwargs say otherwise."""
    options = {"capture_output": True, "text": True, **kwargs}
    env = env or program_env()
    argv = [sys.executable, *map(str, args)]
    if options.pop("capture_output"):
        options.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    server = _forking_server(args, env, options)
    if server is None:
        return subprocess.run(argv, cwd=cwd, env=env, timeout=timeout, **options)
    with zygote.ForkedProgram(server, args, cwd, env, **options) as program:
        try:
            out, err = program.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            program.kill()
            raise
    return subprocess.CompletedProcess(argv, program.returncode, out, err)


def start_python(*args: str | Path, cwd: Path, env: dict[str, str] | None = None,
                 **kwargs) -> subprocess.Popen | zygote.ForkedProgram:
    """`python *args` started in `cwd` and left running; output goes nowhere unless kwargs send it somewhere."""
    options = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **kwargs}
    env = env or program_env()
    server = _forking_server(args, env, options)
    if server is None:
        return subprocess.Popen([sys.executable, *map(str, args)], cwd=cwd, env=env, **options)
    return zygote.ForkedProgram(server, args, cwd, env, **options)


def events(run_dir: Path) -> EventAccumulator:
    """Every event file of a run folder, read by TensorBoard's own reader (its default sample sizes)."""
    accumulator = EventAccumulator(str(run_dir))
    accumulator.Reload()
    return accumulator


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Each scalar tag of a run folder as (step, value) points, in the order TensorBoard shows them."""
    logged = events(run_dir)
    return {tag: [(e.step, e.value) for e in logged.Scalars(tag)] for tag in logged.Tags()["scalars"]}


def assert_same_state(got: dict, expected: dict) -> None:
    """Two checkpoints hold the same weights and optimizer state, bit for bit (on the CPU, with equal thread
    counts: float sums depend on both), and under trainer.ema the same live weights and update count too; the
    failure names the first tensor that differs."""
    for weights in ("model", "training_model"):
        assert (weights in got) == (weights in expected), weights
        if weights not in expected:
            continue
        assert got[weights].keys() == expected[weights].keys()
        for name, tensor in expected[weights].items():
            assert torch.equal(got[weights][name], tensor), f"{weights} {name}"
    assert got.get("ema_updates") == expected.get("ema_updates")
    assert got["optimizer"]["state"].keys() == expected["optimizer"]["state"].keys()
    for index, state in expected["optimizer"]["state"].items():
        for key, value in state.items():
            same = torch.equal(got["optimizer"]["state"][index][key], value) if torch.is_tensor(value) \
                else got["optimizer"]["state"][index][key] == value
            assert same, f"optimizer state {index} {key}"


def resume_against_unbroken(shared_run, make_cfg, crop_csv: Path, run_dir: Path, overrides: tuple[str, ...],
                            stop_after: int, epochs: int) -> tuple[dict, dict, dict]:
    """A shared run of `overrides` trained to `stop_after` epochs, copied to `run_dir` and resumed there to
    `epochs`, beside the shared unbroken run to `epochs`: (the resumed last.pt, the unbroken one's, the resumed
    run's metrics)."""
    import training  # here: most users of this module never train

    unbroken = shared_run(*overrides, f"trainer.epochs={epochs}").checkpoint("last")
    last = shared_run(*overrides, f"trainer.epochs={stop_after}").copy(run_dir) / "checkpoints" / "last.pt"
    metrics = training.run(make_cfg(f"dataset.csv={crop_csv}", *overrides, f"trainer.epochs={epochs}",
                                    f"resume={last}", run_dir=run_dir))
    return torch.load(last, weights_only=True), unbroken, metrics


def cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) that the live processes `pids` and the children they reaped have used so far,
    from Linux's /proc/PID/stat (utime, stime, cutime, cstime; a process gone already counts 0)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ticks += sum(int(value) for value in fields[11:15])  # fields 14-17 of proc(5), counted from the state (3)
    return ticks / os.sysconf("SC_CLK_TCK")


def reaped_cpu_seconds() -> float:
    """CPU seconds used by every child this process has reaped (and theirs): a started program's whole use once
    it is waited for. Less cpu_seconds([pid]) read just before a signal, it is the CPU spent after the signal,
    which, unlike the wall-clock time, a loaded machine does not stretch."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + (_server.reaped_cpu_seconds if _server is not None else 0.0)


def in_child(body: Callable[[], None], environments: Sequence[dict[str, str]] = ({},)) -> None:
    """Run `body` in a forked copy of this process, for a test that changes process-wide state (an rlimit, a
    signal handler): the change dies with the child, so pytest's own writes and later tests never see it,
    whatever the body does. A failure or error in the child fails the test with the child's traceback.
    A fork costs milliseconds (no imports, unlike a new program); the child shares the captured stdout/stderr.
    One child per entry of `environments`, all at once, each with those variables set (torchrun_ranks)."""
    children = []
    for changes in environments:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            try:
                os.close(read)
                report = b""
                try:
                    os.environ.update(changes)
                    body()
                except BaseException:  # pytest.fail and pytest.skip raise BaseExceptions too
                    report = traceback.format_exc().encode()
                sys.stdout.flush()
                sys.stderr.flush()
                with os.fdopen(write, "wb") as pipe:  # a pipe, not a file: no file size limit applies
                    pipe.write(report)
            finally:
                os._exit(0)
        os.close(write)
        children.append((pid, read))
    failures = []
    for pid, read in children:
        with os.fdopen(read, "rb") as pipe:
            report = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        if report:
            failures.append(report)
        elif os.waitstatus_to_exitcode(status) != 0:
            failures.append("the child process died before reporting")
    if failures:
        pytest.fail("in the child process:\n" + "\n".join(failures), pytrace=False)


def torchrun_ranks(world_size: int = 2) -> list[dict[str, str]]:
    """The variables torchrun gives each of `world_size` workers on this machine, for in_child: a DDP run (gloo on
    the CPU) whose ranks are forked from pytest rather than started as programs, which import for ~3.5 s of CPU
    each. For a reference run; what torchrun and train.py themselves do is tested by starting them."""
    with socket.socket() as free:  # a port for the rendezvous, as torchrun --standalone picks one
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    return [{"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
             "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            for rank in range(world_size)]


# One interpreter imports the data code (~2.6 s of CPU, torch and torchvision: most of what a builder costs) and
# forks the builders, which start building together when the launcher closes the pipe they block on. Each is a
# process of its own with its own open file for the lock, as separate runs are; each logs to builder<i>.log.
BUILDERS = """
import hashlib, importlib, json, logging, os, sys
target, keys, out, builders = sys.argv[1:]
module, name = target.split(":")
build = getattr(importlib.import_module(module), name)
start_r, start_w = os.pipe()
children = []
for i in range(int(builders)):
    pid = os.fork()
    if pid == 0:
        os.close(start_w)
        logging.basicConfig(filename=f"{out}/builder{i}.log", level=logging.INFO, format="%(message)s")
        os.read(start_r, 1)  # returns once every builder is forked and the launcher closed its end
        try:
            bundle = build(**json.loads(keys))
            logging.info("digest %s", hashlib.sha256(bundle.train.store.images.numpy().tobytes()).hexdigest())
        except BaseException:
            logging.exception("failed")
            os._exit(1)
        logging.shutdown()
        os._exit(0)
    children.append(pid)
os.close(start_w)
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
sys.exit(1 if any(codes) else 0)
"""


def build_together(target: str, source_keys: dict, cache: Path, out: Path,
                   builders: int = 3) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`builders` processes build one data set with cache=disk into `cache` at once (32x32 RGB, the rest of
    the keys as train.py's defaults); `target` is the builder (`module:function`) and `source_keys` its
    source's keys. Returns the launcher's process and each builder's log (it ends with the train split's digest)."""
    keys = dict(source_keys, width=32, height=32, channels=3, cache="disk", cache_dir=str(cache), val_fraction=0.2,
                mean=[0.5], std=[0.5], seed=0)
    launched = run_python("-c", BUILDERS, target, json.dumps(keys), str(out), str(builders), cwd=ROOT, timeout=120)
    return launched, [(out / f"builder{i}.log").read_text() for i in range(builders)]


def returns_within(seconds: float, work: Callable[[], object]):
    """`work()` on a thread, its result or its exception; fails the test, rather than hanging the suite, when
    it has not returned in time (a read blocked on a FIFO). The thread, if stuck, is a daemon: it dies with
    pytest."""
    outcome = {}

    def run():
        try:
            outcome["value"] = work()
        except Exception as e:  # handed back to the test's thread
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s (blocked opening a FIFO?)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
