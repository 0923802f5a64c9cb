"""One epoch's plan and the loaders' two counts: a resumed epoch skips batches, but the epoch stays as long."""

import pytest
import torch

from datasets.base import ArrayStore, InMemoryDataset
from training.build import build_optimizer
from training.loaders import build_loader
from training.position import EpochPlan, Position, warmup_end

SETTINGS = dict(device=torch.device("cpu"), batch_size=8, shuffle=True, pin_memory=False, persistent_workers=False,
                prefetch_factor=2, num_workers=0)


@pytest.fixture(scope="module")
def dataset():
    images = torch.randint(0, 256, (50, 1, 2, 2), dtype=torch.uint8)
    return InMemoryDataset(ArrayStore(images, torch.arange(50) % 3))


@pytest.mark.parametrize("mode", ["device", "dataloader"])
def test_a_skip_leaves_the_epoch_as_long_and_counts_the_batches_left(dataset, mode):
    loader = build_loader(dataset, seed=0, train=True, mode=mode, **SETTINGS)
    loader.set_epoch(1, 3)
    assert loader.batches_per_epoch == 7  # 50 items in batches of 8
    assert loader.batches_left == len(loader) == len(list(loader)) == 4
    loader.set_epoch(1, 7)  # stopped during the epoch's last step
    assert (loader.batches_per_epoch, loader.batches_left, list(loader)) == (7, 0, [])


@pytest.mark.parametrize("mode", ["device", "dataloader"])
def test_a_per_step_schedule_spans_whole_epochs_whenever_the_loader_was_positioned(dataset, mode, make_cfg):
    cfg = make_cfg("scheduler=warmup_cosine", "trainer.epochs=2")
    loader = build_loader(dataset, seed=0, train=True, mode=mode, **SETTINGS)
    model = torch.nn.Linear(1, 1)
    before = build_optimizer(cfg.optim, cfg.scheduler, model, steps_per_epoch=loader.batches_per_epoch)[1]
    loader.set_epoch(0, 5)  # a resumed epoch positioned first
    after = build_optimizer(cfg.optim, cfg.scheduler, model, steps_per_epoch=loader.batches_per_epoch)[1]
    assert before.total_steps == after.total_steps == 2 * 7


def test_a_plan_carries_a_resumed_position_through_its_epoch_and_on():
    plan = EpochPlan.at(Position(epoch=2, batches_done=3, step=17), batches_per_epoch=7, warmup_until=19, log_every=4)
    assert (plan.epoch, plan.first_batch, plan.start_step, plan.batches_left) == (2, 3, 17, 4)
    assert plan.position_after(2) == Position(2, 5, 19)  # a mid-epoch save after two more steps
    done = plan.position_after(plan.batches_left)
    assert done == Position(2, 7, 21) and done.next_epoch() == Position(3, 0, 21)
    assert EpochPlan.at(done.next_epoch(), 7, 19, 4).batches_left == 7


def test_warm_up_counts_from_where_the_run_starts_and_never_takes_a_whole_epoch():
    assert warmup_end(Position(step=40), warmup_steps=5, batches_per_epoch=26) == 45  # a resumed run warms up again
    assert warmup_end(Position(), warmup_steps=5, batches_per_epoch=3) == 2
    assert warmup_end(Position(), warmup_steps=5, batches_per_epoch=1) == 0
