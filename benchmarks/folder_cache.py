"""How much faster a second cache=disk run of an ImageFolder prepares its data than the first, side by side.

    python -m benchmarks.folder_cache [--smoke] [--out FILE.json]

Data (generated, deterministic): JPEG photos-like images (smooth colour fields plus noise, 256x256, ~15-25 kB
each) in 10 class folders, as an ImageFolder of a few thousand files. Cases, each timed in every round, best
of the rounds, every one building the whole bundle (listing, split, decode or map, normalisation):
  memory        cache=memory: every file decoded and resized to 32x32, held in memory
  disk-first    cache=disk into an empty cache folder: decoded once, written to the cache file
  disk-second   cache=disk again: the listing read and every file stat'ed, the cache memory-mapped
Target: disk-first / disk-second >= 10 (the cache must spare the decode it exists for).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.report import run as run_benchmark, write as write_report
from cores import available_cores
from datasets import folders

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "full": {"per_class": 300, "side": 256, "rounds": 3},
    # Every case once on a little data: proves the benchmark runs (tests/test_benchmark.py); numbers mean nothing.
    "smoke": {"per_class": 3, "side": 48, "rounds": 1},
}
CLASSES, SIZE = 10, 32
TARGET = 10.0


def generate(root: Path, per_class: int, side: int) -> Path:
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            coarse = rng.integers(0, 256, size=(side // 32, side // 32, 3), dtype=np.uint8)
            smooth = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BILINEAR), dtype=np.int16)
            noisy = np.clip(smooth + rng.integers(-12, 13, size=smooth.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / f"class{c}" / f"{i}.jpg", quality=90)
    return root


def build(root: Path, cache: str, cache_dir: Path):
    return folders.build_imagefolder(str(root), width=SIZE, height=SIZE, channels=3, cache=cache,
                                     cache_dir=str(cache_dir), val_fraction=0.2, mean=[0.5], std=[0.5], seed=0)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every case once on little data: checks it runs")
    parser.add_argument("--out", type=Path, help="JSON file (default: outputs/benchmarks/folder_cache[-smoke].json)")
    args = parser.parse_args(argv)
    size = "smoke" if args.smoke else "full"
    settings = SETTINGS[size]
    out = args.out or ROOT / "outputs" / "benchmarks" / f"folder_cache{'' if size == 'full' else '-smoke'}.json"
    load_before = os.getloadavg()
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "images", settings["per_class"], settings["side"])
        for round_ in range(settings["rounds"]):  # interleaved, so a burst of load elsewhere hits one round
            cache_dir = Path(tmp) / f"cache{round_}"
            found = {"memory": timed(lambda: build(root, "memory", cache_dir)),
                     "disk-first": timed(lambda: build(root, "disk", cache_dir)),
                     "disk-second": timed(lambda: build(root, "disk", cache_dir))}
            shutil.rmtree(cache_dir)
            for name, seconds in found.items():
                best[name] = min(best.get(name, float("inf")), seconds)
                print(f"  round {round_ + 1}/{settings['rounds']} {name:12s} {seconds:8.3f} s", file=sys.stderr)
    ratio = best["disk-first"] / best["disk-second"]
    files = CLASSES * settings["per_class"]
    report = {
        "command": " ".join(["python -m benchmarks.folder_cache", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cores": available_cores(), "torch": torch.__version__,
                    "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "settings": {**settings, "files": files, "shape": [3, SIZE, SIZE]},
        "seconds": {name: round(value, 4) for name, value in best.items()},
        "target": {"what": "disk-first / disk-second seconds", "ratio": round(ratio, 2), "target": TARGET,
                   "met": ratio >= TARGET},
    }
    print("| case | seconds | us per file |\n| --- | ---: | ---: |")
    for name, seconds in best.items():
        print(f"| `{name}` | {seconds:.3f} | {seconds / files * 1e6:.1f} |")
    print(f"\nfirst / second cache=disk run: {ratio:.1f}x (needed >= {TARGET}x: {'yes' if ratio >= TARGET else 'no'}); "
          f"load {report['machine']['load_average_before_after']}; JSON: {out}")
    write_report(report, out)
    return report


if __name__ == "__main__":
    run_benchmark(main)
