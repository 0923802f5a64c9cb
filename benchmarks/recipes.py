"""Validation accuracy of the tutorial CNN under each recipe, over several seeds, on held-out real photographs
and on generated textures, side by side in one process: mean, sample standard deviation and training time.

    python -m benchmarks.recipes [--data photos generated] [--seeds 3] [--recipes NAME ...] [--scale 1.0]
                                 [--threads 1] [--out FILE.json]

One run's validation accuracy moves by several points from seed to seed (and epoch to epoch), so a recipe is
called better than the default only where the difference of the means exceeds the spread (the sum of the two
standard deviations); otherwise the table says "within spread". TTA is compared with the same runs without it:
better only where the mean of the per-seed differences exceeds their standard deviation.

Data, both with train and validation crops from different parts of each source image (no pixel shared):
- photos: benchmarks/real_photos.py's held_out.csv: the ten photographs scikit-image ships (one class each), grey,
  200 random square boxes of 16-64 px per half, training boxes from each photo's left half and validation boxes
  from its right half (2,000 and 2,000 crops at 32x32);
- generated: 10 texture classes, a radial frequency band (5) crossed with a texture kind (2: summed gratings at
  random orientations, or random dots), in random colours with noise, 4 images of 384x384 per class, 40 crops
  (24-40 px boxes) from each half (1,600 train, 1,600 val). Classes do not depend on orientation.

Every recipe runs through `training.run` (the app itself), seeds 0..N-1 (`trainer.seed`: the initial weights,
the batch order and augmentation); the crops are the same for every seed. "val acc" is the last epoch's
accuracy (the model a run ends with), "best" the best epoch's (chosen on the validation set, so optimistic).
A recipe with a test-time augmentation also scores its last checkpoint averaging softmax over the views
(commands/tta.py: "with TTA", the same runs); its plain accuracy (tta none) is checked equal to the run's own. A
recipe with trainer.ema also scores its live weights, bit for bit those of the same recipe without EMA: "without EMA
and TTA", against which "EMA + TTA vs neither" compares the same runs seed by seed. Seconds are training
time (the sum of `train/epoch_seconds`: no data preparation or validation); the load average of the machine
is recorded before and after, since other work on it slows training (accuracy does not depend on it at
fixed threads).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import training
from benchmarks import real_photos
from commands import tta
from commands.evaluation import load_classifier
from datasets.crop_csv import write_crops
from training import schema
from training.build import build_data, saved_mapping
from training.checkpoint import load_weights

ROOT = Path(__file__).resolve().parent.parent
SIZE = 384
BANDS = (3.0, 4.5, 6.5, 9.0, 12.0)  # periods in pixels of each class's texture
KINDS = ("gratings", "dots")
REFERENCE = "default"


@dataclass(frozen=True)
class Recipe:
    name: str
    overrides: list[str] = field(default_factory=list)  # trainer.epochs is scaled by --scale
    tta: str = "none"  # also scored with this test-time augmentation (commands/tta.py): val/acc_tta
    tta_scales: tuple = (1.0,)  # and at these zooms (commands/tta.py's tta_scales)


RECIPES = [
    Recipe("tutorial", ["experiment=tutorial", "trainer.epochs=2"]),
    Recipe(REFERENCE, ["trainer.epochs=10"]),
    Recipe("default, 30 epochs", ["trainer.epochs=30"]),
    Recipe("fast", ["experiment=fast"]),
    Recipe("fast standard", ["experiment=fast", "augment=standard"], tta="hflip"),
    Recipe("fast dihedral", ["experiment=fast", "augment=dihedral"], tta="dihedral"),
    # The photo goal's preset (docs/performance.md): the photos are grey, so one channel. Its EMA run's live
    # weights are the same recipe without EMA, scored with and without the TTA from the same runs; the TTA's
    # views also zoomed out to 0.8, and scored without that zoom too.
    Recipe("small_data", ["experiment=small_data", "dataset.channels=1"], tta="dihedral", tta_scales=(1.0, 0.8)),
    # The same with zooms of 1/1.4 to 1.4x: the photo boxes span 16-64 px, so one object is seen at several scales.
    Recipe("small_data scale", ["experiment=small_data", "dataset.channels=1", "augment.scale=1.4"], tta="dihedral"),
]


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


class Scorer:
    """A run's last.pt and its validation split, loaded once and scored as often as asked: up to five ways per run
    (plain, TTA, TTA without the zooms, and the live weights of an EMA run plain and with TTA)."""

    def __init__(self, checkpoint: Path):
        self.device, self.path = torch.device("cpu"), str(checkpoint)
        self.classifier = load_classifier(self.path, self.device)
        saved = self.classifier.saved
        self.val_loader = build_data(saved.dataset, saved.loader, saved.trainer.seed, self.device, train=False,
                                     fixed=saved_mapping(self.classifier.checkpoint, saved.dataset)).val_loader

    @torch.no_grad()
    def accuracy(self, mode: str, weights: str = "model", scales: tuple = (1.0,)) -> float:
        """The accuracy on the run's validation split, softmax averaged over `mode`'s views at `scales`.
        `weights`: "model" (what the run validated: the moving average under trainer.ema) or "training_model" (a
        trainer.ema run's live weights, the ones an otherwise equal run without EMA ends with)."""
        checkpoint = self.classifier.checkpoint
        load_weights(self.classifier.model, {**checkpoint, "model": checkpoint[weights]}, self.path)
        correct = total = 0
        for images, targets in self.val_loader:
            predicted = tta.probabilities(self.classifier.logits, images.to(self.device), mode, scales).argmax(1)
            correct += int((predicted == targets).sum())
            total += len(targets)
        return correct / total


def run_one(recipe: Recipe, cfg: DictConfig, seed: int, run_dir: Path, scale: float) -> dict:
    """One run of `recipe` (`cfg`: its composed config, shared by its seeds) with `seed` in `run_dir`."""
    cfg = copy.deepcopy(cfg)
    cfg.trainer.seed, cfg.run_dir = seed, str(run_dir)
    cfg.trainer.epochs = max(1, round(cfg.trainer.epochs * scale))
    metrics = training.run(cfg)
    result = {"seed": seed, "epochs": cfg.trainer.epochs, "batch": cfg.loader.batch_size,
              "val/acc": metrics["val/acc"], "val/acc_best": metrics["val/acc_best"],
              "train_seconds": train_seconds(run_dir)}
    if recipe.tta == "none" and cfg.trainer.get("ema") is None:
        return result
    last = Scorer(run_dir / "checkpoints" / "last.pt")
    if recipe.tta != "none":
        plain = last.accuracy("none")
        if abs(plain - metrics["val/acc"]) > 1e-9:  # the scoring path must be the run's own
            raise RuntimeError(f"{recipe.name}: last.pt scores {plain} without TTA, the run reported "
                               f"{metrics['val/acc']}")
        result["val/acc_tta"] = last.accuracy(recipe.tta, scales=recipe.tta_scales)
        if tuple(recipe.tta_scales) != (1.0,):  # the same views without the zooms: what the zooms add
            result["val/acc_tta_unzoomed"] = last.accuracy(recipe.tta)
    if cfg.trainer.get("ema") is not None:  # the same run without the average: its live weights, plain and with TTA
        result["val/acc_live"] = last.accuracy("none", "training_model")
        if recipe.tta != "none":
            result["val/acc_live_tta"] = last.accuracy(recipe.tta, "training_model", recipe.tta_scales)
    return result


def compose_recipe(recipe: Recipe, csv_path: Path) -> DictConfig:
    """train.py's config for `recipe` on `csv_path` (composed once: ~0.1 s of CPU a compose); run_one sets the
    seed and the run folder."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=[
            *recipe.overrides, "dataset=crops", f"dataset.csv={csv_path}", "trainer.progress=false",
            "trainer.device=cpu", "run_dir=unset"])


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def verdict(stats: dict, reference: dict) -> str:
    """better/worse than the reference only where the means differ by more than the two sds together."""
    difference, allowed = stats["mean"] - reference["mean"], stats["sd"] + reference["sd"]
    if difference > allowed:
        return f"better (+{100 * difference:.1f} > {100 * allowed:.1f})"
    if difference < -allowed:
        return f"worse ({100 * difference:.1f} < -{100 * allowed:.1f})"
    return f"within spread ({100 * difference:+.1f}, spread {100 * allowed:.1f})"


def paired_verdict(runs: list[dict], key: str, against: str) -> str:
    """`key` against `against` scored on the same runs (TTA, or the EMA model, against the plain live model):
    the per-seed differences, better or worse only where their mean exceeds their standard deviation."""
    differences = spread([run[key] - run[against] for run in runs])
    mean, sd = 100 * differences["mean"], 100 * differences["sd"]
    if mean > sd:
        return f"better (+{mean:.1f} > {sd:.1f})"
    if mean < -sd:
        return f"worse ({mean:.1f} < -{sd:.1f})"
    return f"within spread ({mean:+.1f}, sd {sd:.1f})"


def stamp(threads: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else \
        platform.processor()
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads,
            "torch": torch.__version__, "python": platform.python_version(), "load_average_1min": os.getloadavg()[0]}


def table(data: str, rows: list[dict]) -> str:
    reference = next((r for r in rows if r["recipe"] == REFERENCE), None)
    lines = [f"{data}:", "| recipe | epochs | batch | train s | val acc (last) | best epoch | vs default | with TTA "
             "| TTA vs without | without EMA and TTA | EMA + TTA vs neither |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | --- |"]

    def percent(stats: dict) -> str:
        return f"{100 * stats['mean']:.1f} ± {100 * stats['sd']:.1f}"

    for r in rows:
        acc = r["val/acc"]
        against = "" if reference is None or r is reference else verdict(acc, reference["val/acc"])
        zooms = f", tta_scales {list(r['tta_scales'])}" if tuple(r.get("tta_scales", (1.0,))) != (1.0,) else ""
        with_tta = f"{percent(r['val/acc_tta'])} ({r['tta']}{zooms})" if "val/acc_tta" in r else ""
        tta_gain = paired_verdict(r["runs"], "val/acc_tta", "val/acc") if "val/acc_tta" in r else ""
        # An EMA run's live weights are those of the same run without EMA (tests/test_ema.py): the recipe without
        # both, against the same runs with both (the average, scored with the TTA).
        neither = percent(r["val/acc_live"]) if "val/acc_live" in r else ""
        both_gain = paired_verdict(r["runs"], "val/acc_tta", "val/acc_live") if "val/acc_live" in r and with_tta else ""
        lines.append(f"| {r['recipe']} | {r['epochs']} | {r['batch']} | {r['train_seconds']['mean']:.1f} | {percent(acc)} | "
                     f"{percent(r['val/acc_best'])} | {against} | {with_tta} | {tta_gain} | {neither} | {both_gain} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", choices=("photos", "generated"), default=["photos", "generated"])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per recipe (0..N-1)")
    parser.add_argument("--recipes", nargs="+", default=[r.name for r in RECIPES], help="names from RECIPES")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every recipe's epochs (min 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a busy machine)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "recipes.json"))
    parser.add_argument("--smoke", action="store_true",
                        help="check the benchmark itself: tiny generated data, 2 seeds, 1 epoch per recipe")
    args = parser.parse_args(argv)
    if args.smoke:
        args.data, args.seeds, args.scale = ["generated"], 2, 0.0
    unknown = set(args.recipes) - {r.name for r in RECIPES}
    if unknown:
        parser.error(f"unknown recipes {sorted(unknown)}; choose from {[r.name for r in RECIPES]}")
    torch.set_num_threads(args.threads)
    schema.register()
    recipes = [r for r in RECIPES if r.name in args.recipes]
    report = {"stamp": stamp(args.threads), "seeds": args.seeds, "scale": args.scale, "smoke": args.smoke, "data": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"photos": lambda: real_photos.make_photo_crops(Path(tmp) / "photos").held_out_csv,
                   "generated": lambda: generate(Path(tmp) / "textures", *((1, 8) if args.smoke else ()))}
        for data in args.data:
            csv_path, rows = sources[data](), []
            for recipe in recipes:
                cfg = compose_recipe(recipe, csv_path)
                runs = [run_one(recipe, cfg, seed, Path(tmp) / "runs" / f"{data}-{len(rows)}-{seed}", args.scale)
                        for seed in range(args.seeds)]
                row = {"recipe": recipe.name, "overrides": recipe.overrides, "tta": recipe.tta,
                       "tta_scales": list(recipe.tta_scales), "epochs": runs[0]["epochs"], "batch": runs[0]["batch"],
                       "runs": runs}
                row |= {key: spread([run[key] for run in runs]) for key in ("val/acc", "val/acc_best", "train_seconds")}
                row |= {key: spread([run[key] for run in runs])
                        for key in ("val/acc_tta", "val/acc_tta_unzoomed", "val/acc_live", "val/acc_live_tta")
                        if key in runs[0]}
                rows.append(row)
                print(f"{data} {recipe.name}: {100 * row['val/acc']['mean']:.1f} ± {100 * row['val/acc']['sd']:.1f} "
                      f"in {row['train_seconds']['mean']:.1f} s", flush=True)
                if "val/acc_tta_unzoomed" in row:
                    print(f"  tta_scales {list(recipe.tta_scales)} against {recipe.tta} alone: "
                          f"{paired_verdict(runs, 'val/acc_tta', 'val/acc_tta_unzoomed')}", flush=True)
            report["data"][data] = rows
    report["stamp"]["load_average_1min_after"] = os.getloadavg()[0]
    print(f"\n{report['stamp']}\n")
    for data, rows in report["data"].items():
        print(table(data, rows) + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
