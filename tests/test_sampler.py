"""loader.sampler=balanced: a seeded, class-balanced draw per epoch, the same in both loader modes, across DDP
shards and on resume; the labels it needs are read without decoding any item."""

import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

import training
from datasets.base import ArrayStore, InMemoryDataset, labels_of
from datasets.folders import build_imagefolder
from errors import UserError
from tests import files
from training.distributed import shard
from training.loaders import build_loader, epoch_order
from training.logger import RunLogger

CPU = torch.device("cpu")
LOADER = dict(device=CPU, batch_size=8, shuffle=True, pin_memory=False, persistent_workers=False,
              prefetch_factor=2, num_workers=0)


def labels_per_epoch(loader, epoch: int, skip: int = 0) -> list[torch.Tensor]:
    loader.set_epoch(epoch, skip)
    return [labels for _, labels in loader]


def test_balanced_batches_are_the_same_in_both_modes_and_differ_per_epoch(make_cfg, build_crops, crop_csv):
    memory = build_crops(f"dataset.csv={crop_csv}")
    lazy = build_crops(f"dataset.csv={crop_csv}", "dataset.cache=none")  # LazyCrops: labels from `targets`
    make_loader = instantiate(make_cfg("loader.batch_size=8", "loader.sampler=balanced").loader)
    device = make_loader(memory.train, device=CPU, seed=3, train=True, mode="device")
    in_workers = make_loader(lazy.train, device=CPU, seed=3, train=True, mode="dataloader", num_workers=1)
    for epoch in (0, 1):
        device.set_epoch(epoch)
        in_workers.set_epoch(epoch)
        pairs = list(zip(device, in_workers, strict=True))
        assert len(pairs) == 7  # 52 training crops in batches of 8: an epoch is as long as the split
        for (images, labels), (images_w, labels_w) in pairs:
            assert torch.equal(images, images_w) and torch.equal(labels, labels_w)
    first, second = (torch.cat(labels_per_epoch(device, epoch)) for epoch in (0, 1))
    assert not torch.equal(first, second)
    again = make_loader(memory.train, device=CPU, seed=3, train=True, mode="device")
    assert torch.equal(torch.cat(labels_per_epoch(again, 1)), second)  # the same seed draws the same epoch
    other = make_loader(memory.train, device=CPU, seed=4, train=True, mode="device")
    assert not torch.equal(torch.cat(labels_per_epoch(other, 1)), second)
    # Not a permutation: drawn with replacement, so some item repeats within an epoch of 52.
    order = epoch_order(len(memory.train), True, 3, 0, labels_of(memory.train))
    assert len(order) == 52 and len(set(order.tolist())) < 52


@pytest.mark.parametrize("mode", ["device", "dataloader"])
def test_a_balanced_epoch_resumed_mid_way_gives_the_rest_of_its_batches(mode):
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1)
    dataset = InMemoryDataset(ArrayStore(images, torch.tensor([0] * 40 + [1] * 10)))
    loader = build_loader(dataset, seed=0, train=True, mode=mode, sampler="balanced", **LOADER)
    loader.set_epoch(2)
    whole = [x for x, _ in loader]
    resumed = build_loader(dataset, seed=0, train=True, mode=mode, sampler="balanced", **LOADER)
    resumed.load_state_dict(loader.state_dict())
    resumed.set_epoch(2, skip_batches=3)
    assert len(resumed) == len(whole) - 3
    rest = [x for x, _ in resumed]
    assert len(rest) == len(whole) - 3 and all(torch.equal(a, b) for a, b in zip(rest, whole[3:]))


def test_balanced_draws_every_class_equally_often_on_imbalanced_data():
    """Classes of 2700, 270 and 30 items: each class's share of an epoch of 3000 draws is Binomial(3000, 1/3),
    so it lies within 4 standard deviations of 1000 (a chance below 1e-4 per class of failing by luck)."""
    labels = torch.tensor([0] * 2700 + [1] * 270 + [2] * 30)
    n, p = len(labels), 1 / 3
    bound = 4 * math.sqrt(n * p * (1 - p))
    for epoch in range(3):
        order = epoch_order(n, True, seed=0, epoch=epoch, labels=labels)
        counts = torch.bincount(labels[order], minlength=3).tolist()
        assert all(abs(c - n * p) <= bound for c in counts), (epoch, counts, bound)
        assert set(order[labels[order] == 2].tolist()) == set(range(2970, 3000))  # ~1000 draws of 30 items
    uniform = torch.bincount(labels[epoch_order(n, True, seed=0, epoch=0)], minlength=3).tolist()
    assert uniform == [2700, 270, 30]  # the default: each item once


def test_ddp_shards_split_the_one_balanced_order():
    labels = torch.tensor([0] * 9 + [1] * 2)
    order = epoch_order(11, True, seed=5, epoch=1, labels=labels)
    shards = [shard(order, rank, 2, pad=True) for rank in range(2)]  # what each rank's loader takes
    assert torch.equal(torch.stack(shards, 1).flatten()[:11], order)


def test_labels_of_a_folder_split_come_without_decoding(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in (("a", 6), ("b", 3)):
        for i in range(n):
            files.write_png(tmp_path / "images" / cls / f"{i}.png", files.random_image(rng, 8, 8))
    bundle = build_imagefolder(root=str(tmp_path / "images"), width=8, height=8, channels=3, cache="none",
                               val_fraction=0.34, mean=[0.5], std=[0.5], seed=0)
    for split in (bundle.train, bundle.val):  # Subsets of one ImageFolder
        assert labels_of(split).tolist() == [split[i][1] for i in range(len(split))]
    (tmp_path / "images" / "a" / "0.png").write_bytes(b"not a png")  # nothing is decoded to get the labels
    assert labels_of(bundle.train).tolist() == [0, 0, 0, 0, 1, 1]


def test_sampler_values_are_checked():
    dataset = InMemoryDataset(ArrayStore(torch.zeros(4, 1, 1, 1, dtype=torch.uint8), torch.tensor([0, 0, 0, 1])))
    with pytest.raises(UserError, match="loader.sampler must be one of uniform, balanced, got 'balance'"):
        build_loader(dataset, seed=0, train=True, mode="device", sampler="balance", **LOADER)
    with pytest.raises(UserError, match="loader.sampler=balanced .* set loader.shuffle=true"):
        build_loader(dataset, seed=0, train=True, mode="device", sampler="balanced", **{**LOADER, "shuffle": False})
    val = build_loader(dataset, seed=0, train=False, mode="device", sampler="balanced", **LOADER)
    assert torch.equal(torch.cat([y for _, y in val]), dataset.store.labels)  # validation is never resampled


@pytest.fixture
def imbalanced_csv(crop_csv):
    """The crop fixture's boxes with a split column: training has 30 bright crops and 2 dark (15:1),
    validation 2 bright and 4 dark."""
    header, *rows = crop_csv.read_text().splitlines()
    bright = [row for row in rows if row.endswith(",bright")]
    dark = [row for row in rows if row.endswith(",dark")]
    chosen = [f"{r},train" for r in bright[:30] + dark[:2]] + [f"{r},val" for r in bright[30:] + dark[2:6]]
    path = crop_csv.with_name("imbalanced.csv")
    path.write_text("\n".join([f"{header},split", *chosen]) + "\n")
    return path


def test_a_run_on_imbalanced_data_warns_once_and_suggests_the_balanced_sampler(make_cfg, imbalanced_csv, tmp_path):
    training.run(make_cfg(f"dataset.csv={imbalanced_csv}", "loader.batch_size=16"))
    log = (tmp_path / "run" / "train.log").read_text()
    assert "train class counts: bright 30, dark 2" in log and "val class counts: bright 2, dark 4" in log
    (warning,) = [line for line in log.splitlines() if "class imbalance" in line]
    assert "WARNING" in warning and "30 'bright' items but 2 'dark' (15.0:1)" in warning
    assert warning.endswith("consider loader.sampler=balanced")

    training.run(make_cfg(f"dataset.csv={imbalanced_csv}", "loader.batch_size=16", "loader.sampler=balanced",
                          run_dir=tmp_path / "balanced"))
    assert "class imbalance" not in (tmp_path / "balanced" / "train.log").read_text()


def test_the_imbalance_warning_starts_above_ten_to_one(caplog):
    logger = RunLogger(None, purge_step=None, loader=None, progress=False)
    for counts, warned in (([10, 1], False), ([21, 2], True), ([5, 0], True)):
        caplog.clear()
        logger.class_counts(["a", "b"], {"train": counts, "val": [1, 1]}, sampler="uniform", step=None)
        assert any("class imbalance" in r.message for r in caplog.records) == warned, counts
