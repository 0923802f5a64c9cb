"""model=resnet18 and model=fastnet through a whole run: train, resume, evaluate, and the start-up checks."""

from pathlib import Path

import pytest
import torch

import training
from errors import UserError
from models.resnet import ResNet18
from commands.evaluation import run_evaluation


def test_resnet18_trains_resumes_and_evaluates_on_tiny_data(make_cfg, make_eval_cfg, crop_csv, tmp_path):
    """On 20 of the crop scenes' 64 boxes (16 train, 4 validate): ResNet-18 costs ~0.3 GFLOP a box here."""
    run_dir = tmp_path / "run"
    lines = crop_csv.read_text().splitlines(keepends=True)
    few = crop_csv.with_name("few.csv")
    few.write_text("".join(lines[:21]))  # the header and 20 rows
    tiny = [f"dataset.csv={few}", "dataset.width=16", "dataset.height=16", "loader.batch_size=16",
            "model=resnet18"]
    training.run(make_cfg(*tiny, run_dir=run_dir))
    last = run_dir / "checkpoints" / "last.pt"
    metrics = training.run(make_cfg(f"resume={last}", "trainer.epochs=2"))
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["model"]["_target_"] == "models.resnet.ResNet18"
    ResNet18(3, 16, 16, 2).load_state_dict(checkpoint["model"])  # strict: BatchNorm buffers included
    log = (run_dir / "train.log").read_text()
    assert "model: ResNet18, 11.2M parameters, 278 MFLOPs per sample" in log
    scored = run_evaluation(make_eval_cfg(f"checkpoint={last}"))
    assert scored["acc"] == pytest.approx(metrics["val/acc"])
    assert scored["loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)


@pytest.mark.parametrize("model", ["resnet18", "fastnet"])
def test_too_small_for_the_model_is_one_line_before_any_data_is_read(make_cfg, tmp_path, model):
    missing = tmp_path / "nowhere" / "crops.csv"  # reading the data would fail differently
    with pytest.raises(UserError, match=f"^input 12x16 .width x height. is too small for {model}: .* at least 16$"):
        training.run(make_cfg(f"dataset.csv={missing}", f"model={model}", "dataset.width=12", "dataset.height=16"))


def test_fastnet_fits_the_crops(make_cfg, crop_csv, tmp_path):
    """Training loss only: 8 steps are too few for BatchNorm's running statistics, which validation uses."""
    metrics = training.run(make_cfg(f"dataset.csv={crop_csv}", "dataset.width=16", "dataset.height=16",
                                    "loader.batch_size=16", "model=fastnet", "trainer.epochs=2"))
    assert metrics["train/loss"] < 0.1  # from ln 2 = 0.69 for two classes
    log = (Path(tmp_path / "run") / "train.log").read_text()
    assert "model: FastNet, 0.832M parameters, 38.5 MFLOPs per sample" in log
