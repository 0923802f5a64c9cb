"""Speed settings: auto keeps them off on CPU; bf16/fp16 autocast paths train; CUDA runs when present."""

import pytest
import torch

import training
from errors import UserError
from training import speed


def test_auto_is_plain_fp32_on_cpu():
    resolved = speed.resolve(speed.SpeedSettings("auto", "auto", False, False), torch.device("cpu"))
    assert (resolved.precision, resolved.channels_last, resolved.compile, resolved.cudnn_benchmark,
            resolved.deterministic, resolved.cuda_graphs) == ("fp32", False, False, False, False, False)


@pytest.mark.parametrize("capability, precision", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"),
                                                   ((7, 0), "fp16"), ((6, 1), "fp32")])
def test_auto_precision_follows_the_training_gpus_compute_capability(capability, precision):
    """bf16 only with bf16 tensor cores (8.0+): torch.cuda.is_bf16_supported() says yes to emulated bf16 too."""
    resolved = speed.resolve(speed.SpeedSettings("auto", "auto", False, False), torch.device("cuda", 1),
                             capability=capability)
    assert resolved.precision == precision
    assert f"{capability[0]}.{capability[1]}" in resolved.precision_reason  # the run's log says why
    assert resolved.channels_last and resolved.cudnn_benchmark


@pytest.mark.parametrize("overrides, message", [
    ({"device": torch.device("cpu")}, "needs trainer.device=cuda"),
    ({"precision": "fp16"}, "fp16's GradScaler syncs with the host"),
    ({"compile": True}, "choose one"),
    ({"distributed": True}, "not under torchrun"),
    ({"per_step_scheduler": True}, "would re-capture every step"),
])
def test_cuda_graphs_refuse_what_a_captured_step_cannot_do_and_auto_turns_them_off_there(overrides, message):
    args = {"precision": "bf16", "compile": False, "device": torch.device("cuda"), "distributed": False,
            "per_step_scheduler": False, **overrides}
    settings = {"capability": (8, 0), "distributed": args["distributed"], "per_step_scheduler": args["per_step_scheduler"]}
    with pytest.raises(UserError, match=f"trainer.cuda_graphs=true cannot be used: .*{message}"):
        speed.resolve(speed.SpeedSettings(args["precision"], "auto", args["compile"], False, cuda_graphs=True),
                      args["device"], **settings)
    resolved = speed.resolve(speed.SpeedSettings(args["precision"], "auto", args["compile"], False), args["device"],
                             **settings)
    assert not resolved.cuda_graphs and resolved.cuda_graphs_reason.startswith("auto: off")
    assert message in resolved.cuda_graphs_reason  # the run's log says why auto left them off


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp32"])
def test_auto_captures_cuda_graphs_wherever_a_step_can_be_captured(precision):
    """Measured faster on a GPU (docs/performance.md): auto turns them on for CUDA unless something above rules them out."""
    resolved = speed.resolve(speed.SpeedSettings(precision, "auto", False, False), torch.device("cuda"),
                             capability=(9, 0))
    assert resolved.cuda_graphs and resolved.cuda_graphs_reason.startswith("auto: on")
    assert not speed.resolve(speed.SpeedSettings(precision, "auto", False, False, cuda_graphs=False),
                             torch.device("cuda"), capability=(9, 0)).cuda_graphs


def test_cuda_graphs_on_cpu_fail_before_any_data_is_read(make_cfg, tmp_path):
    with pytest.raises(UserError, match="trainer.cuda_graphs=true cannot be used: it needs trainer.device=cuda"):
        training.run(make_cfg(f"dataset.csv={tmp_path / 'absent.csv'}", "trainer.cuda_graphs=true"))


def test_unknown_precision_is_one_line():
    with pytest.raises(UserError, match="trainer.precision must be auto, fp32, bf16 or fp16"):
        speed.resolve(speed.SpeedSettings("fp8", "auto", False, False), torch.device("cpu"))


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


@pytest.mark.cuda
def test_cuda_run_uses_the_gpu_settings(make_cfg, crop_csv, tmp_path):
    metrics = training.run(make_cfg(f"dataset.csv={crop_csv}", "trainer.device=cuda", "loader.batch_size=8",
                                    "trainer.epochs=2"))
    assert metrics["val/acc"] >= 0.9
    log = (tmp_path / "run" / "train.log").read_text()
    assert "channels_last=True" in log and "cudnn_benchmark=True" in log
