"""CIFAR10 through torchvision, on files in CIFAR-10's own pickle layout written by the test."""

import pickle

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import training
from datasets import cifar
from errors import UserError
from tests.conftest import CONFIGS


def test_cifar_offline_from_files_test_split_is_val(cifar_root):
    bundle = cifar.build(root=str(cifar_root), download=False, mean=[0.5], std=[0.5], seed=0)
    assert bundle.classes[:2] == ["airplane", "automobile"] and len(bundle.classes) == 10
    assert (len(bundle.train), len(bundle.val)) == (100, 20)  # 5 batches of 20; test_batch is val
    with open(cifar_root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        test = pickle.load(f, encoding="latin1")
    image, label = bundle.val[3]
    # CIFAR rows are channel-major: 1024 red, 1024 green, 1024 blue values.
    assert torch.equal(image, torch.from_numpy(test["data"][3].reshape(3, 32, 32)))
    assert label == test["labels"][3]
    assert bundle.input_shape == (3, 32, 32)


def test_cifar_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(UserError, match="dataset.download=true") as error:
        cifar.build(root=str(tmp_path / "empty"), download=False, mean=[0.5], std=[0.5], seed=0)
    assert "cifar-10-batches-py" in str(error.value)


def test_cifar_trains_through_the_runner(make_cfg, cifar_root):
    metrics = training.run(make_cfg("dataset=cifar10", f"dataset.root={cifar_root}", "dataset.download=false",
                                    "loader.batch_size=16"))
    assert metrics["world_size"] == 1 and np.isfinite(metrics["val/loss"])


def test_tutorial_preset_composes_the_tutorial_settings():
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=tutorial"])
        on_crops = compose(config_name="train", overrides=["experiment=tutorial", "dataset=crops"])
    assert cfg.dataset._target_ == "datasets.cifar.build"
    assert (cfg.loader.batch_size, cfg.optim.lr, cfg.optim.momentum, cfg.trainer.epochs) == (4, 0.001, 0.9, 2)
    assert list(cfg.dataset.mean) == [0.5] and list(cfg.dataset.std) == [0.5]
    # The preset's settings apply to any data the user picks.
    assert on_crops.dataset._target_ == "datasets.crops.build" and on_crops.loader.batch_size == 4
