"""What a run shows in TensorBoard beyond the contract's scalars, read back with TensorBoard's own reader."""

import io
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import training
from training.board import TUNED, confusion_image, hparam_value, tuned_hparams
from training.evaluation import run_evaluation


def test_per_class_confusion_images_lr_and_hparams(make_cfg, make_eval_cfg, crop_csv, tmp_path):
    cfg = make_cfg(f"dataset.csv={crop_csv}", "loader.batch_size=8", "trainer.epochs=2", "scheduler=cosine")
    metrics = training.run(cfg)
    run_dir = Path(cfg.run_dir)
    events = EventAccumulator(str(run_dir))
    events.Reload()

    # One events folder: hparams must not open a timestamped subfolder (a second "run" in TensorBoard).
    assert {p.parent for p in run_dir.rglob("events.out.tfevents*")} == {run_dir}

    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
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
        "optim": "SGD", "optim.momentum": pytest.approx(0.9), "optim.clip_grad_norm": "null",
        "scheduler": "CosineAnnealingLR", "dataset.hflip": False, "dataset": "crops", "dataset.csv": str(crop_csv),
        "dataset.root": "null", "dataset.width": 32, "dataset.height": 32, "dataset.channels": 3,
        "dataset.cache": "memory", "dataset.val_fraction": pytest.approx(0.2), "loader.mode": "auto",
        "trainer.precision": "auto", "trainer.seed": 0,
    }
    experiment = hparams["_hparams_/experiment"].experiment
    assert [info.name for info in experiment.hparam_infos] == [key for key in TUNED if key in shown]
    assert {m.name.tag for m in experiment.metric_infos} == {"val/acc", "val/loss", "val/acc_best"}


def test_hparams_name_a_missing_scheduler_and_show_lists_and_null_as_typed(make_cfg):
    values = tuned_hparams(OmegaConf.to_container(make_cfg(), resolve=True))
    assert values["scheduler"] == "constant" and "trainer.label_smoothing" not in values
    assert hparam_value([0.5, 0.25]) == "[0.5, 0.25]" and hparam_value(None) == "null"
    assert hparam_value(["a", None]) == "[a, null]"
