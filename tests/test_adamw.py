"""optim=adamw: torch's AdamW with decoupled weight decay, none on biases and BatchNorm weights; its preset trains
fastnet and resnet18; bad values are one line; a resume is exact; a CUDA-graph step captures it (GPU only)."""

import pytest
import torch

import training
from errors import UserError
from tests.helpers import assert_same_state, resume_against_unbroken
from training.build import build_model, build_optimizer
from training.schema import check_ranges

# A step schedule, whose state a resume must restore (cosine's length is the epochs a run starts with).
ADAMW_RUN = ("optim=adamw", "loader.batch_size=8", "scheduler=step", "scheduler.step_size=1", "scheduler.gamma=0.5")
SMALL = ("dataset.width=16", "dataset.height=16")  # fastnet's and resnet18's smallest input: CPU-sized runs


def _optimizer(make_cfg, *overrides, model_name="fastnet"):
    cfg = make_cfg("optim=adamw", f"model={model_name}", *overrides)
    model = build_model(cfg.model, (3, 16, 16), 2, torch.device("cpu"))
    optimizer, _, _ = build_optimizer(cfg.optim, None, model, steps_per_epoch=4)
    return model, optimizer


def test_the_preset_is_torchs_adamw_and_decays_neither_norms_nor_biases(make_cfg):
    """With every gradient zero, Adam's own step is zero: what is left is the decoupled decay, lr x weight_decay
    of each decayed weight, and nothing on BatchNorm's scale and shift or any bias."""
    model, optimizer = _optimizer(make_cfg, "optim.lr=0.01", "optim.weight_decay=0.5")
    assert type(optimizer) is torch.optim.AdamW
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    norms = {name for name, module in model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)}
    assert norms
    for name, p in model.named_parameters():
        if p.ndim > 1:
            torch.testing.assert_close(p.detach(), before[name] * (1 - 0.01 * 0.5), msg=name)
        else:
            assert name.rsplit(".", 1)[0] in norms or name.endswith("bias"), name
            assert torch.equal(p.detach(), before[name]), name


def test_decay_norms_and_biases_true_decays_every_parameter(make_cfg):
    model, optimizer = _optimizer(make_cfg, "optim.lr=0.01", "optim.weight_decay=0.5",
                                  "optim.decay_norms_and_biases=true")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] * (1 - 0.01 * 0.5), msg=name)


@pytest.mark.parametrize(("override", "said"), [
    ("optim.betas=[0.9]", "optim.betas must be a list of 2 numbers, each at least 0 and below 1, got [0.9]"),
    ("optim.betas=[0.9,1.0]", "optim.betas must be a list of 2 numbers"),
    ("optim.betas=[0.9,nan]", "optim.betas must be a list of 2 numbers"),
    ("optim.eps=0", "optim.eps must be greater than 0, got 0"),
    ("optim.lr=-1", "optim.lr must be greater than 0 and at most 1e+30, got -1"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be at least 0, got -0.1"),
])
def test_a_bad_adamw_value_is_one_line_naming_the_key(make_cfg, override, said):
    with pytest.raises(UserError) as error:
        check_ranges(make_cfg("optim=adamw", override))
    assert str(error.value) == said or str(error.value).startswith(said)
    assert "\n" not in str(error.value)


@pytest.mark.slow  # GPU models: seconds of training each on the CPU
@pytest.mark.parametrize("model_name", ["fastnet", "resnet18"])
def test_the_preset_trains_fastnet_and_resnet18(shared_run, model_name):
    """Training loss only, as in test_model_runs: 14 steps are too few for BatchNorm's running statistics,
    which validation uses."""
    run = shared_run(*ADAMW_RUN, *SMALL, f"model={model_name}", "trainer.epochs=2")
    assert run.metrics["train/loss"] < 0.1  # from ln 2 = 0.69 for two classes


def test_an_adamw_resume_is_bitwise_equal_to_an_unbroken_run(shared_run, make_cfg, shared_crop_csv, tmp_path):
    resumed, unbroken, _ = resume_against_unbroken(shared_run, make_cfg, shared_crop_csv, tmp_path / "run", ADAMW_RUN,
                                                   stop_after=1, epochs=2)
    assert [g["weight_decay"] for g in resumed["optimizer"]["param_groups"]] == [0.05, 0.0]
    assert_same_state(resumed, unbroken)


@pytest.mark.cuda
def test_adamw_steps_replay_as_cuda_graphs_and_resume(make_cfg, crop_csv, tmp_path):
    common = (f"dataset.csv={crop_csv}", "trainer.device=cuda", "trainer.cuda_graphs=true", "optim=adamw",
              "loader.batch_size=8")
    metrics = training.run(make_cfg(*common, "trainer.epochs=2"))
    assert metrics["val/acc"] >= 0.9
    assert "cuda_graphs=True" in (tmp_path / "run" / "train.log").read_text()
    resumed = training.run(make_cfg(*common[:-2], f"resume={tmp_path / 'run' / 'checkpoints' / 'last.pt'}",
                                    "trainer.epochs=3"))
    assert resumed["val/acc"] >= 0.9
