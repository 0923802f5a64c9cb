from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torchvision import datasets as tv

from datasets import crops
from tests import files
from training import schema

CONFIGS = str(Path(__file__).resolve().parent.parent / "configs")
schema.register()  # before any test composes, as train.py and evaluate.py do


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip, saying why, where torch sees no GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests train tiny batches, where one thread beats two, and two threads on a busy 2-core machine stall
    on each other: two epochs of the crop fixture took 0.05 s on one thread, 1 to 5 s on two under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_cfg(tmp_path):
    """Compose configs/train.yaml like train.py does, with tiny CPU settings and the run dir in tmp_path."""

    def make(*overrides: str, run_dir: Path | None = None):
        base = [
            f"run_dir={run_dir or tmp_path / 'run'}",
            "trainer.device=cpu",
            "trainer.progress=false",
            "trainer.epochs=1",
            "trainer.log_every=2",
            "trainer.warmup_steps=1",
        ]
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            return compose(config_name="train", overrides=[*base, *overrides])

    return make


@pytest.fixture
def make_eval_cfg(tmp_path):
    """Compose configs/evaluate.yaml like evaluate.py does, on the CPU, with the run dir in tmp_path."""

    def make(*overrides: str, run_dir: Path | None = None):
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            return compose(config_name="evaluate",
                           overrides=[f"run_dir={run_dir or tmp_path / 'eval'}", "device=cpu", *overrides])

    return make


@pytest.fixture
def make_preview_cfg(tmp_path):
    """Compose configs/preview.yaml like preview.py does, with the run dir in tmp_path."""

    def make(*overrides: str, run_dir: Path | None = None):
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            return compose(config_name="preview", overrides=[f"run_dir={run_dir or tmp_path / 'preview'}", *overrides])

    return make


@pytest.fixture
def build_crops(make_cfg, tmp_path):
    """The crop dataset as the composed config describes it, called directly, with disk caches in tmp_path."""

    def build(*overrides: str):
        cfg = make_cfg(f"dataset.cache_dir={tmp_path / 'cache'}", *overrides)
        keys = OmegaConf.to_container(cfg.dataset, resolve=True)
        assert keys.pop("_target_") == "datasets.crops.build"
        return crops.build(**keys, seed=0)

    return build


@pytest.fixture
def crop_csv(tmp_path):
    """A small learnable crop set: 4 PNG scenes (2 classes by brightness) with 16 boxes each."""
    return files.write_crop_scenes(tmp_path / "crops")


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """CIFAR-10 files in the real pickle layout; torchvision's expected MD5s are pointed at them, since
    the published sums can only match the published files."""
    root = tmp_path / "cifar"
    sums = files.write_cifar10(root)
    monkeypatch.setattr(tv.CIFAR10, "train_list", [[f"data_batch_{i}", sums[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(tv.CIFAR10, "test_list", [["test_batch", sums["test_batch"]]])
    monkeypatch.setattr(tv.CIFAR10, "meta", {**tv.CIFAR10.meta, "md5": sums["batches.meta"]})
    return root
