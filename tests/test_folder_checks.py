"""Image folders with hidden folders, empty classes and broken files, written by the tests."""

import gc
import numpy as np
import pytest
import torch

from datasets.folders import build_imagefolder
from errors import UserError
from tests import files
from training.loaders import build_loader

LOADER = dict(device=torch.device("cpu"), seed=0, train=True, mode="dataloader", batch_size=2, shuffle=False,
              pin_memory=False, persistent_workers=False, prefetch_factor=2)


def imagefolder(root, **overrides):
    keys = dict(width=16, height=16, channels=3, cache="none", val_fraction=0.5, mean=[0.5], std=[0.5], seed=0)
    return build_imagefolder(str(root), **{**keys, **overrides})


def write_class(root, name, n=2, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        files.write_png(root / name / f"{i}.png", files.random_image(rng, 20, 20))


def test_hidden_folders_are_not_classes(tmp_path):
    for name in ("cat", "dog", ".ipynb_checkpoints", ".git"):
        write_class(tmp_path, name)
    assert imagefolder(tmp_path).classes == ["cat", "dog"]


def test_empty_classes_are_named_together(tmp_path):
    write_class(tmp_path, "cat")
    (tmp_path / "dog").mkdir()
    (tmp_path / "eel").mkdir()
    (tmp_path / "eel" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"dataset\.root .*dog, eel"):
        imagefolder(tmp_path)


def test_verify_lists_every_unreadable_file(tmp_path):
    write_class(tmp_path, "cat")
    write_class(tmp_path, "dog")
    files.write_truncated_png(tmp_path / "cat" / "truncated.png")
    (tmp_path / "dog" / "text.png").write_text("not an image")
    imagefolder(tmp_path)  # without verify nothing is decoded up front
    with pytest.raises(UserError) as caught:
        imagefolder(tmp_path, verify=True)
    message = str(caught.value)
    assert "dataset.verify: 2 unreadable file(s)" in message
    assert "truncated.png: image file is truncated" in message
    assert "text.png: cannot identify image file" in message


def test_memory_cache_lists_every_unreadable_file_without_a_second_decode(tmp_path):
    """cache=memory decodes every file once anyway, so it lists every failure itself; verify adds nothing."""
    write_class(tmp_path, "cat", n=4)
    write_class(tmp_path, "dog", n=4)
    files.write_truncated_png(tmp_path / "cat" / "truncated.png")
    (tmp_path / "dog" / "text.png").write_text("not an image")
    for verify in (False, True):
        with pytest.raises(UserError) as caught:
            imagefolder(tmp_path, cache="memory", verify=verify)
        message = str(caught.value)
        assert "cannot be loaded" in message and "dataset.verify:" not in message
        assert "truncated.png: image file is truncated" in message
        assert "text.png: cannot identify image file" in message


def test_load_error_in_a_worker_names_file_and_index(tmp_path):
    write_class(tmp_path / "train", "cat", n=1)
    write_class(tmp_path / "val", "cat", n=1)
    files.write_truncated_png(tmp_path / "train" / "cat" / "1.png")
    bundle = imagefolder(tmp_path)
    batches = iter(build_loader(bundle.train, num_workers=1, **LOADER))
    with pytest.raises(UserError) as caught:
        next(batches)
    message = str(caught.value)
    assert message.startswith(f"item 1 of {tmp_path / 'train'}: cannot load {tmp_path / 'train' / 'cat' / '1.png'}")
    assert "image file is truncated" in message
    assert "Traceback" not in message  # the worker's traceback is left to HYDRA_FULL_ERROR=1
    # torch leaves a failed worker iterator in a reference cycle with its exception; freed by the garbage
    # collector it waits out a 5 s join. Dropping the exception first lets the iterator shut down at once.
    del caught
    gc.collect()
