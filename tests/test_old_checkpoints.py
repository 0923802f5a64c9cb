"""Checkpoints written by an earlier version of the trainer (tests/data/checkpoints-v1, made by its write.py)
still evaluate to the numbers they scored then, and still resume: one per dataset family and the shapes that
matter (RGB and grey images, .npy arrays through a value range, a disk cache, mean/std=auto, CIFAR10)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from torchvision import datasets as tv

import training
from tests import files
from commands.evaluation import run_evaluation
from training import saved_config

STORED = Path(__file__).resolve().parent / "data" / "checkpoints-v1"
EXPECTED = json.loads((STORED / "expected.json").read_text())


@pytest.fixture
def stored(tmp_path, monkeypatch):
    """A copy of the stored checkpoints and their data, as the current folder (their configs name the data
    by relative paths)."""
    copy = tmp_path / "stored"
    shutil.copytree(STORED, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    monkeypatch.chdir(copy)
    folder = copy / "cifar10" / "cifar-10-batches-py"  # torchvision checks the published MD5s; these are tiny
    monkeypatch.setattr(tv.CIFAR10, "train_list", [[f"data_batch_{i}", files.md5(folder / f"data_batch_{i}")]
                                                   for i in range(1, 6)])
    monkeypatch.setattr(tv.CIFAR10, "test_list", [["test_batch", files.md5(folder / "test_batch")]])
    monkeypatch.setattr(tv.CIFAR10, "meta", {**tv.CIFAR10.meta, "md5": files.md5(folder / "batches.meta")})
    return copy


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_an_old_checkpoint_evaluates_as_it_did(stored, make_eval_cfg, case):
    result = run_evaluation(make_eval_cfg(f"checkpoint={stored / (case + '.pt')}"))
    expected = EXPECTED[case]["eval"]
    assert result["confusion"] == expected["confusion"]
    assert result["acc"] == expected["acc"]
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-6)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_an_old_checkpoint_resumes_as_it_did(stored, make_cfg, case):
    metrics = training.run(make_cfg("optim.momentum=0", "loader.batch_size=8", f"resume={stored / (case + '.pt')}",
                                    "trainer.epochs=2"))
    expected = EXPECTED[case]["resumed"]
    assert metrics["val/acc"] == expected["val/acc"]
    assert metrics["val/loss"] == pytest.approx(expected["val/loss"], rel=1e-6)
    assert torch.load(stored.parent / "run" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_an_old_checkpoint_keeps_its_row_split(case):
    """Saved before dataset.split_by existed, its rows were drawn at random: rebuilt as split_by=row, not the
    default auto, so its validation items stay the ones it was scored on."""
    checkpoint = torch.load(STORED / (case + ".pt"), weights_only=True)
    assert "split" not in checkpoint
    rebuilt = saved_config.rebuild(checkpoint["config"], checkpoint.get("choices"), case)
    assert rebuilt.dataset.get("split_by", "row") == "row"  # CIFAR10 takes no split keys: its own split
