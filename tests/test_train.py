"""Whole runs: through Hydra's compose API (in process) and through `python train.py` (a subprocess)."""

import json
import statistics
from pathlib import Path

import pytest

import training
from errors import UserError
from tests.helpers import TRAIN_PY, run_python, scalars

SCALARS = {"train/loss", "train/throughput", "train/data_wait", "val/loss", "val/acc"}


def train_py(*args: str, cwd: Path):
    return run_python(TRAIN_PY, *args, cwd=cwd)


def test_run_writes_outputs_and_tensorboard_scalars(shared_run):
    run = shared_run("loader.batch_size=8", "trainer.epochs=2")
    metrics, run_dir = run.metrics, run.dir
    for name in ("config.yaml", "classes.json", "metrics.json", "train.log"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "classes.json").read_text()) == ["bright", "dark"]
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert SCALARS | {"val/acc_best", "data/prep_seconds", "world_size"} <= set(metrics)
    logged = scalars(run_dir)
    assert SCALARS <= set(logged)
    # 64 crops, 20% of each class held out: 52 train = 7 batches of 8 per epoch; validation at each epoch's end.
    assert [step for step, _ in logged["val/acc"]] == [7, 14]
    assert logged["val/acc"][-1][1] == pytest.approx(metrics["val/acc"])
    assert all(0.0 <= value <= 1.0 for _, value in logged["train/data_wait"])
    assert all(value > 0 for _, value in logged["train/throughput"])


@pytest.mark.slow  # ten epochs of the whole demo: a run as `python train.py` does it
def test_default_demo_run_learns(make_cfg, tmp_path):
    """The bundled demo with every default as a user gets it: >= 90% validation accuracy."""
    with_defaults = make_cfg("trainer.epochs=10", "trainer.log_every=20", "trainer.warmup_steps=5",
                             "dataset.split_by=auto")  # make_cfg's tiny runs split by row
    metrics = training.run(with_defaults)
    assert metrics["val/acc"] >= 0.9


def test_same_seed_same_result(make_cfg, shared_run, shared_crop_csv, tmp_path):
    first = shared_run().metrics  # trained earlier in the session, maybe by another test
    second = training.run(make_cfg(f"dataset.csv={shared_crop_csv}", run_dir=tmp_path / "b"))
    assert first["val/loss"] == second["val/loss"]
    assert first["train/loss"] == second["train/loss"]


def test_cuda_without_cuda_fails_at_start(make_cfg, crop_csv):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="CUDA is not available"):
        training.run(make_cfg(f"dataset.csv={crop_csv}", "trainer.device=cuda"))


@pytest.mark.slow
def test_train_py_crop_size_override(train_py_run):
    assert train_py_run.returncode == 0, train_py_run.stdout
    run_dir = train_py_run.run_dir  # the one run folder under outputs/
    assert run_dir is not None
    config = (run_dir / "config.yaml").read_text()
    assert "width: 48" in config and "height: 24" in config
    assert SCALARS <= set(scalars(run_dir))


@pytest.mark.slow
def test_train_py_user_error_is_one_line(crop_csv, tmp_path):
    result = train_py(f"dataset.csv={crop_csv}", "dataset.width=8", "trainer.progress=false", cwd=tmp_path)
    assert result.returncode == 1
    output = result.stderr + result.stdout
    assert "Traceback" not in output and "Error in call to target" not in output
    (error,) = [line for line in output.splitlines() if "[ERROR]" in line]
    assert "dataset.width and dataset.height must each be at least 16" in error
    assert "decoding crops" not in output  # refused before any data was decoded


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, expected",
    [
        ("dataset=nope", "Available options"),  # Hydra lists the dataset choices
        ("dataset.widht=40", "widht"),  # typo'd key fails at composition
    ],
)
def test_train_py_bad_config_fails_at_composition(override, expected, tmp_path):
    result = train_py(override, cwd=tmp_path)
    assert result.returncode == 1
    assert expected in result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_train_py_help_lists_groups_and_cfg_prints_config(tmp_path):
    help_text = train_py("--help", cwd=tmp_path).stdout
    for group in ("dataset", "model", "loader", "optim", "trainer", "experiment"):
        assert f"{group}:" in help_text
    assert "crops, datasetfolder, imagefolder, cifar10" in help_text or "cifar10" in help_text
    job = train_py("--cfg", "job", "dataset.width=40", cwd=tmp_path).stdout
    assert "width: 40" in job and "_target_: datasets.crops.build" in job


@pytest.mark.slow
def test_sweep_survives_a_failing_job(crop_csv, tmp_path):
    """A job that fails leaves the others running; the sweep folder's summary lists it as failed, with its
    error, and gives mean and sd over the seeds of the setting that trained."""
    result = train_py("-m", f"dataset.csv={crop_csv}", "dataset.width=8,24", "trainer.seed=0,1", "loader.batch_size=4",
                      "trainer.epochs=1", "trainer.progress=false", "trainer.device=cpu", cwd=tmp_path)
    assert result.returncode == 1  # Hydra reports the failed job at the end
    assert "at least 16" in result.stderr
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    assert not (sweep / "0" / "metrics.json").exists()
    finished = [json.loads((sweep / job / "metrics.json").read_text()) for job in ("2", "3")]
    assert all(metrics["val/acc"] >= 0 for metrics in finished)
    assert SCALARS <= set(scalars(sweep / "2"))
    assert "job failed: UserError: input 8x32" in (sweep / "0" / "train.log").read_text()

    summary = json.loads((sweep / "summary.json").read_text())
    assert [(job["folder"], job["status"]) for job in summary["jobs"]] == [
        ("0", "failed"), ("1", "failed"), ("2", "finished"), ("3", "finished")]
    assert summary["jobs"][0]["error"].startswith("UserError: input 8x32 (width x height) is too small")
    assert [job.get("metrics") for job in summary["jobs"][2:]] == finished
    assert summary["varying"] == ["dataset.width", "trainer.seed"]
    trained = next(group for group in summary["groups"] if group["setting"] == {"dataset.width": "24"})
    accs = [metrics["val/acc_best"] for metrics in finished]
    assert trained["stats"]["val/acc_best"] == pytest.approx(
        {"n": 2, "mean": statistics.fmean(accs), "sd": statistics.stdev(accs), "min": min(accs), "max": max(accs)})
    table = (sweep / "summary.md").read_text()
    assert "4 jobs: 2 finished, 2 failed." in table and "| 0 | 8 | 0 | failed: UserError: input 8x32" in table
