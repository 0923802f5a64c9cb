"""What a run shows in TensorBoard beyond the contract's scalars, read back with TensorBoard's own reader."""

import io

import numpy as np
from omegaconf import OmegaConf
import pytest
import torch
from PIL import Image
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util
from torch.utils.tensorboard.summary import compute_curve

from datasets.base import labels_of
from tests import helpers
from tests.scoring import score_checkpoint
from training.board import TUNED, confusion_image, hparam_value, mistakes_image, tuned_hparams
from commands.evaluation import run_evaluation
from training.metrics import MISTAKES, PR_THRESHOLDS


def test_per_class_confusion_images_lr_and_hparams(shared_run, shared_crop_csv, make_eval_cfg):
    run = shared_run("loader.batch_size=8", "trainer.epochs=2", "scheduler=cosine")
    metrics, run_dir = run.metrics, run.dir
    events = helpers.events(run_dir)

    # One events folder: hparams must not open a timestamped subfolder (a second "run" in TensorBoard).
    assert {p.parent for p in run_dir.rglob("events.out.tfevents*")} == {run_dir}

    scalars = helpers.scalars(run_dir)
    for tag in ("val/acc_class/bright", "val/acc_class/dark", "val/acc_best", "train/epoch_seconds"):
        assert [step for step, _ in scalars[tag]] == [7, 14], tag  # 7 batches of 8 per epoch
        assert scalars[tag][-1][1] == pytest.approx(metrics[tag])
    # Cosine over 2 epochs from lr 0.01: the full rate in epoch 1, half of it in epoch 2.
    assert [value for _, value in scalars["train/lr"]] == pytest.approx([0.01, 0.005])

    (first,) = events.Images("train/first_batch")
    grid = Image.open(io.BytesIO(first.encoded_image_string))
    assert first.step == 0 and grid.size == (3 * 34 + 2, 3 * 34 + 2)  # 8 crops of 32x32, 3 per row, 2 px gaps

    confusions = events.Images("val/confusion")
    assert [image.step for image in confusions] == [7, 14]
    shown = np.asarray(Image.open(io.BytesIO(confusions[-1].encoded_image_string)).convert("RGB"))
    scored = run_evaluation(make_eval_cfg(f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}"))
    expected = confusion_image(torch.tensor(scored["confusion"]), ["bright", "dark"])
    assert np.array_equal(shown, expected)  # the picture of exactly the counts evaluate.py reports

    hparams = {tag: plugin_data_pb2.HParamsPluginData.FromString(content)
               for tag, content in events.PluginTagToContent("hparams").items()}
    session = hparams["_hparams_/session_start_info"].session_start_info.hparams
    # The keys users tune, no wiring (_target_, _partial_, cache_dir, allow_outside_root); groups by name.
    shown = {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind")) for key, value in session.items()}
    assert shown == {
        "optim.lr": pytest.approx(0.01), "loader.batch_size": 8, "trainer.epochs": 2, "model": "TutorialCNN",
        "optim": "SGD", "optim.momentum": pytest.approx(0.9), "optim.nesterov": False,
        "optim.weight_decay": 0.0, "optim.clip_grad_norm": "null", "trainer.label_smoothing": 0.0,
        "augment.pad": 0, "augment.hflip": False, "augment.vflip": False, "augment.transpose": False,
        "augment.cutout": 0,
        "scheduler": "CosineAnnealingLR", "dataset": "crops", "dataset.csv": str(shared_crop_csv),
        "dataset.root": "null", "dataset.width": 32, "dataset.height": 32, "dataset.channels": 3,
        "dataset.cache": "memory", "dataset.val_fraction": pytest.approx(0.2), "loader.mode": "auto", "loader.sampler": "uniform",
        "trainer.precision": "auto", "trainer.seed": 0,
    }
    experiment = hparams["_hparams_/experiment"].experiment
    assert [info.name for info in experiment.hparam_infos] == [key for key in TUNED if key in shown]
    assert {m.name.tag for m in experiment.metric_infos} == {"val/acc", "val/loss", "val/acc_best", "val/f1_macro"}


def test_f1_pr_curves_mistakes_and_class_counts(shared_run, make_eval_cfg):
    run = shared_run("loader.batch_size=8")
    metrics, run_dir = run.metrics, run.dir
    events = helpers.events(run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    truth = score_checkpoint(last)
    classes = ["bright", "dark"]

    (f1,) = events.Scalars("val/f1_macro")
    scored = run_evaluation(make_eval_cfg(f"checkpoint={last}"))
    assert f1.step == 7 and f1.value == pytest.approx(metrics["val/f1_macro"]) and scored["f1_macro"] == metrics["val/f1_macro"]

    for c, name in enumerate(classes):  # TensorBoard's PR-curve plugin, from every validation item's probability
        (curve,) = events.Tensors(f"val/pr/{name}")
        assert events.SummaryMetadata(f"val/pr/{name}").plugin_data.plugin_name == "pr_curves"
        expected = compute_curve((truth.labels == c).numpy(), truth.probabilities[:, c].numpy(), PR_THRESHOLDS)
        assert curve.step == 7
        assert np.allclose(tensor_util.make_ndarray(curve.tensor_proto), expected, rtol=1e-6)

    (shown,) = events.Images("val/mistakes")
    top = torch.argsort(truth.losses, descending=True)[:MISTAKES]  # 12 validation items: all, by loss
    expected = mistakes_image(truth.images[top], truth.labels[top].tolist(),
                              truth.probabilities[top].argmax(1).tolist(), classes)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(shown.encoded_image_string)).convert("RGB")), expected)

    (table,) = events.Tensors("data/class_counts/text_summary")
    counts = {split: torch.bincount(labels_of(dataset)).tolist()
              for split, dataset in (("train", truth.data.bundle.train), ("val", truth.data.bundle.val))}
    assert counts == {"train": [26, 26], "val": [6, 6]}  # 20% of each class's 32 crops held out
    text = table.tensor_proto.string_val[0].decode()
    assert text.splitlines()[2:] == ["| bright | 26 | 6 |", "| dark | 26 | 6 |", "| **all** | 52 | 12 |"]
    log = (run_dir / "train.log").read_text()
    assert "train class counts: bright 26, dark 26" in log and "val class counts: bright 6, dark 6" in log
    assert "class imbalance" not in log


def test_hparams_name_a_missing_scheduler_and_show_lists_and_null_as_typed(make_cfg):
    config = OmegaConf.to_container(make_cfg(), resolve=True)
    del config["trainer"]["label_smoothing"]  # as in a config saved before the key existed: left out, not "null"
    values = tuned_hparams(config)
    assert values["scheduler"] == "constant" and "trainer.label_smoothing" not in values
    assert hparam_value([0.5, 0.25]) == "[0.5, 0.25]" and hparam_value(None) == "null"
    assert hparam_value(["a", None]) == "[a, null]"
