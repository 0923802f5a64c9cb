"""DDP: shards of each epoch's order, and whole 2-process gloo runs (torchrun itself: test_preemption.py)."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.util import tensor_util
from torch.utils.tensorboard.summary import compute_curve

import training
from errors import UserError
from tests.conftest import compose_train
from tests.helpers import events, in_child, scalars, torchrun_ranks
from tests.scoring import score_checkpoint
from training.board import mistakes_image
from training.distributed import process_device, shard, shard_size
from training.launch import Process, from_environment
from commands.evaluation import run_evaluation
from training.metrics import MISTAKES, PR_THRESHOLDS



@pytest.mark.parametrize("n", [10, 11, 13])
def test_validation_shards_cover_every_item_once_and_training_shards_are_even(n):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    val = [shard(order, rank, 3, pad=False) for rank in range(3)]
    assert sorted(torch.cat(val).tolist()) == list(range(n))
    assert [len(v) for v in val] == [shard_size(n, rank, 3, pad=False) for rank in range(3)]
    train = [shard(order, rank, 3, pad=True) for rank in range(3)]
    assert len({len(t) for t in train}) == 1 == len({shard_size(n, rank, 3, pad=True) for rank in range(3)})
    assert set(torch.cat(train).tolist()) == set(range(n))


@pytest.mark.slow  # a whole two-process DDP run and its resume (forked, not started as programs)
def test_two_processes_on_cpu_share_one_run_dir_and_resume(crop_csv, tmp_path, make_eval_cfg):
    """The DDP run train.py makes under torchrun (gloo on the CPU), its two ranks forked from this process with
    torchrun's variables (helpers.torchrun_ranks: ~9 CPU-s less than torchrun and two interpreters, twice). What
    torchrun and train.py themselves add (Hydra's run folder, signals, a launcher that dies, resume=auto through
    torchrun) is test_preemption's, whose torchrun tests start them."""
    common = [f"dataset.csv={crop_csv}", "dataset.split_by=row", "loader.batch_size=4", "trainer.progress=false",
              "trainer.device=cpu"]
    # checkpoint_every=3: rank 0 alone saves last.pt after steps 3 and 6 of each 7-step epoch, and no rank waits.
    cfg = compose_train(tmp_path / "run", *common, "trainer.epochs=2", "trainer.checkpoint_every=3")
    in_child(lambda: training.run(cfg), torchrun_ranks(2))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["val/acc"] >= 0.9  # the brightness task: one process reaches 1.0 here too
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    # 52 training crops: 26 per rank, 7 batches of 4 per rank and epoch.
    assert (checkpoint["epoch"], checkpoint["step"]) == (2, 14)
    assert not any(k.startswith("module.") for k in checkpoint["model"])  # saved unwrapped
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    # Each rank scored half the validation set; summed, they equal one process scoring all of it.
    single = run_evaluation(make_eval_cfg(f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}"))
    assert single["acc"] == metrics["val/acc"]
    assert single["loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)
    assert single["f1_macro"] == metrics["val/f1_macro"]
    # PR curves and the highest-loss items merge the ranks' shards into what one process sees of every item.
    truth = score_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    logged = events(tmp_path / "run")
    for c, name in enumerate(["bright", "dark"]):
        curve = logged.Tensors(f"val/pr/{name}")[-1]
        expected = compute_curve((truth.labels == c).numpy(), truth.probabilities[:, c].numpy(), PR_THRESHOLDS)
        assert curve.step == 14 and np.allclose(tensor_util.make_ndarray(curve.tensor_proto), expected, rtol=1e-6)
    shown = logged.Images("val/mistakes")[-1]
    top = torch.argsort(truth.losses, descending=True)[:MISTAKES]
    expected = mistakes_image(truth.images[top], truth.labels[top].tolist(),
                              truth.probabilities[top].argmax(1).tolist(), ["bright", "dark"])
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(shown.encoded_image_string)).convert("RGB")), expected)

    # What `torchrun ... train.py resume=last.pt trainer.epochs=3 trainer.device=cpu` composes (trainer.device
    # comes from the resuming command: without it, auto would pick cuda:1 on a 1-GPU machine).
    resume_cfg = compose_train(tmp_path / "again", f"resume={tmp_path / 'run' / 'checkpoints' / 'last.pt'}",
                               "trainer.epochs=3", "trainer.progress=false", "trainer.device=cpu")
    in_child(lambda: training.run(resume_cfg), torchrun_ranks(2))
    assert not (tmp_path / "again").exists()  # the run goes on in the checkpoint's folder
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 21
    assert [step for step, _ in scalars(tmp_path / "run")["val/acc"]] == [7, 14, 21]


def test_more_local_processes_than_gpus_is_one_line_naming_the_fix(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    second = Process(rank=1, world_size=2, local_rank=1)
    with pytest.raises(UserError, match=r"torchrun started 2 processes .* only 1 GPU\(s\) .* --nproc_per_node=1"):
        process_device(second, torch.device("cuda"), gpus=1)
    assert process_device(second, torch.device("cuda"), gpus=2) == torch.device("cuda", 1)
    assert process_device(second, torch.device("cpu"), gpus=0) == torch.device("cpu")


def test_process_group_timeout_must_be_positive(make_cfg, crop_csv):
    with pytest.raises(UserError, match="trainer.dist_timeout_minutes must be a positive number of minutes"):
        training.run(make_cfg(f"dataset.csv={crop_csv}", "trainer.dist_timeout_minutes=0"))


def test_a_one_process_torchrun_launch_joins_a_process_group(monkeypatch):
    """So a one-GPU machine runs the NCCL and DDP path that larger launches take."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    assert from_environment().distributed
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name)
    assert not from_environment().distributed


@pytest.mark.slow  # a whole two-process DDP run (forked, not started as programs)
def test_two_processes_train_fastnet_with_augmentation_and_a_per_step_schedule(make_cfg, crop_csv, tmp_path,
                                                                              make_eval_cfg):
    """BatchNorm buffers, per-rank augmentation draws and a per-step schedule under DDP (gloo, CPU): the DDP run
    train.py makes under torchrun, its two ranks forked from this process with torchrun's variables
    (helpers.torchrun_ranks) rather than started as programs (~11 s of CPU for torchrun and two interpreters);
    what torchrun and train.py themselves add is the test above's."""
    cfg = make_cfg(f"dataset.csv={crop_csv}", "dataset.width=16", "dataset.height=16", "loader.batch_size=4",
                   "model=fastnet", "augment=standard", "scheduler=warmup_cosine")
    in_child(lambda: training.run(cfg), torchrun_ranks(2))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["scheduler"]["last_epoch"] == checkpoint["step"] == 7  # stepped once per optimizer step
    assert any(k.endswith("running_mean") for k in checkpoint["model"])
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    scored = run_evaluation(make_eval_cfg(f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}"))
    # Every rank scored its shard with the saved model's BatchNorm statistics (rank 0's), not its own.
    assert scored["acc"] == metrics["val/acc"]
    assert scored["loss"] == pytest.approx(metrics["val/loss"], rel=1e-6)
