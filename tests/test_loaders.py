"""loader.mode=device and loader.mode=dataloader feed the same uint8 batches; num_workers=auto picks by data."""

import pytest
import torch
from hydra.utils import instantiate

from errors import UserError
from cores import available_cores
from training.loaders import DeviceLoader, EpochSeededDataLoader, choose_device_loader, device_bytes
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


GIB = 2**30


@pytest.mark.parametrize("mode, free, expected", [
    ("auto", 4 * GIB, (True, None)),  # fits: the data lives on the GPU
    ("auto", 1 * GIB, (False, "does not fit")),  # falls back to the pinned-memory DataLoader, saying why
    ("dataloader", 4 * GIB, (False, None)),
    ("auto", None, (True, None)),  # the CPU: host memory holds the data already
])
def test_device_loader_only_where_the_data_fits_in_free_gpu_memory(mode, free, expected):
    on_device, notice = choose_device_loader(mode, nbytes=2 * GIB, free_bytes=free, device=torch.device("cuda"))
    assert on_device == expected[0]
    assert (notice is None) == (expected[1] is None)
    if notice:
        assert expected[1] in notice and "2.00 GiB" in notice and "\n" not in notice


def test_forced_device_mode_that_cannot_fit_fails_in_one_line():
    with pytest.raises(UserError, match=r"loader.mode=device needs 2.00 GiB on cuda .* only 1.00 GiB is free"):
        choose_device_loader("device", nbytes=2 * GIB, free_bytes=GIB, device=torch.device("cuda"))


def test_a_split_scored_alone_copies_only_its_own_items(build_crops, crop_csv):
    """evaluate.py scores validation: the training split (80% here) must not go to the device with it. In
    training, validation shares the copy the training loader made."""
    bundle = build_crops(f"dataset.csv={crop_csv}")
    item = bundle.val.store.images[0].nbytes + 8  # uint8 pixels + an int64 label
    assert device_bytes(bundle.val, CPU, train=False) == len(bundle.val) * item
    alone = DeviceLoader(bundle.val, 5, False, CPU, seed=0, train=False)
    assert len(alone.images) == len(bundle.val) < len(bundle.val.store)
    assert device_bytes(bundle.train, CPU, train=True) == len(bundle.train.store) * item
    DeviceLoader(bundle.train, 5, True, CPU, seed=0)
    assert device_bytes(bundle.val, CPU, train=False) == 0  # the store is there now: validation shares it
    shared = DeviceLoader(bundle.val, 5, False, CPU, seed=0, train=False)
    for (a, y), (b, z) in zip(alone, shared, strict=True):
        assert torch.equal(a, b) and torch.equal(y, z)
