"""Writers for the real files tests train on: PNG images, .npy arrays, crop CSVs, CIFAR-10's pickles."""

from __future__ import annotations

import csv
import hashlib
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def random_image(rng: np.random.Generator, height: int, width: int, channels: int = 3) -> np.ndarray:
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def write_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path)
    return path


def write_truncated_png(path: Path, height: int = 48, width: int = 64, seed: int = 0) -> Path:
    """A PNG cut to half its bytes: the header (size) reads fine, decoding the pixels fails."""
    write_png(path, random_image(np.random.default_rng(seed), height, width))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_npy(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return path


def write_sparse_npy(path: Path, shape: tuple[int, ...], dtype=np.float32) -> Path:
    """A large .npy whose values are a hole in the file system: no disk space, read as zeros, in np.save's
    layout (header, then C-order values, so np.load can memory-map it); one value is 1, so the range is not a
    constant's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    array[0, 0] = 1
    array.flush()
    del array
    return path


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar10(root: Path, per_batch: int = 20, test_size: int = 20, seed: int = 0) -> dict:
    """CIFAR-10's python layout: cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}.

    The published files are Python 2 pickles that torchvision reads with encoding="latin1", which turns
    their keys and names into str: "data" (N, 3072) uint8 rows, channel-major (1024 R, 1024 G, 1024 B),
    and "labels". Written here with str keys, they load into exactly that. Returns each file's MD5, since
    torchvision checks them against the published ones.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test_size if name == "test_batch" else per_batch
        batch = {
            "batch_label": name,
            "labels": [int(v) for v in rng.integers(0, 10, size=n)],
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        sums[name] = md5(folder / name)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    sums["batches.meta"] = md5(folder / "batches.meta")
    return sums


def write_crop_scenes(root: Path, channels: int = 3, mode: str | None = None) -> Path:
    """A small learnable crop set: 4 PNG scenes (2 classes by brightness) with 16 boxes each; returns its CSV.
    channels=1 draws grey scenes (saved as L, or as `mode`: RGB keeps the grey values in all three channels)."""
    rng = np.random.default_rng(0)
    rows = []
    for n in range(4):
        scene = rng.integers(0, 60, size=(64, 64) if channels == 1 else (64, 64, 3), dtype=np.uint8)
        for i in range(16):
            y, x = divmod(i, 4)
            label = "bright" if (i + n) % 2 else "dark"
            if label == "bright":
                scene[y * 16 : y * 16 + 16, x * 16 : x * 16 + 16] += 150
            rows.append([f"scene{n}.png", x * 16, y * 16, x * 16 + 16, y * 16 + 16, label])
        write_png(root / f"scene{n}.png", scene, mode)
    path = root / "crops.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "x0", "y0", "x1", "y1", "label"])
        writer.writerows(rows)
    return path


def write_noise_crops(root: Path, sources: int, size: int, boxes: int, seed: int = 0) -> Path:
    """A crop CSV over `sources` noise PNGs of size x size (noise does not compress, so each costs a real
    decode: ~3 ms at 512, ~12 ms at 1024), `boxes` 32x32 boxes each, two classes alternating."""
    rng = np.random.default_rng(seed)
    lines = ["path,x0,y0,x1,y1,label"]
    for n in range(sources):
        write_png(root / f"noise{n}.png", random_image(rng, size, size))
        for i in range(boxes):
            x, y = (37 * i) % (size - 32), (53 * i) % (size - 32)
            lines.append(f"noise{n}.png,{x},{y},{x + 32},{y + 32},{'ab'[(i + n) % 2]}")
    path = root / "crops.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def build_crops(csv_path: Path, **overrides):
    """crops.build on a crop CSV with the small settings the crop tests share (16x16, cache=memory, half of
    the rows for validation by a row split); `overrides` change any of them."""
    from datasets import crops  # here, not at the top: files.py alone writes files without importing torch

    args = dict(csv=str(csv_path), root=None, width=16, height=16, channels=3, cache="memory", cache_dir=None,
                val_fraction=0.5, mean=[0.5], std=[0.5], seed=0, split_by="row")  # as the tests' tiny runs split
    return crops.build(**{**args, **overrides})


def write_tiff(path: Path, array: np.ndarray, tile: tuple[int, int] | None = (16, 16), compression: str | None = "zstd",
               levels: list[np.ndarray] = (), **options) -> Path:
    """A TIFF of `array` (H, W) or (H, W, C) written by tifffile: tiled when `tile` is given, else in strips;
    `levels` are lower-resolution copies stored as SubIFDs (a pyramid, as OME-TIFF writers store it)."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    photometric = "rgb" if array.ndim == 3 and array.shape[2] in (3, 4) else "minisblack"
    common = {"tile": tile, "compression": compression, "photometric": photometric, **options}
    if tile is None:
        common["rowsperstrip"] = 8
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(array, subifds=len(levels) or None, **common)
        for level in levels:
            tif.write(level, subfiletype=1, **common)
    return path
