"""ImageFolder and DatasetFolder: class per subfolder, train/ and val/ when present, else a seeded split."""

import gc
import multiprocessing

import numpy as np
import pytest
import torch

import training
from datasets.folders import build_datasetfolder, build_imagefolder
from errors import UserError
from tests import files


def folder_args(root, **overrides):
    args = dict(root=str(root), width=16, height=16, channels=3, cache="memory", val_fraction=0.25, mean=[0.5],
                std=[0.5], seed=0)
    return {**args, **overrides}


@pytest.fixture
def image_tree(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for cls in ("cat", "dog"):
        for i in range(8):
            files.write_png(root / cls / f"{i}.png", files.random_image(rng, 20, 24))
    (root / ".ipynb_checkpoints").mkdir()  # not a class
    return root


def test_imagefolder_split_and_resize(image_tree):
    bundle = build_imagefolder(**folder_args(image_tree))
    assert bundle.classes == ["cat", "dog"]
    assert (len(bundle.train), len(bundle.val)) == (12, 4)  # 25% of each class held out
    image, label = bundle.train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    again = build_imagefolder(**folder_args(image_tree))
    assert torch.equal(bundle.val.store.images, again.val.store.images)


def test_imagefolder_uses_train_and_val_subfolders(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 5), ("val", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                files.write_png(tmp_path / split / cls / f"{i}.png", files.random_image(rng, 16, 16))
    bundle = build_imagefolder(**folder_args(tmp_path))
    assert (len(bundle.train), len(bundle.val)) == (10, 4)


def test_imagefolder_items_equal_the_files_when_no_resize(image_tree):
    bundle = build_imagefolder(**folder_args(image_tree, width=24, height=20, cache="none"))
    from PIL import Image

    path, _ = bundle.train.dataset.samples[bundle.train.indices[0]]
    expected = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(bundle.train[0][0].numpy(), expected)


def test_datasetfolder_loads_npy_through_the_same_path(tmp_path):
    rng = np.random.default_rng(2)
    for cls in ("x", "y"):
        for i in range(4):
            files.write_npy(tmp_path / cls / f"{i}.npy", rng.integers(0, 256, size=(16, 16), dtype=np.uint8))
    (tmp_path / "x" / "notes.txt").write_text("not an array; the extension filter skips it")
    bundle = build_datasetfolder(**folder_args(tmp_path, extensions=["npy"], channels=1, cache="none"))
    assert bundle.classes == ["x", "y"]
    path, _ = bundle.train.dataset.samples[bundle.train.indices[0]]
    assert np.array_equal(bundle.train[0][0].numpy()[0], np.load(path))


def test_missing_root_is_named(tmp_path):
    with pytest.raises(UserError, match="folder not found: .*nowhere"):
        build_imagefolder(**folder_args(tmp_path / "nowhere"))


def test_imagefolder_trains_through_the_runner_and_ends_its_workers(make_cfg, image_tree):
    """A run in this process (as each job of a Hydra sweep is) ends its persistent DataLoader workers when it
    returns: they were kept running, one set more per job, by a thread started during the run."""
    before = set(multiprocessing.active_children())
    metrics = training.run(make_cfg("dataset=imagefolder", f"dataset.root={image_tree}", "loader.batch_size=4",
                                    "loader.mode=dataloader", "loader.num_workers=1"))
    assert 0.0 <= metrics["val/acc"] <= 1.0 and metrics["train/throughput"] > 0
    gc.collect()
    assert set(multiprocessing.active_children()) <= before


def test_threads_decode_a_folder_into_the_same_array_and_errors_as_one_thread(tmp_path):
    """materialize shares chunks of items out to threads: the array, and the list of files that fail (in
    index order), are those of one thread."""
    from datasets.base import MATERIALIZE_CHUNK, materialize
    from datasets.folders import ImageFolder
    from datasets.regions import LoadItem

    rng = np.random.default_rng(7)
    n = 2 * MATERIALIZE_CHUNK + 10  # three chunks, so two threads both work
    for i in range(n):
        files.write_png(tmp_path / "c" / f"{i:03d}.png", files.random_image(rng, 9, 11))
    for i in (5, MATERIALIZE_CHUNK + 3, n - 2):  # a broken file in each chunk
        files.write_truncated_png(tmp_path / "c" / f"{i:03d}.png", height=9, width=11, seed=i)
    folder = ImageFolder(str(tmp_path), loader=LoadItem(8, 8, 3))
    with pytest.raises(UserError) as one:
        materialize(folder, (3, 8, 8), "one", workers=1)
    with pytest.raises(UserError) as two:
        materialize(folder, (3, 8, 8), "one", workers=2)
    assert str(one.value) == str(two.value)
    assert [f"{i:03d}.png" in str(one.value) for i in (5, MATERIALIZE_CHUNK + 3, n - 2)] == [True] * 3
    for i in (5, MATERIALIZE_CHUNK + 3, n - 2):  # mended: now both must give the same pixels
        files.write_png(tmp_path / "c" / f"{i:03d}.png", files.random_image(rng, 9, 11))
    single, threaded = materialize(folder, (3, 8, 8), "one", workers=1), materialize(folder, (3, 8, 8), "two", workers=2)
    assert torch.equal(single.store.images, threaded.store.images)
    assert torch.equal(single.store.labels, threaded.store.labels)
