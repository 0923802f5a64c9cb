"""Per-step schedules (warmup_cosine, onecycle), nesterov, weight decay and label smoothing through a run."""

import math
import shutil

import pytest
import torch

import training
from errors import UserError
from tests.helpers import scalars
from training.schedules import WarmupCosine

STEPS_PER_EPOCH = 7  # the crop fixture: 52 training crops in batches of 8


def lrs(scheduler, optimizer, steps: int) -> list[float]:
    """The learning rate each of `steps` optimizer steps uses."""
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_cosine_rises_linearly_then_falls_to_zero():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    scheduler = WarmupCosine(optimizer, epochs=4, steps_per_epoch=10, warmup=0.1)
    rates = lrs(scheduler, optimizer, 40)
    assert rates[:4] == pytest.approx([0.05, 0.1, 0.15, 0.2])  # 4 warm-up steps (10% of 40)
    assert rates[4] == pytest.approx(0.2)
    assert rates[4 + 18] == pytest.approx(0.1)  # half-way through the 36 cosine steps
    assert all(a > b for a, b in zip(rates[4:], rates[5:]))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # after the last step


@pytest.fixture
def run(make_cfg, crop_csv, tmp_path):
    def make(name: str, *overrides: str):
        return make_cfg(f"dataset.csv={crop_csv}", "loader.batch_size=8", "optim.lr=0.05", *overrides,
                        run_dir=tmp_path / name)

    return make


@pytest.mark.parametrize("scheduler", ["warmup_cosine", "onecycle"])
def test_per_step_schedules_step_every_optimizer_step_and_resume_exactly(run, tmp_path, scheduler):
    recipe = [f"scheduler={scheduler}", "optim.nesterov=true", "optim.weight_decay=5e-4",
              "trainer.label_smoothing=0.1", "augment=standard"]
    training.run(run("unbroken", *recipe, "trainer.epochs=2"))
    # The schedule spans the 2 epochs the run is started with; the first run stops after 1 of them.
    training.run(run("broken", *recipe, "trainer.epochs=2", "scheduler.epochs=2", "trainer.epochs=1"))
    resumed_from = tmp_path / "broken" / "checkpoints" / "last.pt"
    first = torch.load(resumed_from, weights_only=True)
    assert first["scheduler"]["last_epoch"] == STEPS_PER_EPOCH  # stepped per optimizer step, not per epoch
    shutil.copy(resumed_from, resumed_from.with_name("epoch1.pt"))
    training.run(run("broken", f"resume={resumed_from.with_name('epoch1.pt')}", "trainer.epochs=2"))

    unbroken = torch.load(tmp_path / "unbroken" / "checkpoints" / "last.pt", weights_only=True)
    resumed = torch.load(resumed_from, weights_only=True)
    for name, tensor in unbroken["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    assert resumed["scheduler"] == unbroken["scheduler"]
    lr = [value for _, value in scalars(tmp_path / "unbroken")["train/lr"]]
    assert lr == [value for _, value in scalars(tmp_path / "broken")["train/lr"]]
    if scheduler == "warmup_cosine":  # epoch 1 starts at the first warm-up step's rate: 1 of round(0.05 * 14)
        assert lr[0] == pytest.approx(0.05 / round(0.05 * 2 * STEPS_PER_EPOCH))
        assert lr[1] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * (7 - 1) / 13)))
    assert unbroken["optimizer"]["param_groups"][0]["nesterov"] is True
    assert unbroken["optimizer"]["param_groups"][0]["weight_decay"] == 5e-4


@pytest.mark.parametrize("scheduler", ["warmup_cosine", "onecycle"])
def test_resume_cannot_extend_a_per_step_schedule(run, tmp_path, scheduler):
    training.run(run("run", f"scheduler={scheduler}"))
    with pytest.raises(UserError, match="^scheduler.epochs=1 ends the learning-rate schedule before trainer.epochs=2 "
                                        ".resume=.* keeps the schedule its run started with.: set trainer.epochs <= 1"):
        training.run(run("run", f"resume={tmp_path / 'run/checkpoints/last.pt'}", "trainer.epochs=2"))


def test_label_smoothing_changes_the_training_loss_only(run):
    plain = training.run(run("plain"))
    smooth = training.run(run("smooth", "trainer.label_smoothing=0.2"))
    # Smoothed targets cannot be fitted to zero loss: what the model learnt differs, and so its training loss.
    assert smooth["train/loss"] > plain["train/loss"]


def test_experiment_fast_is_a_recipe_that_leaves_data_and_augmentation_alone(make_cfg):
    plain = make_cfg("dataset=imagefolder", "augment=dihedral")
    fast = make_cfg("experiment=fast", "dataset=imagefolder", "augment=dihedral")
    assert fast.dataset == plain.dataset and fast.augment == plain.augment and fast.model == plain.model
    assert fast.scheduler._target_ == "training.schedules.WarmupCosine" and fast.scheduler.interval == "step"
    assert (fast.loader.batch_size, fast.optim.lr, fast.optim.nesterov, fast.trainer.label_smoothing) == (
        256, 0.1, True, 0.1)
    assert make_cfg("experiment=fast").dataset == make_cfg().dataset
