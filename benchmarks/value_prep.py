"""What dataset.value_range and dataset.mean/std=auto add to data preparation, side by side in one process.

    python -m benchmarks.value_prep [--quick | --smoke] [--out FILE.json]

Data: float32 .npy "spectrograms" (values in dB, outside [0, 1], each file its own level) cut into strips
of random width, resized to 32x32x1; and the throughput benchmark's PNG boxes (demo scenes, 32x32x3).
Each case is datasets.crops.build with cache=memory (and cache=none for the arrays, where preparation is
the value scan alone plus, with auto, one decode pass); cases run in round-robin order and the fastest
of the repeats is kept. The scan and the mean/std pass are also timed alone, which a busy machine blurs
less than the difference of two whole preparations. Ratios are against per_file with given mean/std, the
settings before these keys existed: per_file already read each whole .npy once for its min/max, which the
scan now does up front.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.throughput import random_boxes
from datasets import crops, demo, values
from datasets.crop_csv import read_crops
from datasets.transforms import scan_arrays
from datasets.crop_csv import write_crops
from benchmarks.report import run as run_benchmark, write as write_report

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "full": {"files": 32, "height": 256, "width": 4096, "rows": 40_000, "png_rows": 40_000, "repeats": 3},
    "quick": {"files": 16, "height": 256, "width": 4096, "rows": 20_000, "png_rows": 20_000, "repeats": 3},
    "smoke": {"files": 2, "height": 32, "width": 256, "rows": 40, "png_rows": 40, "repeats": 1},
}
RANGES = {"per_file": "per_file", "global": "global", "given": [-100.0, 20.0]}


def spectrograms(folder: Path, files: int, height: int, width: int, rows: int) -> Path:
    """`files` float32 arrays (dB: -90..+10 shifted per file) and a strip CSV of `rows` random strips."""
    rng = np.random.default_rng(0)
    for n in range(files):
        level = rng.uniform(-30, 0)
        np.save(folder / f"spec{n:02d}.npy", (rng.normal(-50, 10, (height, width)) + level).astype(np.float32))
    strips = []
    for _ in range(rows):
        w = int(rng.integers(24, 97))
        start = int(rng.integers(0, width - w + 1))
        strips.append({"path": f"spec{int(rng.integers(files)):02d}.npy", "start": start, "end": start + w,
                       "label": int(rng.integers(10))})
    return write_crops(folder / "strips.csv", strips, strip=True)


def prep_seconds(csv: Path, channels: int, cache: str, value_range, auto: bool) -> float:
    started = time.perf_counter()
    statistic = "auto" if auto else [0.5]
    crops.build(csv=str(csv), root=None, width=32, height=32, channels=channels, cache=cache, cache_dir=None,
                val_fraction=0.2, mean=statistic, std=statistic, seed=0, value_range=value_range)
    return time.perf_counter() - started


def components(csv: Path, repeats: int) -> dict[str, float]:
    """The added work alone, fastest of `repeats`: the global scan over every array file, and the mean/std
    counting pass over the in-memory training split, beside the whole per_file preparation they add to."""
    paths = read_crops(csv, None).crops.used_files()
    bundle = crops.build(csv=str(csv), root=None, width=32, height=32, channels=1, cache="memory", cache_dir=None,
                         val_fraction=0.2, mean=[0.5], std=[0.5], seed=0, value_range="per_file")
    best = {"scan_global": float("inf"), "mean_std_auto": float("inf")}
    for _ in range(repeats):
        started = time.perf_counter()
        scan_arrays(paths, "global")
        best["scan_global"] = min(best["scan_global"], time.perf_counter() - started)
        started = time.perf_counter()
        values.normalization("auto", "auto", bundle.train, 1)
        best["mean_std_auto"] = min(best["mean_std_auto"], time.perf_counter() - started)
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="less data")
    size.add_argument("--smoke", action="store_true", help="every case once on tiny data: checks it runs")
    parser.add_argument("--out", type=Path, help="JSON file (default: outputs/benchmarks/value_prep[-SIZE].json)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steady on a busy machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = "quick" if args.quick else "smoke" if args.smoke else "full"
    settings = SETTINGS[size]
    out = args.out or ROOT / "outputs" / "benchmarks" / f"value_prep{'' if size == 'full' else '-' + size}.json"
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        arrays = spectrograms(folder, settings["files"], settings["height"], settings["width"], settings["rows"])
        demo.generate(folder)
        pngs = random_boxes(folder, settings["png_rows"])
        cases = {}
        for cache in ("memory", "none"):
            for name, value_range in RANGES.items():
                for auto in (False, True):
                    cases[f"npy/{cache}/{name}/{'auto' if auto else 'given'}"] = (arrays, 1, cache, value_range, auto)
        for auto in (False, True):
            cases[f"png/memory/-/{'auto' if auto else 'given'}"] = (pngs, 3, "memory", "global", auto)
        parts = components(arrays, settings["repeats"])
        best = dict.fromkeys(cases, float("inf"))
        for _ in range(settings["repeats"]):
            for name, case in cases.items():
                best[name] = min(best[name], prep_seconds(*case))
    ratios = {name: seconds / best[f"{name.rsplit('/', 2)[0]}/per_file/given" if name.startswith("npy")
                                    else "png/memory/-/given"] for name, seconds in best.items()}
    report = {
        "command": " ".join(["python -m benchmarks.value_prep", *(argv if argv is not None else sys.argv[1:])]),
        "settings": settings, "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "seconds": {name: round(value, 4) for name, value in best.items()},
        "vs_per_file_given": {name: round(value, 3) for name, value in ratios.items()},
        "components_seconds": {name: round(value, 4) for name, value in parts.items()},
    }
    print("| case (data/cache/value_range/mean,std) | prep seconds | vs per_file, given |\n| --- | ---: | ---: |")
    for name in cases:
        print(f"| `{name}` | {best[name]:.3f} | {ratios[name]:.2f}x |")
    baseline = best["npy/memory/per_file/given"]
    for name, seconds in parts.items():
        print(f"| `npy/memory: {name} alone` | {seconds:.3f} | {seconds / baseline:.3f}x |")
    write_report(report, out)
    print(f"JSON: {out}")
    return report


if __name__ == "__main__":
    run_benchmark(main)
