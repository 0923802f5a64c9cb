"""CIFAR10 files in the real layout, then one deleted or corrupted."""

import pytest

from datasets import cifar
from errors import UserError


def build(root):
    return cifar.build(str(root), download=False, mean=[0.5], std=[0.5], seed=0)


def test_intact_files_load(cifar_root):
    bundle = build(cifar_root)
    assert (len(bundle.train), len(bundle.val)) == (100, 20)


@pytest.mark.parametrize("name, damage, reason", [
    ("data_batch_3", "delete", "data_batch_3 missing"),
    ("test_batch", "corrupt", "test_batch corrupt (MD5 mismatch)"),
    ("batches.meta", "delete", "batches.meta missing"),
])
def test_missing_or_corrupt_file_is_named_with_layout_and_hint(cifar_root, name, damage, reason):
    path = cifar_root / "cifar-10-batches-py" / name
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError) as caught:
        build(cifar_root)
    message = str(caught.value)
    assert "not found or corrupted" in message  # torchvision's reason
    assert reason in message
    assert "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}" in message
    assert "set dataset.download=true" in message
