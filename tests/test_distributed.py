"""DDP: shards of each epoch's order, and a real 2-process gloo run through torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from training.distributed import shard, shard_size
from training.evaluation import run_evaluation

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("n", [10, 11, 13])
def test_validation_shards_cover_every_item_once_and_training_shards_are_even(n):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    val = [shard(order, rank, 3, pad=False) for rank in range(3)]
    assert sorted(torch.cat(val).tolist()) == list(range(n))
    assert [len(v) for v in val] == [shard_size(n, rank, 3, pad=False) for rank in range(3)]
    train = [shard(order, rank, 3, pad=True) for rank in range(3)]
    assert len({len(t) for t in train}) == 1 == len({shard_size(n, rank, 3, pad=True) for rank in range(3)})
    assert set(torch.cat(train).tolist()) == set(range(n))


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=150)


def test_two_processes_on_cpu_share_one_run_dir_and_resume(crop_csv, tmp_path, make_eval_cfg):
    common = [f"dataset.csv={crop_csv}", "loader.batch_size=4", "trainer.progress=false", "trainer.device=cpu"]
    # checkpoint_every=3: rank 0 alone saves last.pt after steps 3 and 6 of each 7-step epoch, and no rank waits.
    first = torchrun(*common, "trainer.epochs=2", "trainer.checkpoint_every=3", "hydra.run.dir=run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != "crops"] == ["run"]  # one run dir
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

    resumed = torchrun(f"resume={tmp_path / 'run' / 'checkpoints' / 'last.pt'}", "trainer.epochs=3",
                       "trainer.progress=false", "hydra.run.dir=again", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 21
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/acc")] == [7, 14, 21]
