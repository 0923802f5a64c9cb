"""Accuracy per training second of the tutorial CNN under each recipe, side by side on the same generated data.

    python -m benchmarks.recipes [--scale 1.0] [--out FILE.json]

Data (harder than the demo, whose stripes a few epochs learn): 10 texture classes, each a radial frequency
band (5) crossed with a texture kind (2: summed gratings at random orientations, or random dots), in random
colours with noise. Classes do not depend on orientation, so flips and transposes keep labels. Each
class has its own 384x384 source images (4 per class, 40 crops from each half: 1600 train, 1600 val); training crops (32x32 cut from 24-40 px boxes) come from the left
half of each image and validation crops from the right half, so no pixel is shared.
Every recipe runs through `training.run` (the app itself) with one seed; seconds are the run's training
time (sum of `train/epoch_seconds`, without data preparation or validation).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import training
from datasets.crop_csv import write_crops
from training import schema

ROOT = Path(__file__).resolve().parent.parent
SIZE = 384
BANDS = (3.0, 4.5, 6.5, 9.0, 12.0)  # periods in pixels of each class's texture
KINDS = ("gratings", "dots")
RECIPES = {  # name -> overrides; trainer.epochs last, so --scale can change it
    "tutorial (batch 4, lr 0.001)": ["experiment=tutorial", "trainer.epochs=2"],
    "default (batch 64, lr 0.01)": ["trainer.epochs=10"],
    "default, 30 epochs": ["trainer.epochs=30"],
    "experiment=fast": ["experiment=fast"],
    "experiment=fast scheduler=onecycle": ["experiment=fast", "scheduler=onecycle"],
    "experiment=fast augment=standard": ["experiment=fast", "augment=standard"],
}


def _texture(rng: np.random.Generator, period: float, kind: str) -> np.ndarray:
    """One SIZE x SIZE float image in 0..1 of a class's texture."""
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    if kind == "gratings":
        image = np.zeros((SIZE, SIZE), np.float32)
        for _ in range(3):
            angle = rng.uniform(0, np.pi)
            p = period * rng.uniform(0.85, 1.15)
            image += np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / p + rng.uniform(0, 2 * np.pi))
        image = image / 6 + 0.5
    else:
        image = np.zeros((SIZE, SIZE), np.float32)
        count = int(SIZE * SIZE / (period * period * 2.5))
        cy, cx = rng.uniform(0, SIZE, size=(2, count))
        radius = period * 0.3
        for yy, xx in zip(cy.astype(int), cx.astype(int)):
            r = int(np.ceil(radius))
            y0, y1, x0, x1 = max(yy - r, 0), min(yy + r + 1, SIZE), max(xx - r, 0), min(xx + r + 1, SIZE)
            image[y0:y1, x0:x1] = np.maximum(
                image[y0:y1, x0:x1], ((y[y0:y1, x0:x1] - yy) ** 2 + (x[y0:y1, x0:x1] - xx) ** 2 <= radius**2))
    return image


def generate(directory: Path, images_per_class: int = 4, crops_per_half: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for band in BANDS:
        for kind in KINDS:
            label = f"{kind}_{band:g}px"
            for n in range(images_per_class):
                fg, bg = rng.uniform(0, 255, size=(2, 3))
                texture = _texture(rng, band, kind)[:, :, None]
                image = texture * fg + (1 - texture) * bg + rng.normal(0, 40, size=(SIZE, SIZE, 3))
                name = f"{label}_{n}.png"
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(directory / name)
                for split, left in (("train", 0), ("val", SIZE // 2)):
                    for _ in range(crops_per_half):
                        side = int(rng.integers(24, 41))
                        x0 = left + int(rng.integers(0, SIZE // 2 - side + 1))
                        y0 = int(rng.integers(0, SIZE - side + 1))
                        rows.append({"path": name, "x0": x0, "y0": y0, "x1": x0 + side, "y1": y0 + side,
                                     "label": label, "split": split})
    return write_crops(directory / "crops.csv", rows)


def train_seconds(run_dir: Path) -> float:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return sum(e.value for e in events.Scalars("train/epoch_seconds"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every recipe's epochs (min 1)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "recipes.json"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    schema.register()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = generate(Path(tmp) / "textures")
        for name, overrides in RECIPES.items():
            with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
                cfg = compose(config_name="train", overrides=[
                    *overrides, "dataset=crops", f"dataset.csv={csv_path}", "dataset.val_fraction=0.2",
                    f"run_dir={Path(tmp) / str(len(results))}", "trainer.progress=false", "trainer.device=cpu"])
            cfg.trainer.epochs = max(1, round(cfg.trainer.epochs * args.scale))
            metrics = training.run(cfg)
            results.append({"recipe": name, "epochs": cfg.trainer.epochs, "batch": cfg.loader.batch_size,
                            "val/acc": metrics["val/acc"], "val/acc_best": metrics["val/acc_best"],
                            "train_seconds": train_seconds(Path(cfg.run_dir))})
    print("| recipe | epochs | batch | train s | val acc (last) | best |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['recipe']} | {r['epochs']} | {r['batch']} | {r['train_seconds']:.1f} | {r['val/acc']:.1%} "
              f"| {r['val/acc_best']:.1%} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
