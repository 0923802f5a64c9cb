"""The bundled demo: a few large PNGs tiled with patterned patches, and a crop CSV that names each patch.

Made deterministically (fixed seed) on first use under data/demo/, so `python train.py` works offline.
Five classes a small CNN can learn, not trivially: stripes at four orientations and a disc, each with
random colours, period, phase, noise and an off-centre box of random size (so every crop is resized).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.crop_csv import write_crops

log = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent.parent / "data" / "demo"
CLASSES = ("disc", "stripes_antidiagonal", "stripes_diagonal", "stripes_horizontal", "stripes_vertical")
N_IMAGES = 30
GRID = 10  # slots per side of each image
SLOT = 48  # pixels per slot side; each image is GRID * SLOT square
SEED = 20261125


def _patch(rng: np.random.Generator, label: str) -> np.ndarray:
    """One SLOT x SLOT RGB patch of the given class, as float32 in 0..255."""
    y, x = np.mgrid[0:SLOT, 0:SLOT].astype(np.float32)
    fg, bg = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    while np.abs(fg - bg).sum() < 150:  # enough contrast that the pattern is visible in every channel mix
        fg, bg = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    if label == "disc":
        cy, cx = rng.uniform(SLOT * 0.35, SLOT * 0.65, size=2)
        radius = rng.uniform(SLOT * 0.2, SLOT * 0.35)
        mask = (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    else:
        coordinate = {"stripes_horizontal": y, "stripes_vertical": x, "stripes_diagonal": x + y,
                      "stripes_antidiagonal": x - y}[label]
        period = rng.uniform(7, 14)
        mask = np.sin(2 * np.pi * coordinate / period + rng.uniform(0, 2 * np.pi)) > 0
    patch = np.where(mask[:, :, None], fg, bg)
    return patch + rng.normal(0, 25, size=patch.shape).astype(np.float32)


def generate(directory: Path) -> Path:
    """Write the demo images and crops.csv into `directory`; returns the CSV path."""
    rng = np.random.default_rng(SEED)
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(N_IMAGES):
        canvas = np.zeros((GRID * SLOT, GRID * SLOT, 3), dtype=np.float32)
        name = f"scene_{n:02d}.png"
        for row in range(GRID):
            for col in range(GRID):
                label = CLASSES[rng.integers(len(CLASSES))]
                top, left = row * SLOT, col * SLOT
                canvas[top : top + SLOT, left : left + SLOT] = _patch(rng, label)
                h, w = rng.integers(SLOT * 2 // 3, SLOT + 1, size=2)
                y0, x0 = top + rng.integers(0, SLOT - h + 1), left + rng.integers(0, SLOT - w + 1)
                rows.append({"path": name, "x0": x0, "y0": y0, "x1": x0 + w, "y1": y0 + h, "label": label})
        Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(directory / name)
    return write_crops(directory / "crops.csv", rows)


def ensure_demo(directory: Path = DEMO_DIR) -> Path:
    """The demo CSV, generated on first use; a temp folder renamed into place, so runs never see half of it."""
    csv_path = directory / "crops.csv"
    if csv_path.exists():
        return csv_path
    log.info("demo data: generating %d images and %s (first run only)", N_IMAGES, csv_path)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    try:
        generate(tmp)
        directory.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, directory)
    except OSError:
        if not csv_path.exists():  # not a concurrent run that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return csv_path
