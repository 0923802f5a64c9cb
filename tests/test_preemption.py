"""Cluster life: a stop signal saves and exits, resume=auto finishes the run bit for bit, one run per folder."""

import fcntl
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import training
from errors import UserError
from tests import files, helpers, shared_runs
from tests.conftest import compose_train, torch_threads
from tests.helpers import TORCHRUN, TRAIN_PY, run_python, start_python
from training import folder_lock, resume, stop
# 192 training crops of 512x512 noise PNGs decoded per item (cache=none): a 96-step epoch at batch 2 lasts ~1 s,
# long enough to stop inside; checkpoint_every=4 saves a first last.pt that says training is under way.
NOISE = dict(sources=4, size=512, boxes=60)
STEPS = 96
RUN = ["dataset.split_by=row", "dataset.cache=none", "loader.mode=dataloader", "loader.num_workers=0",
       "loader.batch_size=2",
       "trainer.checkpoint_every=4", "trainer.log_every=3", "trainer.epochs=1", "trainer.progress=false",
       "trainer.device=cpu"]
TIMING_TAGS = {"train/throughput", "train/data_wait", "train/epoch_seconds"}  # wall-clock figures, never equal


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    return {tag: points for tag, points in helpers.scalars(run_dir).items() if tag not in TIMING_TAGS}


def last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


def assert_same_training(got: Path, expected: Path) -> None:
    """Weights, optimizer state and every TensorBoard point but wall-clock ones, bit for bit."""
    assert last(got)["step"] == last(expected)["step"]
    helpers.assert_same_state(last(got), last(expected))
    assert scalars(got) == scalars(expected)


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert path.exists(), f"{path} never appeared"


@pytest.fixture(scope="session")
def noise_csv(tmp_path_factory) -> Path:
    return shared_runs.once(tmp_path_factory, "noise", lambda folder: files.write_noise_crops(folder, **NOISE)) / \
        "crops.csv"


@pytest.fixture(scope="session")
def unbroken(tmp_path_factory, noise_csv) -> Path:
    """The run a stopped and resumed one must equal, trained in-process without a stop."""

    def make(folder: Path) -> None:
        # One torch thread, as program_env's programs train: a session fixture is set up before the per-test one.
        with torch_threads(1):
            training.run(compose_train(folder / "run", f"dataset.csv={noise_csv}", *RUN, "trainer.warmup_steps=5"))

    return shared_runs.once(tmp_path_factory, "unbroken-cpu", make) / "run"


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_the_same_command_finishes_bitwise_like_an_unbroken_run(noise_csv, unbroken,
                                                                                            tmp_path):
    """A requeued job runs its command again: the same `resume=auto` command first starts the run, is stopped by
    SIGTERM mid-epoch, then continues it. An override typed beside it is named as ignored, and is."""
    command = [TRAIN_PY, f"dataset.csv={noise_csv}", *RUN, "hydra.run.dir=run", "resume=auto"]
    first = start_python(*command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(tmp_path / "run" / "checkpoints" / "last.pt", first)
    reaped, at_signal = helpers.reaped_cpu_seconds(), helpers.cpu_seconds([first.pid])
    first.send_signal(signal.SIGTERM)
    output, _ = first.communicate(timeout=60)
    # Prompt: CPU seconds from the signal to the exit, not wall-clock ones (11.7 s at a load average of 11, for a
    # run that saved 0.2 s after the signal and spent the rest waiting for a core to shut down on).
    assert helpers.reaped_cpu_seconds() - reaped - at_signal < 5, output
    assert first.returncode == 128 + signal.SIGTERM, output
    assert "resume=auto: no checkpoint" in output and "Traceback" not in output
    saved = last(tmp_path / "run")
    assert f"interrupted at step {saved['step']} (epoch 1, batch {saved['step']})" in output
    assert saved["epoch"] == 0 and 4 <= saved["step"] < STEPS
    summary = EventAccumulator(str(tmp_path / "run"), size_guidance={"tensors": 0})
    summary.Reload()
    assert b"preempted (SIGTERM)" in summary.Tensors("run/summary/text_summary")[-1].tensor_proto.string_val[0]

    again = run_python(*command, "optim.lr=0.5", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    warnings = [line for line in again.stdout.splitlines() if "ignores" in line]
    assert len(warnings) == 1 and warnings[0].endswith(
        "continues with its checkpoint's config and ignores optim.lr=0.5 (a resumed run takes only resume, "
        "trainer.epochs, trainer.device, trainer.progress, trainer.stop_signals, max_image_pixels from its command; "
        "start a new run to change the others)")
    assert f"continuing {tmp_path / 'run' / 'checkpoints' / 'last.pt'}" in again.stdout
    assert_same_training(tmp_path / "run", unbroken)


@pytest.mark.slow
def test_sigusr1_during_a_disk_cache_build_leaves_no_temp_file(tmp_path):
    """Before training a stop signal ends the run at once, through the cleanups: the cache build's temp file goes."""
    csv_path = files.write_noise_crops(tmp_path / "big", sources=8, size=1024, boxes=100)  # ~12 ms a decode
    cache = tmp_path / "cache"
    run = start_python(TRAIN_PY, f"dataset.csv={csv_path}", "dataset.cache=disk", f"dataset.cache_dir={cache}",
                       "trainer.device=cpu", "trainer.progress=false", "hydra.run.dir=run", cwd=tmp_path,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while not list(cache.glob("*.tmp-*")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert list(cache.glob("*.tmp-*")), "the build never started"
    run.send_signal(signal.SIGUSR1)
    output, _ = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGUSR1, output
    assert list(cache.glob("*.tmp-*")) == [] and not list(cache.glob("*.npy"))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_two_runs_started_together_in_one_folder_one_runs_the_other_is_refused(crop_csv, tmp_path):
    command = [TRAIN_PY, f"dataset.csv={crop_csv}", "trainer.device=cpu", "trainer.epochs=1", "trainer.progress=false",
               "hydra.run.dir=run"]
    runs = []
    for _ in range(2):
        runs.append(start_python(*command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        time.sleep(0.2)
    results = [(run.wait(timeout=120), *run.communicate()) for run in runs]
    assert sorted(code for code, _, _ in results) == [0, 1], results
    refused = next(result for result in results if result[0] == 1)
    ran = next(run for run, result in zip(runs, results) if result[0] == 0)
    # Which refusal the second run meets depends on timing: the lock while the first run trains, or, when a loaded
    # machine starts the second Python only after the first run ended, the used-folder check. Either is one line.
    assert refused[1] == "" and refused[2].splitlines() in (
        [f"Error: {tmp_path / 'run'} is in use by another run (process {ran.pid}): one folder holds one run at a "
         "time; wait for it to end, or pick another hydra.run.dir"],
        ["Error: run already holds another run: a run never writes into another's folder; pick a new "
         "hydra.run.dir, or continue it with resume=run/checkpoints/last.pt"])
    run_dir = tmp_path / "run"
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert (run_dir / "train.log").read_text().count("] - data: ") == 1
    assert (run_dir / ".lock").read_text() == f"{ran.pid}\n"


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock as a run does (flock on .lock with its pid), until its stdin closes."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = start_python("-c", (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(folder / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"), cwd=folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_a_folder_another_run_holds_is_refused_and_its_lock_is_free_once_that_run_ends(tmp_path):
    """A flock belongs to an open file: a second opening of .lock in this process stands in for another run's."""
    folder = tmp_path / "run"
    folder.mkdir()
    other = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(other, fcntl.LOCK_EX)
    os.write(other, b"4242\n")
    try:
        with pytest.raises(UserError, match=rf"^{folder} is in use by another run \(process 4242\): .*"
                                            "pick another hydra.run.dir$"):
            folder_lock.claim(folder, "hydra.run.dir")
        assert (folder / ".lock").read_text() == "4242\n" and [p.name for p in folder.iterdir()] == [".lock"]
    finally:
        os.close(other)  # as the kernel does when a run ends, killed or not
    with folder_lock.claimed(folder, "hydra.run.dir"):  # no cleanup was needed: the lock is free
        assert (folder / ".lock").read_text() == f"{os.getpid()}\n"
        assert not folder_lock.claim(folder, "hydra.run.dir")  # this process holds it already
    with folder_lock.claimed(folder, "hydra.run.dir"):  # and released it on leaving the block
        pass


@pytest.mark.slow
def test_a_second_sweep_in_a_held_sweep_folder_is_refused_before_hydra_writes_there(crop_csv, tmp_path):
    sweep = tmp_path / "sweep"
    holder = hold_lock(sweep)
    try:
        result = run_python(TRAIN_PY, "-m", f"dataset.csv={crop_csv}", "trainer.device=cpu", f"hydra.sweep.dir={sweep}",
                            "optim.lr=0.01,0.02", cwd=tmp_path)
    finally:
        holder.communicate("", timeout=10)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"Error: {sweep} is in use by another run (process {holder.pid}): one folder holds one run at a time; wait "
        "for it to end, or pick another hydra.sweep.dir"]
    assert [p.name for p in sweep.iterdir()] == [".lock"]


def test_stop_signals_are_named_and_checked():
    assert stop.parse(["SIGTERM", "usr1", "SIGTERM"]) == (signal.SIGTERM, signal.SIGUSR1)
    for bad in ("SIGKILL", "SIGNOPE", "9"):
        with pytest.raises(UserError, match=rf"trainer.stop_signals: '{bad}' is not a signal a run can catch"):
            stop.parse([bad])


def test_a_second_signal_during_the_save_is_dropped_and_ctrl_c_again_aborts_outside_it():
    def body() -> None:  # signal handlers are process-wide: in a forked child
        with stop.StopSignals([signal.SIGTERM, signal.SIGUSR1]).installed():
            with pytest.raises(stop.Stopped) as before_the_loop:  # before the loop: at once
                os.kill(os.getpid(), signal.SIGUSR1)
        assert before_the_loop.value.signum == signal.SIGUSR1
        signals = stop.StopSignals([signal.SIGTERM, signal.SIGUSR1])
        with signals.installed():
            signals.at_step_boundaries()
            os.kill(os.getpid(), signal.SIGTERM)  # in the loop: noted for the next step boundary
            assert signals.requested == signal.SIGTERM
            with signals.saving():  # during the save: a second signal is dropped, a Ctrl-C too
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
            assert signals.requested == signal.SIGTERM
            with pytest.raises(stop.Stopped) as ctrl_c_again:  # Ctrl-C again outside the save: at once
                os.kill(os.getpid(), signal.SIGINT)
            assert ctrl_c_again.value.signum == signal.SIGINT
            assert signals.stopped().exit_code == 143

    helpers.in_child(body)


def test_overrides_a_resumed_run_ignores_are_the_ones_that_differ_from_its_checkpoint(make_cfg):
    command = make_cfg("optim.lr=0.5", "trainer.epochs=3", "loader.batch_size=16")
    resumed = make_cfg("trainer.epochs=2", "loader.batch_size=16")
    typed = ["optim.lr=0.5", "trainer.epochs=3", "loader.batch_size=16", "hydra.run.dir=x", "experiment=fast"]
    # experiment=fast has no key of its own: named because the configs differ (optim.lr)
    assert resume.ignored(command, resumed, typed) == ["optim.lr=0.5", "experiment=fast"]
    assert resume.ignored(resumed, resumed, typed) == []


# Under torchrun each of the 2 ranks takes 48 of the 96 steps an epoch has in one process.
RANK_STEPS = STEPS // 2


@pytest.fixture(scope="session")
def unbroken_torchrun(tmp_path_factory, noise_csv) -> Path:
    """The 2-process run the stopped, killed and resumed torchrun runs must equal: the same DDP run, its two ranks
    forked from this process with torchrun's variables (helpers.torchrun_ranks) instead of started as programs."""

    def make(folder: Path) -> None:
        # As the unbroken one-process run: train.py's warmup_steps, and the one torch thread programs get.
        cfg = compose_train(folder / "run", f"dataset.csv={noise_csv}", *RUN, "trainer.warmup_steps=5")
        with torch_threads(1):
            helpers.in_child(lambda: training.run(cfg), helpers.torchrun_ranks(2))

    return shared_runs.once(tmp_path_factory, "unbroken-torchrun", make) / "run"


def process_tree(pid: int) -> list[int]:
    """pid and every process under it, from Linux's /proc: torchrun starts each worker in a session of its own,
    so killing torchrun's process group would leave the workers training."""
    tree, todo = [], [pid]
    while todo:
        parent = todo.pop()
        tree.append(parent)
        try:
            for task in Path(f"/proc/{parent}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # it exited meanwhile
            pass
    return tree


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a zombie, exited but not yet reaped by init, counts as gone)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z":
            running.append(pid)
    return running


def wait_until_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(pids)


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_where_the_ranks_agree_and_resume_auto_finishes_bitwise(noise_csv, unbroken_torchrun,
                                                                                         tmp_path):
    """torchrun passes SIGTERM to its workers; they agree on a step, rank 0 saves last.pt there, all exit; the same
    command again continues the run to the unbroken one's weights, optimizer and TensorBoard points."""
    command = [*TORCHRUN, f"dataset.csv={noise_csv}", *RUN, "hydra.run.dir=run", "resume=auto"]
    with open(tmp_path / "first.log", "w") as log:
        first = start_python(*command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        wait_for(tmp_path / "run" / "checkpoints" / "last.pt", first)
        tree = process_tree(first.pid)
        reaped, at_signal = helpers.reaped_cpu_seconds(), helpers.cpu_seconds(tree)
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    # CPU seconds from the signal to the exit of torchrun and the workers it reaped (a loaded machine stretches
    # wall-clock ones): each worker finishes its step, rank 0 saves, all exit.
    assert helpers.reaped_cpu_seconds() - reaped - at_signal < 10
    assert wait_until_gone(tree, 5) == []
    output = (tmp_path / "first.log").read_text()
    saved = last(tmp_path / "run")
    assert saved["epoch"] == 0 and 4 <= saved["step"] < RANK_STEPS, output[-3000:]
    assert f"interrupted at step {saved['step']} " in output

    again = run_python(*command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.log", "run"]  # each rank's Hydra: one run folder
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2
    assert_same_training(tmp_path / "run", unbroken_torchrun)


@pytest.mark.slow
def test_workers_of_a_killed_torchrun_save_where_they_agree_and_exit(noise_csv, tmp_path):
    """SIGKILL to torchrun alone (its workers run in sessions of their own): each worker sees its launcher gone,
    the ranks stop at one step, rank 0 saves last.pt there (with the open logging window, as a SIGTERM stop
    does: resuming from it is the SIGTERM test's), and no process is left within 15 s."""
    command = [*TORCHRUN, f"dataset.csv={noise_csv}", *RUN, "hydra.run.dir=run", "resume=auto"]
    with open(tmp_path / "killed.log", "w") as log:
        killed = start_python(*command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        wait_for(tmp_path / "run" / "checkpoints" / "last.pt", killed)
        tree = process_tree(killed.pid)
        assert len(tree) >= 3  # torchrun and its two workers
        killed.kill()
        killed.wait(timeout=10)
        assert wait_until_gone(tree, 15) == []
    output = (tmp_path / "killed.log").read_text()
    assert "torchrun (process" in output and "is gone: stopping this worker" in output
    saved = last(tmp_path / "run")
    assert f"interrupted at step {saved['step']} " in output
    assert saved["epoch"] == 0 and 4 <= saved["step"] < RANK_STEPS
    assert saved["batches_done"] == saved["step"] and len(saved["window"]) == saved["step"] % 3  # log_every=3


@pytest.mark.slow
def test_a_torchrun_killed_after_a_mid_epoch_save_resumes_bitwise_equal_to_an_unbroken_one(noise_csv,
                                                                                          unbroken_torchrun, tmp_path):
    """Both ranks and torchrun are SIGKILLed (a lost machine: no handler runs) after rank 0 saved last.pt mid-epoch
    (trainer.checkpoint_every); a resume ends with the unbroken run's weights, and its TensorBoard points but the
    first after the checkpoint, which averages only the steps since it (a kill leaves no open window behind).
    The resume's two ranks are forked from this process with torchrun's variables, as the unbroken run's are
    (~9 s of CPU less than torchrun and two interpreters); resuming through torchrun itself is the SIGTERM test's."""
    with open(tmp_path / "killed.log", "w") as log:
        killed = start_python(*TORCHRUN, f"dataset.csv={noise_csv}", *RUN, "hydra.run.dir=killed", cwd=tmp_path,
                              stdout=log, stderr=subprocess.STDOUT)
        last_pt = tmp_path / "killed" / "checkpoints" / "last.pt"
        wait_for(last_pt, killed)
        for pid in reversed(process_tree(killed.pid)):  # the workers first: they write the checkpoints
            os.kill(pid, signal.SIGKILL)
        assert killed.wait(timeout=60) == -signal.SIGKILL
    saved = torch.load(last_pt, weights_only=True)
    assert saved["epoch"] == 0 and 0 < saved["batches_done"] < RANK_STEPS and saved["step"] % 4 == 0

    # What the resume command `torchrun ... train.py resume=last.pt trainer.epochs=1` composes (its run folder
    # is the checkpoint's, whatever run_dir says).
    resume_cfg = compose_train(tmp_path / "again", f"resume={last_pt}", "trainer.epochs=1")
    helpers.in_child(lambda: training.run(resume_cfg), helpers.torchrun_ranks(2))
    expected, got = last(unbroken_torchrun), last(tmp_path / "killed")
    assert got["step"] == expected["step"] == RANK_STEPS
    helpers.assert_same_state(got, expected)
    assert got["metrics"]["val/loss"] == expected["metrics"]["val/loss"]
    points, reference = scalars(tmp_path / "killed")["train/loss"], scalars(unbroken_torchrun)["train/loss"]
    assert [step for step, _ in points] == [step for step, _ in reference] == list(range(3, RANK_STEPS + 1, 3))
    first_after = next(step for step, _ in reference if step > saved["step"])
    assert [p for p in points if p[0] != first_after] == [p for p in reference if p[0] != first_after]
