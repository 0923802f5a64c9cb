"""Checkpoints: what they hold, that they load without pickled code, atomic saves, and exact resume."""

import copy
import random
import shutil
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import training
from errors import UserError
from models.cnn import TutorialCNN
from tests import files
from tests.helpers import TRAIN_PY, assert_same_state, run_python, scalars, start_python
from training import checkpoint as checkpoints
from training.runner import _resumed_config
from training.loop import NonFiniteLoss, Normalizer, train_one_epoch
from training.position import EpochPlan
from training.step import StepOptions, TrainStep

# 64 crops, 20% of each class held out: 52 train = 7 batches of 8 per epoch.
STEPS_PER_EPOCH = 7
# Warm-up restarts with each process, so these two differ between a resumed and an unbroken run.
TIMING_TAGS = {"train/throughput", "train/data_wait", "train/epoch_seconds"}


# Batch 8 and a step schedule (so the scheduler's state matters on resume).
CROP_RUN = ("loader.batch_size=8", "scheduler=step", "scheduler.step_size=1", "scheduler.gamma=0.5")


@pytest.fixture
def crop_run(make_cfg, crop_csv, tmp_path):
    """Compose a CROP_RUN in tmp_path / name."""

    def make(name: str, *overrides: str):
        return make_cfg(f"dataset.csv={crop_csv}", *CROP_RUN, *overrides, run_dir=tmp_path / name)

    return make


@pytest.fixture
def one_epoch(shared_run, tmp_path) -> Path:
    """A one-epoch CROP_RUN (trained once per session) copied to tmp_path / "run", for a test to resume or edit."""
    return shared_run(*CROP_RUN, "trainer.epochs=1").copy(tmp_path / "run")


def test_checkpoints_load_weights_only_and_hold_the_run(shared_run):
    run = shared_run(*CROP_RUN, "trainer.epochs=2")
    metrics, folder = run.metrics, run.dir / "checkpoints"
    last = torch.load(folder / "last.pt", weights_only=True)
    best = torch.load(folder / "best.pt", weights_only=True)
    assert (last["epoch"], last["step"]) == (2, 2 * STEPS_PER_EPOCH)
    assert best["metrics"]["val/acc"] == metrics["val/acc_best"] == last["metrics"]["val/acc_best"]
    for checkpoint in (last, best):
        assert checkpoint["classes"] == ["bright", "dark"]
        assert checkpoint["input_shape"] == [3, 32, 32] and checkpoint["channels"] == 3
        assert checkpoint["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
        assert checkpoint["config"]["scheduler"]["_target_"] == "torch.optim.lr_scheduler.StepLR"
        assert type(checkpoint["config"]) is dict
        assert set(checkpoint["rng"]) == {"python", "numpy", "torch", "cuda"}
        assert checkpoint["loader"]["seed"] == 0
        assert checkpoint["scheduler"]["last_epoch"] == checkpoint["epoch"]
        assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.5 ** checkpoint["epoch"])
        TutorialCNN(3, 32, 32, 2).load_state_dict(checkpoint["model"])  # strict: every key, every shape


def test_failed_save_leaves_previous_checkpoint_whole(crop_run, one_epoch, monkeypatch):
    folder = one_epoch / "checkpoints"
    before = (folder / "last.pt").read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match=r"cannot save .*last.pt \(No space left on device\); the previous one is kept"):
        training.run(crop_run("resumed", "trainer.epochs=2", f"resume={folder / 'last.pt'}"))
    assert (folder / "last.pt").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt"]  # no temp file left behind
    assert torch.load(folder / "last.pt", weights_only=True)["epoch"] == 1


def test_a_resume_opened_in_the_second_of_an_earlier_attempts_events_still_shows(crop_run, one_epoch, tmp_path):
    """TensorBoard reads a run's event files in name order (second, host, pid, counter; not zero-padded) and
    applies each file's session start as it goes. An attempt killed in its first second and resumed at once
    can leave a file that sorts after the resumed one: here, the same second with a pid that sorts last."""
    (earlier,) = (tmp_path / "run").glob("events.out.tfevents.*")
    time.sleep(1 - time.time() % 1)  # a second's start: the resume below opens its events within it
    earlier.rename(earlier.with_name(f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.99999999.0"))
    training.run(crop_run("run", "trainer.epochs=2", f"resume={tmp_path / 'run/checkpoints/last.pt'}"))
    assert [step for step, _ in scalars(tmp_path / "run")["val/acc"]] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


def test_resume_is_bitwise_equal_to_an_unbroken_run(crop_run, shared_run, tmp_path):
    unbroken_run = shared_run(*CROP_RUN, "trainer.epochs=2")  # the same crops, written elsewhere
    training.run(crop_run("broken", "trainer.epochs=1"))
    folder = tmp_path / "broken" / "checkpoints"
    shutil.copy(folder / "last.pt", folder / "epoch1.pt")
    # An attempt that logged epoch 2 and then "died": its events after the checkpoint must not survive.
    training.run(crop_run("elsewhere", "trainer.epochs=2", f"resume={folder / 'epoch1.pt'}"))
    metrics = training.run(crop_run("elsewhere", "trainer.epochs=2", f"resume={folder / 'epoch1.pt'}"))

    assert not (tmp_path / "elsewhere").exists()  # a checkpoint in a run's checkpoints/ continues that run
    unbroken = unbroken_run.checkpoint("last")
    resumed = torch.load(folder / "last.pt", weights_only=True)
    assert resumed["epoch"] == unbroken["epoch"] == 2
    assert_same_state(resumed, unbroken)
    assert resumed["scheduler"] == unbroken["scheduler"]
    assert torch.equal(resumed["rng"]["torch"], unbroken["rng"]["torch"])

    expected, logged = scalars(unbroken_run.dir), scalars(tmp_path / "broken")
    assert set(logged) == set(expected)
    for tag in set(expected) - TIMING_TAGS:
        assert logged[tag] == expected[tag], tag  # same steps, once each, in order, and the same values
    assert metrics["val/acc_best"] == unbroken["metrics"]["val/acc_best"]


def test_resume_past_the_last_epoch_is_a_user_error(crop_run, one_epoch, tmp_path):
    with pytest.raises(UserError, match="trainer.epochs above 1"):
        training.run(crop_run("run", "trainer.epochs=1", f"resume={tmp_path / 'run/checkpoints/last.pt'}"))


def test_a_resume_without_trainer_epochs_keeps_the_end_its_run_started_with(crop_run, tmp_path):
    """An interrupted 3-epoch run (its last save after epoch 1) resumed by `resume=PATH` alone trains to 3;
    trainer.epochs on the command line sets another end."""
    training.run(crop_run("run", "trainer.epochs=3"))
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)
    checkpoint["epoch"] = 1  # as the save after epoch 1 of the run would hold
    command = crop_run("again", f"resume={tmp_path / 'run/checkpoints/last.pt'}", "trainer.epochs=5")
    assert _resumed_config(checkpoint, command, epochs_given=False).trainer.epochs == 3  # 5 was not typed
    assert _resumed_config(checkpoint, command, epochs_given=True).trainer.epochs == 5


def test_resume_after_the_classes_changed_is_a_user_error(crop_run, crop_csv, tmp_path):
    training.run(crop_run("run", "trainer.epochs=1"))
    crop_csv.write_text(crop_csv.read_text().replace("bright", "light"))
    with pytest.raises(UserError, match="trained on classes"):
        training.run(crop_run("run", "trainer.epochs=2", f"resume={tmp_path / 'run/checkpoints/last.pt'}"))


@pytest.mark.slow
def test_train_py_resume_needs_only_the_checkpoint_and_epochs(one_epoch, tmp_path):
    """The checkpoint's config is the run's: no dataset, loader or scheduler overrides to repeat."""
    # Without trainer.epochs a resume finishes the run to the epochs it started with (here 1: nothing left),
    # rather than to the default 10.
    finished = run_python(TRAIN_PY, f"resume={tmp_path / 'run/checkpoints/last.pt'}", cwd=tmp_path)
    assert finished.returncode == 1 and "has already trained 1 epochs" in finished.stdout + finished.stderr
    result = run_python(TRAIN_PY, f"resume={tmp_path / 'run/checkpoints/last.pt'}", "trainer.epochs=2",
                        "trainer.progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert (resumed["epoch"], resumed["step"]) == (2, 2 * STEPS_PER_EPOCH)
    assert resumed["scheduler"]["last_epoch"] == 2
    assert [step for step, _ in scalars(tmp_path / "run")["val/acc"]] == [7, 14]


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    """Nothing in today's training draws from the global generators, so the resume test cannot see them;
    augmentation would. Every generator must continue where it was saved."""
    checkpoints.save({"rng": checkpoints.rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(()).item(), np.random.randn())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    checkpoints.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(()).item(), np.random.randn()) == expected


def test_a_checkpoint_from_a_machine_with_more_gpus_restores_one_cuda_state_per_visible_gpu():
    """Trained on 2 GPUs, resumed with CUDA_VISIBLE_DEVICES=0: torch.cuda.set_rng_state_all would index the
    second state past the last GPU (IndexError); the CPU streams are restored whatever the GPU count."""
    saved = [torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)]
    assert [int(s[0]) for s in checkpoints.cuda_states_to_restore(saved, visible=1)] == [1]
    assert checkpoints.cuda_states_to_restore(saved, visible=0) == []
    assert len(checkpoints.cuda_states_to_restore(saved[:1], visible=4)) == 1


@pytest.mark.slow
def test_a_sigkilled_run_resumes_from_its_mid_epoch_checkpoint_bitwise_equal(make_cfg, tmp_path):
    """SIGKILL (the OOM killer, a preempted machine) runs no handler: only what checkpoint_every saved survives,
    with the TensorBoard points logged before that save. cache=none decodes a 256x256 noise PNG per crop, so an
    epoch lasts long enough to kill inside it."""
    csv_path = files.write_noise_crops(tmp_path / "noise", sources=4, size=256, boxes=30)
    overrides = [f"dataset.csv={csv_path}", "dataset.split_by=row", "dataset.cache=none", "loader.mode=dataloader",
                 "loader.num_workers=0",
                 "loader.batch_size=2", "trainer.checkpoint_every=4",  # 96 training crops: 48 steps an epoch
                 "trainer.log_every=3"]  # windows end between saves: the first save keeps one
    # One torch thread (helpers.program_env), as the in-process runs below (conftest): bitwise comparable.
    killed = start_python(TRAIN_PY, *overrides, "trainer.epochs=1", "trainer.progress=false", "trainer.device=cpu",
                          "hydra.run.dir=killed", cwd=tmp_path)
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.kill()  # SIGKILL
    assert killed.wait(timeout=60) == -signal.SIGKILL
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 0 and 0 < saved["batches_done"] < 48 and saved["step"] % 4 == 0
    assert not (last.parent / "best.pt").exists()  # none before the first validation
    (last.parent / ".last.pt.tmp-999999").write_bytes(b"half a checkpoint")  # as a kill mid-save leaves it

    training.run(make_cfg(f"resume={last}", "trainer.epochs=1"))
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt"]  # the temp file went
    training.run(make_cfg(*overrides, "trainer.epochs=1", run_dir=tmp_path / "unbroken"))
    resumed = torch.load(last, weights_only=True)
    unbroken = torch.load(tmp_path / "unbroken" / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["step"] == unbroken["step"] == 48
    assert_same_state(resumed, unbroken)
    assert torch.equal(resumed["rng"]["torch"], unbroken["rng"]["torch"])

    # The same train/loss points: those logged before the save, then windows at the unbroken run's steps. The
    # first window after the checkpoint averages only the steps since it; every later one is the same number.
    expected, logged = scalars(tmp_path / "unbroken")["train/loss"], scalars(tmp_path / "killed")["train/loss"]
    assert [step for step, _ in logged] == [step for step, _ in expected] == [*range(3, 48, 3), 48]
    first_after = next(step for step, _ in expected if step > saved["step"])
    assert [p for p in logged if p[0] != first_after] == [p for p in expected if p[0] != first_after]


def test_a_resumed_epoch_closes_its_windows_at_the_steps_of_an_unbroken_one():
    """Windows count from the epoch's start, not from where a resumed run began: points at 4, 8, 10 for
    log_every=4 however many batches the epoch had done."""
    torch.manual_seed(0)
    batches = [(torch.randint(0, 256, (2, 3, 2, 2), dtype=torch.uint8), torch.randint(0, 2, (2,))) for _ in range(10)]
    normalize = Normalizer([0.5] * 3, [0.5] * 3, torch.device("cpu"))
    start = nn.Sequential(nn.Flatten(), nn.Linear(12, 2))

    def train(model, optimizer, part, batches_done):
        windows = []
        step = TrainStep(model, optimizer, normalize, StepOptions(), torch.device("cpu"))
        plan = EpochPlan(epoch=0, first_batch=batches_done, start_step=batches_done, batches_per_epoch=len(batches),
                         warmup_until=0, log_every=4)
        train_one_epoch(step, part, plan, on_window=windows.append)
        return [(w.step, w.loss) for w in windows]

    model = copy.deepcopy(start)
    unbroken = train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), batches, 0)
    model = copy.deepcopy(start)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, optimizer, batches[:3], 0)  # the run stopped after 3 batches
    resumed = train(model, optimizer, batches[3:], 3)
    assert [step for step, _ in resumed] == [step for step, _ in unbroken] == [4, 8, 10]
    assert resumed[1:] == unbroken[1:]  # the first averages batch 4 alone


def test_checkpoint_every_below_one_is_a_user_error(crop_run):
    with pytest.raises(UserError, match="trainer.checkpoint_every must be at least 1, got 0"):
        training.run(crop_run("zero", "trainer.checkpoint_every=0"))


def test_a_mid_epoch_save_never_replaces_last_pt_with_nan_weights(crop_run):
    """The loss is checked when a window closes (every log_every steps); a checkpoint_every save between two
    checks must look at the weights itself."""
    cfg = crop_run("nan", "optim.lr=1000", "trainer.checkpoint_every=1", "trainer.log_every=4")
    with pytest.raises(NonFiniteLoss):
        training.run(cfg)
    saved = torch.load(Path(cfg.run_dir) / "checkpoints" / "last.pt", weights_only=True)
    assert saved["epoch"] == 0 and saved["batches_done"] >= 1  # the last good mid-epoch state
    assert all(torch.isfinite(t).all() for t in saved["model"].values())
