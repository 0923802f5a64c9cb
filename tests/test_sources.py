"""The source contract: every family goes through one pipeline, so cache=none, memory and disk give the same
bytes, a disk cache is reused by the next run, grey items are stored once, and runs sharing a cache folder
build it once."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets import cifar, crops, folders, listed
from errors import UserError
from tests import files, helpers

SPEC = dict(width=12, height=10, channels=3, val_fraction=0.25, mean=[0.5], std=[0.5], seed=0)


def image_tree(root: Path, grey: bool = False) -> Path:
    rng = np.random.default_rng(5)
    for cls in ("cat", "dog", "eel"):
        for i in range(4):
            files.write_png(root / cls / f"{i}.png", files.random_image(rng, 17 + i, 23, 1 if grey else 3))
    return root


def array_tree(root: Path) -> Path:
    rng = np.random.default_rng(6)
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("x", "y"):
            for i in range(n):
                files.write_npy(root / split / cls / f"{i}.npy", rng.normal(size=(14, 18, 3)).astype(np.float32))
    return root


def family_builds(tmp_path: Path, cifar_root: Path):
    """Each family and shape as a function of the cache mode."""
    cache_dir = str(tmp_path / "cache")
    crop_csv = files.write_crop_scenes(tmp_path / "crops")
    grey_csv = files.write_crop_scenes(tmp_path / "grey_crops", channels=1)
    images, grey_images = image_tree(tmp_path / "images"), image_tree(tmp_path / "grey_images", grey=True)
    arrays = array_tree(tmp_path / "arrays")
    listing = tmp_path / "grey_images" / "files.csv"
    listing.write_text("path,label,split\n" + "".join(f"{p.relative_to(listing.parent)},{p.parent.name},"
                                                     f"{'val' if p.stem == '0' else ''}\n"
                                                     for p in sorted(grey_images.rglob("*.png"))))
    return {
        "listed": lambda cache: listed.build(str(listing), cache=cache, cache_dir=cache_dir, **SPEC),
        "crops": lambda cache: crops.build(str(crop_csv), None, cache=cache, cache_dir=cache_dir, **SPEC),
        "crops_grey": lambda cache: crops.build(str(grey_csv), None, cache=cache, cache_dir=cache_dir, **SPEC),
        "imagefolder": lambda cache: folders.build_imagefolder(str(images), cache=cache, cache_dir=cache_dir, **SPEC),
        "imagefolder_grey": lambda cache: folders.build_imagefolder(str(grey_images), cache=cache,
                                                                    cache_dir=cache_dir, **SPEC),
        "datasetfolder": lambda cache: folders.build_datasetfolder(str(arrays), [".npy"], cache=cache,
                                                                   cache_dir=cache_dir, **SPEC),
        "cifar10": lambda cache: cifar.build(str(cifar_root), False, cache=cache, cache_dir=cache_dir,
                                             mean=[0.5], std=[0.5], seed=0),
    }


def every_item(dataset) -> tuple[torch.Tensor, list[int]]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([image for image, _ in items]), [label for _, label in items]


@pytest.mark.parametrize("family", ["crops", "crops_grey", "imagefolder", "imagefolder_grey", "datasetfolder",
                                    "cifar10", "listed"])
def test_every_cache_mode_gives_the_same_bytes(tmp_path, cifar_root, family):
    build = family_builds(tmp_path, cifar_root)[family]
    bundles = {cache: build(cache) for cache in ("none", "memory", "disk")}
    bundles["disk again"] = build("disk")  # mapped from the cache the run before wrote
    expected = bundles["none"]
    for cache, bundle in bundles.items():
        assert bundle.classes == expected.classes and bundle.value_range == expected.value_range, cache
        for split in ("train", "val"):
            images, labels = every_item(getattr(bundle, split))
            expected_images, expected_labels = every_item(getattr(expected, split))
            assert images.dtype == torch.uint8 and images.shape[1:] == expected.input_shape, (cache, split)
            assert torch.equal(images, expected_images) and labels == expected_labels, (cache, split)


@pytest.mark.parametrize("family", ["crops_grey", "imagefolder_grey", "listed"])
def test_grey_items_seen_as_rgb_are_stored_once(tmp_path, cifar_root, family):
    build = family_builds(tmp_path, cifar_root)[family]
    for cache in ("memory", "disk"):
        bundle = build(cache)
        assert bundle.input_shape == (3, 10, 12)
        assert tuple(bundle.train.store.images.shape[1:]) == (1, 10, 12), cache  # one channel held
        assert bundle.train[0][0].shape == (3, 10, 12)  # seen as three
    stored = [np.load(path, mmap_mode="r").shape for path in (tmp_path / "cache").glob("*.npy")]
    assert [shape[1:] for shape in stored] == [(1, 10, 12)]


def test_the_listed_source_keeps_its_split_column_and_names_bad_rows(tmp_path, cifar_root):
    bundle = family_builds(tmp_path, cifar_root)["listed"]("memory")
    # 0.png of each class is marked val; of the 3 unmarked files per class, 1 is drawn for val (25%).
    assert bundle.classes == ["cat", "dog", "eel"] and (len(bundle.train), len(bundle.val)) == (6, 6)
    listing = tmp_path / "grey_images" / "files.csv"
    listing.write_text(listing.read_text() + "cat/missing.png,cat,\ncat/0.png,,test\n")
    with pytest.raises(UserError, match=r"2 bad row\(s\).*\n  line 14: cat/missing.png: file not found\n  line 15: "):
        listed.build(str(listing), cache="memory", **SPEC)


def test_a_second_disk_run_reads_the_cache_and_decodes_nothing(tmp_path, cifar_root, caplog):
    build = family_builds(tmp_path, cifar_root)["imagefolder"]
    caplog.set_level(logging.INFO)
    build("disk")
    assert any("imagefolder cache: writing" in r.getMessage() for r in caplog.records)
    caplog.clear()
    for path in (tmp_path / "images").rglob("*.png"):  # a decode would fail now; a stat still matches
        stat = path.stat()
        path.write_bytes(b"x" * stat.st_size)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    build("disk")
    messages = [r.getMessage() for r in caplog.records]
    assert any("imagefolder cache: reusing" in m for m in messages) and not any("writing" in m for m in messages)


def test_a_new_file_in_a_folder_makes_a_new_cache(tmp_path, cifar_root):
    build = family_builds(tmp_path, cifar_root)["imagefolder"]
    first = build("disk")
    files.write_png(tmp_path / "images" / "cat" / "new.png", files.random_image(np.random.default_rng(9), 8, 8))
    second = build("disk")
    assert len(second.train) + len(second.val) == len(first.train) + len(first.val) + 1


@pytest.mark.slow
def test_three_runs_sharing_an_imagefolder_cache_build_it_once(tmp_path):
    rng = np.random.default_rng(3)
    for cls in ("a", "b"):
        for i in range(40):
            files.write_png(tmp_path / "images" / cls / f"{i}.png", files.random_image(rng, 256, 256))
    cache = tmp_path / "cache"
    launched, logs = helpers.build_together("datasets.folders:build_imagefolder", dict(root=str(tmp_path / "images")),
                                            cache, tmp_path)
    assert launched.returncode == 0, (launched.stderr, logs)
    built = [log for log in logs if "imagefolder cache: writing" in log]
    waited = [log for log in logs if "another run is building" in log and "imagefolder cache: reusing" in log]
    assert len(built) == 1 and len(waited) == 2, logs
    assert len({log.split("digest ")[1] for log in logs}) == 1
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".lock", ".npy"]
