"""dataset.hflip: seeded flips of training batches, in both loader modes and across DataLoader workers."""

import pytest
import torch

import training
from datasets.base import ArrayStore, InMemoryDataset
from training.loaders import build_loader

N = 32
LOADER = dict(device=torch.device("cpu"), batch_size=8, shuffle=True, pin_memory=False, persistent_workers=False,
              prefetch_factor=2)


@pytest.fixture(scope="module")
def dataset():
    """N copies of one left-right asymmetric image (left column 0, the rest 255); the label is the item's id."""
    images = torch.full((N, 1, 4, 4), 255, dtype=torch.uint8)
    images[:, :, :, 0] = 0
    return InMemoryDataset(ArrayStore(images, torch.arange(N)))


def flipped(dataset, epoch, seed=0, mode="device", workers=0, train=True, **flip) -> list[list[int]]:
    """Per batch, the ids of the items that came out mirrored (checked to be exact mirrors)."""
    loader = build_loader(dataset, seed=seed, train=train, mode=mode, num_workers=workers, **flip, **LOADER)
    loader.set_epoch(epoch)
    batches = []
    for images, labels in loader:
        mirrored = images[:, 0, 0, -1] == 0
        expected = torch.where(mirrored.view(-1, 1, 1, 1), dataset.store.images[labels].flip(-1),
                               dataset.store.images[labels])
        assert torch.equal(images, expected)
        batches.append(sorted(labels[mirrored].tolist()))
    return batches


def test_off_by_default_and_never_on_validation(dataset):
    assert all(batch == [] for batch in flipped(dataset, epoch=0))
    assert all(batch == [] for batch in flipped(dataset, epoch=0, train=False, hflip=True))


def test_flips_repeat_for_a_seed_and_differ_across_epochs_seeds_and_batches(dataset):
    first = flipped(dataset, epoch=0, hflip=True)
    assert flipped(dataset, epoch=0, hflip=True) == first
    assert flipped(dataset, epoch=1, hflip=True) != first
    assert flipped(dataset, epoch=0, seed=1, hflip=True) != first
    assert 0 < sum(map(len, first)) < N
    assert len({len(batch) for batch in first}) > 1  # not one mask repeated for every batch


def test_dataloader_workers_flip_like_the_device_loader(dataset):
    """Two workers build alternate batches; the flips are drawn per batch in the main process, so worker
    seeding cannot repeat them, and both modes give the same batches for the same seed and epoch."""
    for epoch in (0, 1):
        expected = flipped(dataset, epoch=epoch, hflip=True)
        assert flipped(dataset, epoch=epoch, mode="dataloader", workers=2, hflip=True) == expected


@pytest.mark.parametrize("choice", ["crops", "imagefolder", "datasetfolder", "cifar10"])
def test_every_dataset_config_has_hflip_off(make_cfg, choice):
    assert make_cfg(f"dataset={choice}").dataset.hflip is False


def test_dataset_hflip_reaches_training(make_cfg, crop_csv, tmp_path):
    plain = training.run(make_cfg(f"dataset.csv={crop_csv}", run_dir=tmp_path / "plain"))
    flipped_run = training.run(make_cfg(f"dataset.csv={crop_csv}", "dataset.hflip=true", run_dir=tmp_path / "flip"))
    assert flipped_run["train/loss"] != plain["train/loss"]
    assert flipped_run["val/loss"] != plain["val/loss"]
