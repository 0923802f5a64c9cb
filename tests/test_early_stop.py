"""trainer.early_stop: a run ends once its metric stops improving, says so in its summary, metrics.json and
train.log, and a resumed run stops at the epoch an unbroken one does."""

import pytest
import torch

import training
from errors import UserError
from tests.helpers import assert_same_state, events, resume_against_unbroken
from training.early_stop import EarlyStop
from training.logger import SUMMARY_TAG
from training.schema import check_ranges

# min_delta 1.0 of val/acc: after the first epoch nothing can improve, so patience 2 stops after epoch 3 of 5.
STOPPING = ("loader.batch_size=8", "scheduler=step", "scheduler.step_size=1", "scheduler.gamma=0.5",
            "trainer.early_stop.patience=2", "trainer.early_stop.min_delta=1.0")


@pytest.mark.parametrize(("metric", "mode", "values", "stops_after"), [
    ("val/acc", "auto", [0.5, 0.6, 0.6, 0.6], 4),        # higher is better: two epochs without a rise
    ("val/loss", "auto", [1.0, 0.9, 0.95, 0.8, 0.85, 0.9], 6),  # lower is better: the count restarts at 0.8
    ("val/acc", "min", [0.5, 0.6, 0.7], 3),              # mode says which way, whatever the metric
    ("val/f1_macro", "auto", [None, None], 2),           # no value never improves
])
def test_the_rule_counts_epochs_without_improvement(metric, mode, values, stops_after):
    stopper = EarlyStop(metric=metric, patience=2, mode=mode)
    stopped = [stopper.update(epoch, {metric: value}) for epoch, value in enumerate(values, start=1)]
    assert stopped.index(True) + 1 == stops_after and stopper.stopped_epoch == stops_after


def test_min_delta_is_the_improvement_that_counts():
    stopper = EarlyStop(metric="val/acc", patience=1, min_delta=0.05)
    assert not stopper.update(1, {"val/acc": 0.5})
    assert stopper.update(2, {"val/acc": 0.55})  # 0.05 more is not more than 0.05
    assert (stopper.best, stopper.best_epoch) == (0.5, 1)


def test_a_run_stops_early_and_says_so(shared_run):
    run = shared_run(*STOPPING, "trainer.epochs=5")
    last = run.checkpoint("last")
    assert last["epoch"] == 3 and last["early_stop"]["stopped_epoch"] == 3 and last["early_stop"]["bad_epochs"] == 2
    assert run.metrics["early_stop/stopped_epoch"] == 3 and run.metrics["early_stop/best_epoch"] == 1
    assert run.metrics["early_stop/best"] == last["early_stop"]["best"]
    assert "early stop after epoch 3/5: val/acc did not improve by more than 1 for 2 epoch(s)" in \
        (run.dir / "train.log").read_text()
    (summary,) = events(run.dir).Tensors(f"{SUMMARY_TAG}/text_summary")
    text = summary.tensor_proto.string_val[0].decode()
    assert "stopped early after epoch 3 of 5: val/acc did not improve" in text


def test_a_resumed_run_stops_where_an_unbroken_one_does(shared_run, make_cfg, shared_crop_csv, tmp_path):
    assert shared_run(*STOPPING, "trainer.epochs=2").checkpoint("last")["early_stop"]["bad_epochs"] == 1
    resumed, unbroken, metrics = resume_against_unbroken(shared_run, make_cfg, shared_crop_csv, tmp_path / "run",
                                                         STOPPING, stop_after=2, epochs=5)
    assert metrics["early_stop/stopped_epoch"] == 3  # a fresh count would have gone on to epoch 5
    assert resumed["early_stop"] == unbroken["early_stop"]
    assert_same_state(resumed, unbroken)


def test_resuming_a_run_that_stopped_early_is_one_line(shared_run, make_cfg, shared_crop_csv, tmp_path):
    folder = shared_run(*STOPPING, "trainer.epochs=5").copy(tmp_path / "run") / "checkpoints"
    with pytest.raises(UserError, match=r"last.pt stopped early after epoch 3 \(trainer.early_stop\): its run is "
                                        r"finished; start a new run to train further$"):
        training.run(make_cfg(f"dataset.csv={shared_crop_csv}", "trainer.epochs=9", f"resume={folder / 'last.pt'}",
                              run_dir=tmp_path / "run"))


def test_a_damaged_early_stop_state_is_one_line(shared_run, make_cfg, shared_crop_csv, tmp_path):
    checkpoint = shared_run(*STOPPING, "trainer.epochs=2").checkpoint("last")
    checkpoint["early_stop"]["bad_epochs"] = -1
    torch.save(checkpoint, tmp_path / "edited.pt")
    with pytest.raises(UserError, match=r"edited.pt: its early_stop state is not what this trainer saves"):
        training.run(make_cfg(f"dataset.csv={shared_crop_csv}", "trainer.epochs=5", f"resume={tmp_path / 'edited.pt'}",
                              run_dir=tmp_path / "run"))


@pytest.mark.parametrize(("override", "said"), [
    ("trainer.early_stop.patience=0", "trainer.early_stop.patience must be at least 1, got 0"),
    ("trainer.early_stop.metric=val/acc_best",
     "trainer.early_stop.metric must be one of val/acc, val/loss, val/f1_macro, got 'val/acc_best'"),
    ("trainer.early_stop.mode=up", "trainer.early_stop.mode must be one of auto, max, min, got 'up'"),
    ("trainer.early_stop.min_delta=-0.1", "trainer.early_stop.min_delta must be at least 0, got -0.1"),
])
def test_a_bad_early_stop_value_is_one_line(make_cfg, override, said):
    with pytest.raises(UserError) as error:
        check_ranges(make_cfg(override))
    assert str(error.value) == said
