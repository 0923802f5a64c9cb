"""predict.py against the model's own forward pass, and its class map against a known mask, in one run.

    python -m benchmarks.predict_speed [--tiff-side 20000] [--png-side 4000] [--batch 256] [--out FILE]

What it does, all in one process:
1. Trains the tutorial CNN (grey 32x32 inputs, augment=dihedral, 15 epochs) on crops of three real texture
   photographs scikit-image ships (brick, grass, gravel; benchmarks/real_photos.py reads them offline):
   BOXES square boxes of 64-128 px per photo from its left half for training, as many from its right half for
   validation (32-64 px boxes scored 66-82%: too little of a brick to tell it).
2. Writes two mosaics of 256 x 256 tiles cut from the photos' right halves (never trained on), each tile a
   random texture in a random one of the 8 orientations, so every pixel's true class is known: a
   TIFF_SIDE x TIFF_SIDE grey tiled TIFF (zstd, 256 px tiles, written tile by tile: never whole in memory)
   and a PNG_SIDE x PNG_SIDE grey PNG.
3. Measures the model's forward throughput (windows/s: normalise, forward, softmax of a ready uint8 batch on
   the device, the work predict.py adds nothing to), then predict.py's windows/s on each mosaic (reading,
   resizing, batching and the forward; predictions.json's `seconds`, the window pass), alternating so both
   see the same machine: the ratio is predict.py's over the mean of the forward measurements around it.
4. Times the reading alone (read, cut, resize and batch every window, no model), which says whether reading
   or the model bounds the window pass.
5. Scores the class maps: the share of window centres whose class is the mosaic's class there.

Targets (issue 24): windows/s >= 0.8x the forward throughput on both inputs; agreement >= 85% for a model
that scores >= 90% on validation crops. On the CPU, torch computes on one thread (the reading thread takes
the other core); the load average is recorded, since other work on the machine moves both numbers.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

import training
from benchmarks import report
from benchmarks.real_photos import DEFAULT_WHEEL_CACHE, TEXTURES, photo_bytes
from commands import tta, windows
from commands.evaluation import load_classifier
from commands.prediction import block_reader, open_input, run_prediction
from datasets.crop_csv import write_crops
from training import schema

CONFIGS = str(Path(__file__).resolve().parent.parent / "configs")
TILE = 256  # pixels: mosaic tiles and TIFF tiles
BOXES = 600  # training boxes per texture (and as many validation boxes)


def _compose(name: str, *overrides: str):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def textures(wheel_cache: Path) -> dict[str, np.ndarray]:
    """Class name -> grey (512, 512) uint8 photograph."""
    encoded = photo_bytes(wheel_cache, TEXTURES)
    return {name.removesuffix(".png"): np.asarray(Image.open(io.BytesIO(data)).convert("L"))
            for name, data in encoded.items()}


def train(folder: Path, photos: dict[str, np.ndarray], epochs: int, seed: int,
          box: tuple[int, int] = (64, 128)) -> tuple[Path, float]:
    """The texture model: crops from the left halves train, from the right halves validate."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, photo in photos.items():
        Image.fromarray(photo).save(folder / f"{label}.png")
        height, width = photo.shape
        for split, (lo, hi) in (("train", (0, width // 2)), ("val", (width // 2, width))):
            for _ in range(BOXES):
                side = int(rng.integers(box[0], box[1] + 1))
                x0, y0 = int(rng.integers(lo, hi - side + 1)), int(rng.integers(0, height - side + 1))
                rows.append(dict(path=f"{label}.png", x0=x0, y0=y0, x1=x0 + side, y1=y0 + side, label=label,
                                 split=split))
    csv = write_crops(folder / "textures.csv", rows)
    run_dir = folder / "run"
    metrics = training.run(_compose("train", f"dataset.csv={csv}", "dataset.channels=1", "dataset.width=32",
                                    "dataset.height=32", "dataset.cache=memory", "augment=dihedral",
                                    f"trainer.epochs={epochs}", "trainer.device=cpu", "trainer.progress=false",
                                    f"trainer.seed={seed}", f"run_dir={run_dir}"))
    return run_dir / "checkpoints" / "best.pt", metrics["val/acc_best"]


def _tile(photos: list[np.ndarray], label: int, rng: np.random.Generator) -> np.ndarray:
    """A TILE x TILE piece of a photo's right half (never trained on) in a random orientation."""
    photo = photos[label]
    top = int(rng.integers(0, photo.shape[0] - TILE + 1))
    piece = photo[top:top + TILE, photo.shape[1] - TILE:]
    piece = np.rot90(piece, int(rng.integers(4)))
    return np.ascontiguousarray(piece[:, ::-1] if rng.integers(2) else piece)


def mosaic_labels(side: int, classes: int, seed: int) -> np.ndarray:
    """The class of each tile of a side x side mosaic."""
    tiles = -(-side // TILE)
    return np.random.default_rng(seed).integers(0, classes, size=(tiles, tiles))


def write_tiff(path: Path, side: int, photos: list[np.ndarray], labels: np.ndarray, seed: int) -> None:
    """A grey tiled TIFF written tile by tile (tifffile takes an iterator of tiles): never whole in memory."""
    import tifffile

    rng = np.random.default_rng(seed)
    tiles = (_tile(photos, int(label), rng) for label in labels.reshape(-1))
    tifffile.imwrite(path, tiles, shape=(side, side), dtype=np.uint8, tile=(TILE, TILE), compression="zstd",
                     photometric="minisblack", bigtiff=True)


def write_png(path: Path, side: int, photos: list[np.ndarray], labels: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = np.empty((labels.shape[0] * TILE, labels.shape[1] * TILE), dtype=np.uint8)
    for (r, c), label in np.ndenumerate(labels):
        image[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = _tile(photos, int(label), rng)
    Image.fromarray(image[:side, :side]).save(path)


def forward_rate(checkpoint: Path, batch_size: int, device: torch.device, seconds: float = 2.0) -> float:
    """Windows per second through the model alone: normalise, forward, softmax of one ready uint8 batch."""
    classifier = load_classifier(str(checkpoint), device)
    images = torch.randint(0, 256, (batch_size, *classifier.checkpoint["input_shape"]), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        for _ in range(3):  # warm-up: first calls allocate
            tta.probabilities(classifier.logits, images)
        _sync(device)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            tta.probabilities(classifier.logits, images)
            done += batch_size
        _sync(device)
    return done / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reading_rate(path: Path, item: dict, batch_size: int) -> float:
    """Windows per second of predict.py's reading alone (read, cut, resize, batch; no model): which of the two
    bounds the window pass."""
    reader = open_input(path, 1, None)
    g = windows.grid(reader.shape, tuple(item["window"]), tuple(item["stride"]), path)
    started = time.perf_counter()
    done = sum(len(index) for index, _ in windows.batches(reader, g, (1, 32, 32), batch_size, block_reader(reader)))
    return done / (time.perf_counter() - started)


def agreement(item: dict, labels: np.ndarray) -> float:
    """The share of windows whose class is the mosaic's class at the window's centre."""
    probabilities = np.load(Path(item["folder"]) / "probabilities.npy")
    rows, cols = np.arange(item["rows"]), np.arange(item["cols"])
    centre_y = item["origin"][0] + rows * item["stride"][0] + item["window"][0] // 2
    centre_x = item["origin"][1] + cols * item["stride"][1] + item["window"][1] // 2
    truth = labels[(centre_y // TILE)[:, None], (centre_x // TILE)[None, :]]
    return float((probabilities.argmax(0) == truth).mean())


def predict(checkpoint: Path, image: Path, run_dir: Path, batch_size: int, device: str, stride: str) -> dict:
    result = run_prediction(_compose("predict", f"checkpoint={checkpoint}", f"inputs=[{image}]",
                                     f"batch_size={batch_size}", f"device={device}", f"stride={stride}",
                                     "max_image_pixels=1000000000", f"run_dir={run_dir}"))
    return result["inputs"][0]


def main(tiff_side: int, png_side: int, batch_size: int, epochs: int, device_name: str, seed: int,
         wheel_cache: Path, work: Path) -> dict:
    schema.register()
    device = torch.device(device_name if device_name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)  # the model on one core; predict.py's reading thread on the other
    photos = textures(wheel_cache)
    started = time.perf_counter()
    checkpoint, val_acc = train(work, photos, epochs, seed)
    train_seconds = time.perf_counter() - started
    window = torch.load(checkpoint, weights_only=True)["box_size"]
    images = list(photos.values())
    results = {}
    forwards = [forward_rate(checkpoint, batch_size, device)]
    for kind, side, stride in (("tiff", tiff_side, "null"), ("png", png_side, "null")):
        labels = mosaic_labels(side, len(images), seed + side)
        path = work / f"mosaic_{side}.{'tif' if kind == 'tiff' else 'png'}"
        started = time.perf_counter()
        (write_tiff if kind == "tiff" else write_png)(path, side, images, labels, seed)
        written = time.perf_counter() - started
        started = time.perf_counter()
        item = predict(checkpoint, path, work / f"predict_{kind}", batch_size, str(device), stride)
        total = time.perf_counter() - started
        forwards.append(forward_rate(checkpoint, batch_size, device))
        reading = reading_rate(path, item, batch_size)
        rate = item["windows"] / item["seconds"]
        results[kind] = {"side": side, "file_bytes": path.stat().st_size, "write_seconds": written,
                         "windows": item["windows"], "window": item["window"], "stride": item["stride"],
                         "windows_per_second": rate, "forward_windows_per_second": float(np.mean(forwards[-2:])),
                         "ratio": rate / float(np.mean(forwards[-2:])), "window_pass_seconds": item["seconds"],
                         "reading_alone_windows_per_second": reading,
                         "total_seconds": total, "agreement": agreement(item, labels)}
    return {"device": str(device), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_average": list(os.getloadavg()), "batch_size": batch_size, "val_acc_on_crops": val_acc,
            "train_seconds": train_seconds, "median_box": window, "forward_windows_per_second": forwards,
            **results}


def _print(result: dict) -> None:
    print(f"device {result['device']} (torch {result['torch']}, {result['torch_threads']} thread(s)), batch "
          f"{result['batch_size']}, load average {', '.join(f'{x:.1f}' for x in result['load_average'])}")
    print(f"texture model: {result['val_acc_on_crops']:.1%} on validation crops (trained in "
          f"{result['train_seconds']:.0f} s); window {result['median_box']} (median training box)")
    print(f"{'input':<22} {'windows':>8} {'predict w/s':>12} {'forward w/s':>12} {'ratio':>6} {'reading w/s':>12} "
          f"{'agreement':>10}")
    for kind in ("tiff", "png"):
        r = result[kind]
        name = f"{r['side']}^2 {'tiled TIFF' if kind == 'tiff' else 'PNG'}"
        print(f"{name:<22} {r['windows']:>8} {r['windows_per_second']:>12.0f} {r['forward_windows_per_second']:>12.0f} "
              f"{r['ratio']:>6.2f} {r['reading_alone_windows_per_second']:>12.0f} {r['agreement']:>10.1%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiff-side", type=int, default=20_000)
    parser.add_argument("--png-side", type=int, default=4_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wheel-cache", type=Path, default=DEFAULT_WHEEL_CACHE)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/predict_speed.json"))
    args = parser.parse_args()

    def run() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            result = main(args.tiff_side, args.png_side, args.batch, args.epochs, args.device, args.seed,
                          args.wheel_cache, Path(tmp))
        _print(result)
        report.write(result, args.out)

    report.run(run)
    sys.exit(0)
