"""loader.mode=device and loader.mode=dataloader feed the same uint8 batches; num_workers=auto picks by data."""

import pytest
import torch
from hydra.utils import instantiate

from errors import UserError
from training.loaders import DeviceLoader, EpochSeededDataLoader, available_cores
from training.runner import torch_threads

CPU = torch.device("cpu")


def epochs_of(loader, epochs=2) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    batches = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        batches.append(list(loader))
    return batches


def test_device_and_dataloader_give_the_same_batches_each_epoch(make_cfg, build_crops, crop_csv):
    memory = build_crops(f"dataset.csv={crop_csv}")
    lazy = build_crops(f"dataset.csv={crop_csv}", "dataset.cache=none")
    make_loader = instantiate(make_cfg("loader.batch_size=8").loader)
    device = make_loader(memory.train, device=CPU, seed=3, train=True, mode="device")
    in_workers = make_loader(lazy.train, device=CPU, seed=3, train=True, mode="dataloader", num_workers=1)
    assert isinstance(device, DeviceLoader) and isinstance(in_workers, EpochSeededDataLoader)

    expected = epochs_of(device)
    got = epochs_of(in_workers)
    assert len(got[0]) == len(expected[0]) == 7  # 52 training crops in batches of 8
    for epoch_got, epoch_expected in zip(got, expected):
        for (images, labels), (images_expected, labels_expected) in zip(epoch_got, epoch_expected):
            assert images.dtype == torch.uint8
            assert torch.equal(images, images_expected)
            assert torch.equal(labels, labels_expected)
    first, second = (torch.cat([labels for _, labels in epoch]) for epoch in expected)
    assert not torch.equal(first, second)  # each epoch draws its own order
    assert sorted(first.tolist()) == sorted(second.tolist())  # of the same samples


def test_num_workers_auto(make_cfg, build_crops, crop_csv):
    make_loader = instantiate(make_cfg().loader)  # num_workers=auto by default
    memory = build_crops(f"dataset.csv={crop_csv}")
    lazy = build_crops(f"dataset.csv={crop_csv}", "dataset.cache=none")
    assert make_loader(memory.train, device=CPU, seed=0, train=True, mode="dataloader").num_workers == 0
    workers = make_loader(lazy.train, device=CPU, seed=0, train=True).num_workers
    assert workers == available_cores()  # decoding per item: every core decodes

    before = torch.get_num_threads()
    with torch_threads(workers):
        assert torch.get_num_threads() == max(1, min(before, available_cores() - workers))
    assert torch.get_num_threads() == before


def test_validation_loader_never_shuffles(make_cfg, build_crops, crop_csv):
    memory = build_crops(f"dataset.csv={crop_csv}")
    make_loader = instantiate(make_cfg("loader.batch_size=8").loader)
    for mode in ("device", "dataloader"):
        val = make_loader(memory.val, device=CPU, seed=0, train=False, mode=mode)
        images = torch.cat([x for x, _ in val])
        assert torch.equal(images, memory.val.store.images[memory.val.indices]), mode


def test_pin_memory_takes_auto_or_a_bool(make_cfg, build_crops, crop_csv):
    lazy = build_crops(f"dataset.csv={crop_csv}", "dataset.cache=none")
    make_loader = instantiate(make_cfg().loader)
    with pytest.raises(UserError, match="loader.pin_memory must be auto, true or false, got 'flase'"):
        make_loader(lazy.train, device=CPU, seed=0, train=True, mode="dataloader", pin_memory="flase")
