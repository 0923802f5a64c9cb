"""dataset.cache=disk: written once, reused while nothing changed, never stale, never half-written."""

import fcntl
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from datasets import crops
from datasets.crop_csv import write_crops
from errors import UserError
from tests import files, helpers


def all_images(bundle) -> torch.Tensor:
    """Every crop in CSV order (train and val share one store)."""
    return bundle.train.store.images


@pytest.fixture
def npy_crops(tmp_path):
    """Two .npy sources with 4 strips each; .npy so a source can be rewritten at exactly the same size."""
    root = tmp_path / "arrays"
    rng = np.random.default_rng(1)
    rows = []
    for n in range(2):
        files.write_npy(root / f"a{n}.npy", files.random_image(rng, 16, 64))
        rows += [{"path": f"a{n}.npy", "start": 16 * i, "end": 16 * i + 16, "label": i % 2} for i in range(4)]
    return write_crops(root / "crops.csv", rows, strip=True)


def cache_files(tmp_path):
    """The cache's manifests and arrays; the empty .lock files runs take while building stay and are left out."""
    return sorted(p.name for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock")


def test_disk_cache_equals_memory_and_is_reused_without_reading_sources(build_crops, npy_crops, tmp_path):
    memory = build_crops(f"dataset.csv={npy_crops}", "dataset.width=16", "dataset.height=16")
    first = build_crops(f"dataset.csv={npy_crops}", "dataset.width=16", "dataset.height=16", "dataset.cache=disk")
    assert torch.equal(all_images(first), all_images(memory))
    written = cache_files(tmp_path)
    assert sorted(Path(name).suffix for name in written) == [".json", ".npy"]  # a manifest and one array

    # New pixels at the same size and mtime: a reused cache still shows the old ones, so nothing was decoded.
    source = npy_crops.parent / "a0.npy"
    stat = source.stat()
    files.write_npy(source, 255 - np.load(source))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = build_crops(f"dataset.csv={npy_crops}", "dataset.width=16", "dataset.height=16", "dataset.cache=disk")
    assert torch.equal(all_images(again), all_images(memory))
    assert cache_files(tmp_path) == written
    assert again.classes == first.classes and torch.equal(again.train.indices, first.train.indices)


def test_disk_cache_never_reused_after_a_source_changes(build_crops, npy_crops, tmp_path):
    overrides = (f"dataset.csv={npy_crops}", "dataset.width=16", "dataset.height=16", "dataset.cache=disk")
    before = all_images(build_crops(*overrides)).clone()
    source = npy_crops.parent / "a0.npy"
    files.write_npy(source, 255 - np.load(source))
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    after = all_images(build_crops(*overrides))
    assert torch.equal(after[:4], 255 - before[:4])  # a0's strips come first in the CSV
    assert torch.equal(after[4:], before[4:])
    assert len(cache_files(tmp_path)) == 2  # the stale array was replaced, not kept beside the new one


def test_disk_cache_never_reused_after_the_csv_changes(build_crops, npy_crops, tmp_path):
    overrides = (f"dataset.csv={npy_crops}", "dataset.width=16", "dataset.height=16", "dataset.cache=disk")
    before = all_images(build_crops(*overrides)).clone()
    lines = npy_crops.read_text().splitlines()
    lines[1] = lines[1].replace("a0.npy,0,16", "a0.npy,8,24")  # first row: strip moved by 8 columns
    npy_crops.write_text("\n".join(lines) + "\n")
    after = build_crops(*overrides)
    source = np.load(npy_crops.parent / "a0.npy")
    assert torch.equal(all_images(after)[0], torch.from_numpy(source[:, 8:24]).permute(2, 0, 1))
    assert torch.equal(all_images(after)[1:], before[1:])


def test_failed_extraction_leaves_no_cache(build_crops, crop_csv, tmp_path):
    """A source whose header reads but whose pixels do not: the run fails, and no file is left to be reused."""
    scene = crop_csv.parent / "scene3.png"
    scene.write_bytes(scene.read_bytes()[: scene.stat().st_size // 2])
    with pytest.raises(UserError, match=r"cannot be decoded.*\n.*scene3.png: image file is truncated"):
        build_crops(f"dataset.csv={crop_csv}", "dataset.cache=disk")
    assert not (tmp_path / "cache").exists() or cache_files(tmp_path) == []


def test_skipped_rows_are_cached_with_the_array_they_shaped(build_crops, crop_csv, tmp_path):
    """on_bad_rows decides which rows the array holds, so it is part of the cache key, and a reused cache
    still reports what it left out."""
    with open(crop_csv, "a") as f:
        f.write("scene0.png,0,0,999,16,dark\n")  # outside the 64x64 image
    overrides = (f"dataset.csv={crop_csv}", "dataset.cache=disk", "dataset.on_bad_rows=skip")
    first, again = build_crops(*overrides), build_crops(*overrides)
    assert len(first.skipped) == 1 and "outside" in first.skipped[0]
    assert again.skipped == first.skipped
    assert len(again.train.store.images) == 64  # the bad row is not in the array
    with pytest.raises(UserError, match="1 bad row"):  # error mode never reuses the skip-mode cache
        build_crops(f"dataset.csv={crop_csv}", "dataset.cache=disk")


def test_a_truncated_or_altered_cache_array_is_reported_in_one_line_and_rebuilt(build_crops, npy_crops, tmp_path,
                                                                                caplog):
    caplog.set_level(logging.INFO)
    overrides = (f"dataset.csv={npy_crops}", "dataset.width=16", "dataset.height=16", "dataset.cache=disk")
    expected = all_images(build_crops(*overrides)).clone()
    array = next((tmp_path / "cache").glob("*.npy"))
    whole = array.read_bytes()

    array.write_bytes(whole[: len(whole) // 2])  # as a full disk or a copy cut short leaves it
    caplog.clear()
    assert torch.equal(all_images(build_crops(*overrides)), expected)
    damaged = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert damaged == [f"crop cache: {array} is damaged ({len(whole) // 2} bytes instead of {len(whole)}): "
                       "building it again"]
    assert array.read_bytes() == whole

    # Same size, other pixels: numpy would map it without complaint and train on the wrong crops.
    array.write_bytes(whole[:128] + bytes(255 - b for b in whole[128:]))
    caplog.clear()
    assert torch.equal(all_images(build_crops(*overrides)), expected)
    assert [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()] == [
        f"crop cache: {array} is damaged (its content differs from the manifest's digest): building it again"]

    caplog.clear()
    build_crops(*overrides)  # whole again: reused, nothing reported
    assert not any("damaged" in r.getMessage() or "writing" in r.getMessage() for r in caplog.records)


def test_a_csv_edited_while_a_run_waits_on_the_cache_lock_never_pairs_its_old_key_with_the_new_rows(
        build_crops, make_cfg, npy_crops, tmp_path, caplog):
    """A run keys the cache by the CSV's bytes, then may wait for another run's build lock; the CSV edited
    meanwhile must not be cached under the key of the bytes it replaced. The test holds that lock itself."""
    caplog.set_level(logging.INFO)
    overrides = (f"dataset.csv={npy_crops}", "dataset.width=16", "dataset.height=16", "dataset.cache=disk")
    original = npy_crops.read_bytes()
    build_crops(*overrides)
    manifest = next((tmp_path / "cache").glob("*.json"))
    manifest.unlink()  # the next run must build this key again, under its lock
    edited = original.replace(b"a0.npy,0,16", b"a0.npy,8,24")  # first row: strip moved by 8 columns
    keys = OmegaConf.to_container(make_cfg(f"dataset.cache_dir={tmp_path / 'cache'}", *overrides).dataset,
                                  resolve=True)
    keys.pop("_target_")

    with ThreadPoolExecutor(max_workers=1) as pool:
        with open(manifest.with_suffix(".lock"), "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # as another run building this key would; closing releases it
            waiting = pool.submit(crops.build, **keys, seed=0)
            deadline = time.monotonic() + 60
            while not any("waiting for it" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
                time.sleep(0.01)
            npy_crops.write_bytes(edited)
        waited = waiting.result(timeout=60)
    said = [r.getMessage() for r in caplog.records]
    source = np.load(npy_crops.parent / "a0.npy")
    assert torch.equal(all_images(waited)[0], torch.from_numpy(source[:, 8:24]).permute(2, 0, 1))  # the new rows

    npy_crops.write_bytes(original)  # each content maps the cache its own bytes were keyed by
    assert torch.equal(all_images(build_crops(*overrides))[0], torch.from_numpy(source[:, 0:16]).permute(2, 0, 1))
    npy_crops.write_bytes(edited)
    caplog.clear()
    assert torch.equal(all_images(build_crops(*overrides))[0], torch.from_numpy(source[:, 8:24]).permute(2, 0, 1))
    assert not any("writing" in r.getMessage() for r in caplog.records)  # the waiting run's cache, reused
    assert any("changed while this run waited" in message for message in said)


@pytest.mark.slow
def test_runs_started_together_build_the_cache_once(tmp_path):
    """Three processes on one cache folder at once: one builds, the two others wait for it and map its array.
    Building the 80 crops of 4 noise PNGs (512x512) takes ~0.4 s, most of it torch's first calls, while the
    others reach the lock within milliseconds."""
    csv_path = files.write_noise_crops(tmp_path / "noise", sources=4, size=512, boxes=20)
    cache = tmp_path / "cache"
    launched, logs = helpers.build_together("datasets.crops:build", dict(csv=str(csv_path), root=None),
                                            cache, tmp_path)
    assert launched.returncode == 0, (launched.stderr, logs)
    built = [log for log in logs if "crop cache: writing" in log]
    waited = [log for log in logs if "another run is building" in log and "crop cache: reusing" in log]
    assert len(built) == 1 and len(waited) == 2, logs
    assert len({log.split("digest ")[1] for log in logs}) == 1  # the same digest of the same crops
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".lock", ".npy"]


def test_a_build_killed_midway_leaves_no_temp_file_past_the_next_build(build_crops, npy_crops, tmp_path):
    """SIGKILL runs no cleanup: what a killed build left is removed by the next build of that cache."""
    overrides = (f"dataset.csv={npy_crops}", "dataset.width=16", "dataset.height=16", "dataset.cache=disk")
    build_crops(*overrides)
    written = cache_files(tmp_path)
    for name in written:
        (tmp_path / "cache" / name).unlink()
    array = next(name for name in written if name.endswith(".npy"))
    (tmp_path / "cache" / f"{array}.tmp-999999").write_bytes(b"half an array")  # the killed build's
    build_crops(*overrides)
    assert cache_files(tmp_path) == written


def test_two_crop_sizes_on_one_folder_keep_two_caches(build_crops, npy_crops, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    small, large = (build_crops(f"dataset.csv={npy_crops}", "dataset.cache=disk", f"dataset.width={n}",
                                f"dataset.height={n}") for n in (8, 16))
    caplog.clear()
    again = [build_crops(f"dataset.csv={npy_crops}", "dataset.cache=disk", f"dataset.width={n}", f"dataset.height={n}")
             for n in (8, 16)]
    assert not any("writing" in r.getMessage() for r in caplog.records)  # each size reused its own
    assert [tuple(all_images(b).shape[2:]) for b in again] == [(8, 8), (16, 16)]
    assert torch.equal(all_images(again[0]), all_images(small)) and torch.equal(all_images(again[1]), all_images(large))
    assert sorted(Path(name).suffix for name in cache_files(tmp_path)) == [".json", ".json", ".npy", ".npy"]


def test_a_cache_that_skipped_rows_is_built_again_once_their_file_is_fixed(build_crops, tmp_path):
    """The missing file of a skipped row is not among the cache's sources: once it appears, its rows count."""
    rng = np.random.default_rng(0)
    root = tmp_path / "skip"
    files.write_png(root / "a.png", files.random_image(rng, 32, 64))
    rows = [{"path": name, "x0": 16 * i, "y0": 0, "x1": 16 * i + 16, "y1": 16, "label": "xy"[i % 2]}
            for name in ("a.png", "b.png") for i in range(4)]
    csv_path = write_crops(root / "crops.csv", rows)
    keys = (f"dataset.csv={csv_path}", "dataset.cache=disk", "dataset.on_bad_rows=skip", "dataset.val_fraction=0.25")
    first = build_crops(*keys)
    assert len(first.skipped) == 4 and len(all_images(first)) == 4
    files.write_png(root / "b.png", files.random_image(rng, 32, 64))
    second = build_crops(*keys)
    assert second.skipped == [] and len(all_images(second)) == 8


def test_a_pinned_range_reuses_the_global_cache_that_found_it(build_crops, tmp_path):
    """resume= and evaluate.py pass the checkpoint's [low, high] for a `global` run: the cache that run wrote
    holds exactly that mapping, so a restart maps it instead of writing a second cache."""
    rng = np.random.default_rng(2)
    root = tmp_path / "floats"
    for n in range(2):
        files.write_npy(root / f"f{n}.npy", (rng.standard_normal((16, 64)) * (n + 1)).astype(np.float32))
    csv_path = write_crops(root / "crops.csv", [{"path": f"f{n}.npy", "start": 16 * i, "end": 16 * i + 16,
                                                 "label": i % 2} for n in range(2) for i in range(4)], strip=True)
    keys = (f"dataset.csv={csv_path}", "dataset.width=16", "dataset.height=16", "dataset.cache=disk")
    first = build_crops(*keys)
    written = cache_files(tmp_path)
    low, high = first.value_range
    pinned = build_crops(*keys, f"dataset.value_range=[{low!r},{high!r}]")
    assert cache_files(tmp_path) == written and torch.equal(all_images(pinned), all_images(first))
    other = build_crops(*keys, f"dataset.value_range=[{low - 1!r},{high!r}]")  # another range: its own cache
    assert len(cache_files(tmp_path)) == len(written) + 2 and not torch.equal(all_images(other), all_images(first))
