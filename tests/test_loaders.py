"""Device and DataLoader modes give the same batches, in the same order, with identical values."""

import pytest
import torch

from datasets.crops import build
from training.loaders import DeviceLoader, EpochSeededDataLoader, build_loader

LOADER = dict(mode="auto", batch_size=8, shuffle=True, num_workers=0, pin_memory=False, persistent_workers=False,
              prefetch_factor=2)


@pytest.fixture
def bundle(crop_csv):
    return build(str(crop_csv), None, 16, 16, 3, "memory", None, 0.25, [0.5], [0.5], seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_device_and_dataloader_modes_yield_identical_batches(bundle, workers):
    cpu = torch.device("cpu")
    device = build_loader(bundle.train, device=cpu, seed=3, train=True, **LOADER)
    loader = build_loader(bundle.train, device=cpu, seed=3, train=True, **{**LOADER, "mode": "dataloader",
                                                                           "num_workers": workers})
    assert isinstance(device, DeviceLoader) and isinstance(loader, EpochSeededDataLoader)
    for epoch in (0, 1):
        device.set_epoch(epoch)
        loader.set_epoch(epoch)
        pairs = list(zip(device, loader, strict=True))
        for (x_dev, y_dev), (x_dl, y_dl) in pairs:
            assert torch.equal(x_dev, x_dl) and torch.equal(y_dev, y_dl)
        assert sum(len(y) for (_, y), _ in pairs) == len(bundle.train)
    # A new epoch draws a new order.
    device.set_epoch(0)
    first = torch.cat([x.flatten() for x, _ in device])
    device.set_epoch(1)
    assert not torch.equal(first, torch.cat([x.flatten() for x, _ in device]))


def test_validation_loader_never_shuffles(bundle):
    val = build_loader(bundle.val, device=torch.device("cpu"), seed=0, train=False, **LOADER)
    images = torch.cat([x for x, _ in val])
    assert torch.equal(images, bundle.val.store.images[bundle.val.indices])
