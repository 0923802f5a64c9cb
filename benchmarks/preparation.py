"""How long preparing in-memory crops takes, against a plain PIL script and one training epoch, side by side.

    python -m benchmarks.preparation [--smoke] [--out FILE.json]

Data (generated, deterministic): 48 grey PNGs of 1024x1024 (smooth shapes plus noise, ~0.7 MB each) and
4,000 boxes per file, 192,000 rows. Each file has 4 box sizes drawn from 16..96 px a side (a few sizes per
file, as when objects of a few kinds are boxed); every box is resized to 32x32 at 3 channels (CIFAR's shape),
10 random classes, no split column (the seeded split). Cases, each timed in every round, best of the rounds:
  reference      a plain script: csv.DictReader, each file opened once with PIL and converted to RGB (the
                 channels training wants), each box cropped and resized with PIL (bilinear), stored in one
                 uint8 array. reference-grey resizes in grey and repeats: the fastest plain PIL can do here
  app            datasets.crops.build(cache=memory): CSV read, every row checked, crops cut, seeded split
  read-csv       datasets.crop_csv.read_crops alone (the CSV part of app)
  epoch          one training epoch of the tutorial CNN at batch 256 (device loader) on app's training split,
                 from its throughput over a timed window (training a whole epoch each round takes too long)
Targets: app / reference <= 0.5 and app / epoch <= 0.4. Also the peak memory of a cache=memory build
above the process's baseline against its uint8 bytes (<= 1.2), and of a cache=disk build, which streams to
its file (benchmarks/peak_memory.py, each in its own process). The grey sources are stored with one
channel; beside them, the peak of a cache=memory build of the same scenes saved as RGB PNGs (each grey value
in all three channels), which the app stores as 3 channels: the two peaks side by side (grey_vs_rgb_peak).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.peak_memory import in_own_process as peak_in_own_process, main as measure_peak
from datasets import crops
from datasets.crop_csv import read_crops, write_crops
from benchmarks.report import run as run_benchmark, write as write_report
from cores import available_cores

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "full": {"files": 48, "side": 1024, "per_file": 4000, "rounds": 3, "train_seconds": 3.0},
    # Every case once on a little data: proves the benchmark runs (tests/test_benchmark.py); numbers mean nothing.
    "smoke": {"files": 3, "side": 192, "per_file": 40, "rounds": 1, "train_seconds": 0.05},
}
SIZE, CHANNELS, BATCH, CLASSES = 32, 3, 256, 10
TARGETS = {  # name: (what, maximum ratio)
    "app_vs_reference": ("app / reference seconds (validation included)", 0.5),
    "app_vs_epoch": ("app seconds / one training epoch at batch 256", 0.4),
    "memory_peak_vs_uint8": ("peak RSS growth of a cache=memory build / its uint8 bytes", 1.2),
}


def generate(folder: Path, files: int, side: int, per_file: int) -> Path:
    """Grey PNGs (smooth blobs plus noise, so they compress like real scenes) and a CSV of boxes on them."""
    rng = np.random.default_rng(0)
    rows = []
    for f in range(files):
        coarse = rng.integers(0, 256, size=(side // 16, side // 16), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BILINEAR), dtype=np.int16)
        noisy = np.clip(smooth + rng.integers(-8, 9, size=smooth.shape), 0, 255).astype(np.uint8)
        name = f"scene_{f:02d}.png"
        Image.fromarray(noisy).save(folder / name)
        sizes = rng.integers(16, 97, size=(4, 2))  # (h, w) per box kind
        for i in range(per_file):
            h, w = (int(v) for v in sizes[i % 4])
            y0, x0 = int(rng.integers(0, side - h + 1)), int(rng.integers(0, side - w + 1))
            rows.append({"path": name, "x0": x0, "y0": y0, "x1": x0 + w, "y1": y0 + h,
                         "label": int(rng.integers(CLASSES))})
    return write_crops(folder / "boxes.csv", rows)


def rgb_copy(csv_path: Path) -> Path:
    """The CSV's scenes saved again as RGB PNGs (the grey value in each channel) beside a copy of the CSV, in
    a subfolder: the same crops, for a build that stores 3 channels."""
    folder = csv_path.parent / "rgb"
    folder.mkdir()
    for png in csv_path.parent.glob("*.png"):
        with Image.open(png) as img:
            img.convert("RGB").save(folder / png.name)
    return Path(shutil.copy(csv_path, folder / csv_path.name))


def pil_reference(csv_path: Path, mode: str) -> np.ndarray:
    """The plain script: read the CSV, open each file once, crop and resize each box with PIL.
    mode RGB converts the file to the channels training wants; L resizes grey and repeats it when storing."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    by_file = defaultdict(list)
    for i, row in enumerate(rows):
        by_file[row["path"]].append(i)
    out = np.empty((len(rows), SIZE, SIZE, CHANNELS), dtype=np.uint8)
    for name, indices in by_file.items():
        with Image.open(csv_path.parent / name) as img:
            img = img.convert(mode)
        for i in indices:
            row = rows[i]
            box = (int(row["x0"]), int(row["y0"]), int(row["x1"]), int(row["y1"]))
            crop = np.asarray(img.crop(box).resize((SIZE, SIZE), Image.BILINEAR))
            out[i] = crop if mode == "RGB" else crop[:, :, None]
    return out


def build(csv_path: Path):
    return crops.build(csv=str(csv_path), root=None, width=SIZE, height=SIZE, channels=CHANNELS, cache="memory",
                       cache_dir=None, val_fraction=0.2, mean=[0.5], std=[0.5], seed=0)


def epoch_seconds(bundle, seconds: float) -> float:
    """One epoch of the training split at batch 256, from the throughput of train_one_epoch over `seconds`."""
    from benchmarks.throughput import App, app_loader, app_train, train_speed  # the same training case as throughput's

    device = torch.device("cpu")
    loader = app_loader(bundle.train, device, "device", BATCH)
    throughput = app_train(loader, App(bundle.mean, bundle.std, device, train_speed(device)), seconds, warmup=2)
    return len(bundle.train) / throughput


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def peak_memory(csv_path: Path, cache: str, own_process: bool) -> dict:
    if not own_process:  # smoke: the same code without a second torch import; the figure means nothing then
        return measure_peak(csv_path, cache)
    return peak_in_own_process(csv_path, cache)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="every case once on little data: checks it runs")
    parser.add_argument("--out", type=Path, help="JSON file (default: outputs/benchmarks/preparation[-smoke].json)")
    parser.add_argument("--threads", type=int, help=f"torch threads (default: torch's, {torch.get_num_threads()} here); "
                        "1 keeps training steady on a machine others are using")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = "smoke" if args.smoke else "full"
    settings = SETTINGS[size]
    out = args.out or ROOT / "outputs" / "benchmarks" / f"preparation{'' if size == 'full' else '-smoke'}.json"
    load_before = os.getloadavg()
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = generate(Path(tmp), settings["files"], settings["side"], settings["per_file"])
        for round_ in range(settings["rounds"]):  # interleaved, so a burst of load elsewhere hits one round
            found = {}
            found["reference"], reference = timed(lambda: pil_reference(csv_path, "RGB"))
            found["reference-grey"], _ = timed(lambda: pil_reference(csv_path, "L"))
            found["read-csv"], _ = timed(lambda: read_crops(csv_path))
            found["app"], bundle = timed(lambda: build(csv_path))
            found["epoch"] = epoch_seconds(bundle, settings["train_seconds"])
            for name, seconds in found.items():
                best[name] = min(best.get(name, float("inf")), seconds)
                print(f"  round {round_ + 1}/{settings['rounds']} {name:15s} {seconds:8.3f} s", file=sys.stderr)
        # The app's crops against the plain script's: the same boxes, resized by a different kernel.
        store = bundle.train.store
        app_hwc = store.expand(store.images).permute(0, 2, 3, 1).numpy()
        difference = np.abs(app_hwc.astype(np.int16) - reference.astype(np.int16))
        del bundle, store, reference, app_hwc
        memory = {cache: peak_memory(csv_path, cache, own_process=size != "smoke") for cache in ("memory", "disk")}
        memory["memory-rgb"] = peak_memory(rgb_copy(csv_path), "memory", own_process=size != "smoke")
    rows = settings["files"] * settings["per_file"]
    ratios = {"app_vs_reference": best["app"] / best["reference"], "app_vs_epoch": best["app"] / best["epoch"],
              "app_vs_reference_grey": best["app"] / best["reference-grey"],
              "memory_peak_vs_uint8": memory["memory"]["ratio"], "disk_peak_vs_uint8": memory["disk"]["ratio"],
              # max(.., 1): in --smoke the build runs in this process, where its growth can read as 0 bytes
              "grey_vs_rgb_peak": memory["memory"]["peak_bytes"] / max(memory["memory-rgb"]["peak_bytes"], 1),
              "grey_vs_rgb_stored": memory["memory"]["uint8_bytes"] / memory["memory-rgb"]["uint8_bytes"]}
    report = {
        "command": " ".join(["python -m benchmarks.preparation", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cores": available_cores(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "settings": {**settings, "rows": rows, "shape": [CHANNELS, SIZE, SIZE]},
        "seconds": {name: round(value, 3) for name, value in best.items()},
        "microseconds_per_crop": {name: round(value / rows * 1e6, 2) for name, value in best.items() if name != "epoch"},
        "vs_reference_grey_levels": {"mean": round(float(difference.mean()), 4), "max": int(difference.max())},
        "peak_memory": memory,
        "ratios": {name: round(value, 3) for name, value in ratios.items()},
        "targets": {name: {"what": what, "ratio": round(ratios[name], 3), "target": bound, "met": ratios[name] <= bound}
                    for name, (what, bound) in TARGETS.items()},
    }
    print("| case | seconds | us per crop |\n| --- | ---: | ---: |")
    for name, seconds in report["seconds"].items():
        print(f"| `{name}` | {seconds:.3f} | {report['microseconds_per_crop'].get(name, '')} |")
    print("\n| target | measured | needed | met |\n| --- | ---: | ---: | --- |")
    for target in report["targets"].values():
        print(f"| {target['what']} | {target['ratio']:.2f}x | <= {target['target']}x | {'yes' if target['met'] else 'no'} |")
    print(f"\napp vs reference-grey {ratios['app_vs_reference_grey']:.2f}x; cache=disk peak / uint8 bytes "
          f"{ratios['disk_peak_vs_uint8']:.2f}x; grey / RGB-copy cache=memory peak {ratios['grey_vs_rgb_peak']:.2f}x "
          f"(stored bytes {ratios['grey_vs_rgb_stored']:.2f}x); app vs PIL: mean {report['vs_reference_grey_levels']['mean']} grey "
          f"levels, max {report['vs_reference_grey_levels']['max']}; load {report['machine']['load_average_before_after']}; "
          f"JSON: {out}")
    if not all(result["peak_reset"] for result in memory.values()):
        print("the kernel did not reset the peak RSS (VmHWM) before a build: those peaks are the process's whole "
              "life's (benchmarks/peak_memory.py)")
    write_report(report, out)
    return report


if __name__ == "__main__":
    run_benchmark(main)
