"""Keys with impossible values fail up front, in one line naming the key, before any file is decoded."""

import csv

import numpy as np
import pytest
import torch

from datasets.crops import build as build_crops
from datasets.folders import build_imagefolder
from errors import UserError
from tests import files
from training.loaders import build_loader

KEYS = dict(width=16, height=16, channels=3, cache="memory", mean=[0.5], std=[0.5], seed=0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_val_fraction_outside_0_1_fails_even_when_the_data_brings_its_split(tmp_path, fraction):
    """Both data sets bring their own split, so val_fraction would never be used, and the folder's classes
    are empty: the key is checked first anyway."""
    files.write_png(tmp_path / "crops" / "a.png", files.random_image(np.random.default_rng(0), 16, 16))
    csv_path = tmp_path / "crops" / "crops.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([["path", "x0", "y0", "x1", "y1", "label", "split"],
                                 ["a.png", 0, 0, 8, 8, "x", "train"], ["a.png", 8, 8, 16, 16, "x", "val"]])
    for split in ("train", "val"):
        (tmp_path / "folders" / split / "x").mkdir(parents=True)
    for build in (lambda: build_crops(str(csv_path), None, cache_dir=None, val_fraction=fraction, **KEYS),
                  lambda: build_imagefolder(str(tmp_path / "folders"), val_fraction=fraction, **KEYS)):
        with pytest.raises(UserError, match=f"^dataset.val_fraction must be between 0 and 1 .exclusive., got {fraction}$"):
            build()


@pytest.mark.parametrize("batch_size", [0, -4])
def test_batch_size_must_be_positive(batch_size):
    with pytest.raises(UserError, match=f"^loader.batch_size must be a positive integer, got {batch_size}$"):
        build_loader([], device=torch.device("cpu"), seed=0, train=True, mode="auto", batch_size=batch_size,
                     shuffle=True, num_workers=0, pin_memory=False, persistent_workers=False, prefetch_factor=2)


def test_every_bad_value_is_one_line_before_any_data_is_read(make_cfg, tmp_path):
    """The CSV does not exist: reading any data would fail on it first. Each bad key is its own line, naming
    the key, its accepted range and the value (torch would have said only 'Invalid learning rate')."""
    import training

    cfg = make_cfg(f"dataset.csv={tmp_path / 'absent.csv'}", "loader.batch_size=0", "optim.lr=-1",
                   "optim.momentum=1.5", "loader.num_workers=-2")
    with pytest.raises(UserError) as error:
        training.run(cfg)
    assert str(error.value).splitlines() == [
        "loader.batch_size must be between 1 and 1048576, got 0",
        "loader.num_workers must be auto or an integer 0..256, got -2",
        "optim.lr must be greater than 0 and at most 1e+30, got -1.0",
        "optim.momentum must be between 0 and 1, got 1.5",
    ]
    assert not (tmp_path / "run").exists()


def test_evaluate_checks_ranges_before_reading_the_checkpoint(make_eval_cfg, tmp_path):
    from commands.evaluation import run_evaluation

    cfg = make_eval_cfg(f"checkpoint={tmp_path / 'absent.pt'}", "dataset=imagefolder", f"dataset.root={tmp_path}",
                        "dataset.val_fraction=2", "dataset.width=0")
    with pytest.raises(UserError) as error:
        run_evaluation(cfg)
    assert str(error.value).splitlines() == ["dataset.width must be between 1 and 65536, got 0",
                                             "dataset.val_fraction must be between 0 and 1 (exclusive), got 2.0"]
