"""Training faults: non-finite loss, gradient clipping, dying workers, Ctrl-C, unsafe checkpoints, run dirs."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

import training
from errors import UserError
from tests.helpers import TRAIN_PY, events, run_python, start_python
from training import checkpoint as checkpoints
from training.build import build_optimizer
from training.loaders import build_loader
from training.loop import NonFiniteLoss
from training.step import StepOptions, TrainStep


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(make_cfg, crop_csv, tmp_path):
    run_dir = tmp_path / "run"
    # Epoch 1 trains at lr 0.01; the schedule then multiplies it by 1e30, which no network survives.
    cfg = make_cfg(f"dataset.csv={crop_csv}", "loader.batch_size=8", "trainer.epochs=3", "scheduler=step",
                   "scheduler.step_size=1", "scheduler.gamma=1e30", run_dir=run_dir)
    with pytest.raises(NonFiniteLoss, match=r"at step (\d+): .*optim.clip_grad_norm") as error:
        training.run(cfg)
    assert int(error.value.args[0].split("at step ")[1].split(":")[0]) > 7  # in epoch 2 (7 steps an epoch)
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert (last["epoch"], last["step"]) == (1, 7)
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["step"] == 7
    assert not (run_dir / "metrics.json").exists()
    assert events(run_dir).Scalars("train/loss")  # what was logged before the stop was flushed


def test_clip_grad_norm_bounds_each_step(make_cfg):
    cfg = make_cfg("optim.clip_grad_norm=0.001", "optim.momentum=0")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    optimizer, _, _ = build_optimizer(cfg.optim, None, model, steps_per_epoch=1)
    before = [p.detach().clone() for p in model.parameters()]
    inputs, targets = torch.randn(8, 3, 2, 2) * 100, torch.randint(0, 3, (8,))

    def step_size(clip):
        for p, b in zip(model.parameters(), before):
            p.data.copy_(b)
        TrainStep(model, optimizer, None, StepOptions(clip_grad_norm=clip), inputs.device).on_inputs(inputs, targets)
        return torch.sqrt(sum(((p - b).double() ** 2).sum() for p, b in zip(model.parameters(), before)))

    # SGD without momentum moves by lr * gradient, whose norm the clip caps at 0.001 (1% for float32 rounding).
    assert 0 < step_size(cfg.optim.clip_grad_norm) <= cfg.optim.lr * 0.001 * 1.01
    assert step_size(None) > 100 * cfg.optim.lr * 0.001


class DiesInWorker(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        os._exit(3)  # as the OOM killer or a segfault would end a worker


def test_a_dying_worker_raises_with_a_hint():
    loader = build_loader(DiesInWorker(), device=torch.device("cpu"), seed=0, train=True, mode="dataloader",
                          batch_size=2, shuffle=False, num_workers=1, pin_memory=False, persistent_workers=False,
                          prefetch_factor=2)
    with pytest.raises(UserError, match="DataLoader worker died .*loader.num_workers=0.*shm"):
        next(iter(loader))


@pytest.mark.slow
def test_ctrl_c_saves_last_pt_closes_tensorboard_and_exits_non_zero(crop_csv, tmp_path):
    run = start_python(TRAIN_PY, f"dataset.csv={crop_csv}", "dataset.split_by=row", "dataset.cache=none",
                       "loader.mode=dataloader", "loader.num_workers=0", "loader.batch_size=2", "trainer.epochs=1000", "trainer.progress=false",
                       "trainer.device=cpu", "hydra.run.dir=run", cwd=tmp_path, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    # Start-up and one epoch take ~5 s on a quiet machine and over 60 s on a loaded 2-core one; pytest-timeout
    # ends the test if the program hangs.
    while not last.exists() and run.poll() is None:  # at least one epoch done
        time.sleep(0.2)
    assert run.poll() is None, run.communicate()[0]
    first_epoch = torch.load(last, weights_only=True)
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=60)
    assert run.returncode == 130, output
    assert "interrupted at step" in output and "Traceback" not in output
    saved = torch.load(last, weights_only=True)
    # The save is the interrupt's own, not the epoch's: it names the step the log says was interrupted. A
    # signal that lands before epoch 2's first step ends (seen under load) saves that same step again.
    assert saved["step"] >= first_epoch["step"]
    assert f"interrupted at step {saved['step']}" in output, output
    assert saved["step"] == saved["epoch"] * 26 + saved["batches_done"]  # 52 training crops / batch 2
    assert events(tmp_path / "run").Scalars("train/loss")[-1].step <= saved["step"]


class Payload:
    """What a malicious checkpoint carries: unpickling it would run code (here, create a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_a_pickle_payload_is_refused_without_running(make_cfg, make_eval_cfg, crop_csv, tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": checkpoints.FORMAT, "model": Payload(marker)}, evil)
    with pytest.raises(UserError, match="not a checkpoint this trainer can read"):
        training.run(make_cfg(f"resume={evil}", "trainer.epochs=2"))
    from commands.evaluation import run_evaluation

    with pytest.raises(UserError, match="not a checkpoint this trainer can read"):
        run_evaluation(make_eval_cfg(f"checkpoint={evil}"))
    assert not marker.exists()
    with open(evil, "rb") as f:  # the payload is real: plain unpickling would have run it
        assert b"touch" in f.read()


def test_a_run_never_writes_into_another_runs_dir(make_cfg, shared_run, crop_csv, tmp_path):
    run_dir = shared_run().copy(tmp_path / "run")
    before = (run_dir / "metrics.json").read_bytes()
    with pytest.raises(UserError, match="already holds another run.*resume="):
        training.run(make_cfg(f"dataset.csv={crop_csv}", run_dir=run_dir))
    assert (run_dir / "metrics.json").read_bytes() == before


@pytest.mark.slow
def test_train_py_refuses_a_used_run_dir_before_writing_anything_there(shared_run, crop_csv, tmp_path):
    """Hydra writes .hydra/*.yaml and train.log into hydra.run.dir before the task runs: the refusal comes
    from its on_run_start callback, and every byte of the old run stays as it was."""
    old = shared_run().copy(tmp_path / "old")
    (old / ".hydra").mkdir()
    (old / ".hydra" / "config.yaml").write_text("the old run's config\n")

    def snapshot() -> dict:
        return {str(p.relative_to(old)): p.read_bytes() if p.is_file() else None for p in sorted(old.rglob("*"))}

    before = snapshot()
    result = run_python(TRAIN_PY, f"dataset.csv={crop_csv}", f"hydra.run.dir={old}", "trainer.device=cpu", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: {old} already holds another run: a run never writes into another's folder; pick a new "
        f"hydra.run.dir, or continue it with resume={old / 'checkpoints' / 'last.pt'}"]
    assert snapshot() == before


def test_resume_appends_to_the_log_and_events(make_cfg, shared_run, tmp_path):
    run_dir = shared_run().copy(tmp_path / "run")
    log_before = (run_dir / "train.log").read_text()
    events_before = {p.name: p.read_bytes() for p in run_dir.glob("events.out.tfevents.*")}
    training.run(make_cfg(f"resume={run_dir / 'checkpoints' / 'last.pt'}", "trainer.epochs=2",
                          run_dir=tmp_path / "elsewhere"))
    assert (run_dir / "train.log").read_text().startswith(log_before)
    for name, content in events_before.items():
        assert (run_dir / name).read_bytes()[: len(content)] == content
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == len(events_before) + 1


def test_missing_mandatory_keys_are_named_in_one_line(make_cfg, make_eval_cfg):
    with pytest.raises(UserError, match=r"dataset.root must be set: add dataset.root=\.\.\. to the command"):
        training.run(make_cfg("dataset=imagefolder"))
    from commands.evaluation import run_evaluation

    with pytest.raises(UserError, match="checkpoint must be set"):
        run_evaluation(make_eval_cfg())


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seed_outside_numpys_range_is_one_line(make_cfg, crop_csv, seed):
    with pytest.raises(UserError, match="trainer.seed must be between 0 and 2\\*\\*32 - 1"):
        training.run(make_cfg(f"dataset.csv={crop_csv}", f"trainer.seed={seed}"))


def test_resume_after_ctrl_c_in_an_epochs_last_step(make_cfg, shared_run, tmp_path):
    """Ctrl-C during the last step saves epoch e with all its batches done; resuming validates epoch e and
    goes on, instead of fetching from an epoch that has no batches left."""
    run_dir = shared_run("loader.batch_size=8").copy(tmp_path / "run")
    last = run_dir / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state.update(epoch=0, batches_done=7)  # what the runner saves when stopped after step 7 of 7
    torch.save(state, last)
    metrics = training.run(make_cfg(f"resume={last}", "trainer.epochs=2"))
    assert torch.load(last, weights_only=True)["step"] == 14
    assert metrics["val/acc"] >= 0.9


def test_every_epoch_is_timed_even_when_shorter_than_warm_up(make_cfg, crop_csv):
    # 52 training crops in one batch of 64: one step per epoch, fewer than the default 5 warm-up steps.
    metrics = training.run(make_cfg(f"dataset.csv={crop_csv}", "loader.batch_size=64", "trainer.warmup_steps=5",
                                    "trainer.epochs=2"))
    assert metrics["train/throughput"] > 0 and 0 <= metrics["train/data_wait"] <= 1
