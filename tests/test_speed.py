"""Speed settings: auto keeps them off on CPU; bf16/fp16 autocast paths train; CUDA runs when present."""

import pytest
import torch

import training
from errors import UserError
from training import speed


def test_auto_is_plain_fp32_on_cpu():
    resolved = speed.resolve("auto", "auto", False, False, torch.device("cpu"))
    assert resolved == speed.Speed(precision="fp32", channels_last=False, compile=False, cudnn_benchmark=False,
                                   deterministic=False)


def test_unknown_precision_is_one_line():
    with pytest.raises(UserError, match="trainer.precision must be auto, fp32, bf16 or fp16"):
        speed.resolve("fp8", "auto", False, False, torch.device("cpu"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_checkpoints_its_scaler(make_cfg, crop_csv, tmp_path, precision):
    cfg = make_cfg(f"dataset.csv={crop_csv}", f"trainer.precision={precision}", "trainer.channels_last=true",
                   "loader.batch_size=8", "trainer.epochs=2")
    metrics = training.run(cfg)
    assert metrics["val/acc"] >= 0.9 and metrics["train/loss"] < 0.7
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert (saved["scaler"] is not None) == (precision == "fp16")  # GradScaler only for fp16
    resumed = training.run(make_cfg(f"resume={tmp_path / 'run' / 'checkpoints' / 'last.pt'}", "trainer.epochs=3"))
    assert resumed["val/acc"] >= 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_uses_the_gpu_settings(make_cfg, crop_csv, tmp_path):
    metrics = training.run(make_cfg(f"dataset.csv={crop_csv}", "trainer.device=cuda", "loader.batch_size=8",
                                    "trainer.epochs=2"))
    assert metrics["val/acc"] >= 0.9
    log = (tmp_path / "run" / "train.log").read_text()
    assert "channels_last=True" in log and "cudnn_benchmark=True" in log
