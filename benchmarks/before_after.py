"""The data preparation of two checkouts of this project side by side, in one run on the same data: the
current code against an earlier one (say, the commit before a change to datasets/), as ratios new / old.

    git archive OLD_COMMIT | tar -x -C /tmp/old     # a copy of the earlier code
    python -m benchmarks.before_after --old /tmp/old [--smoke] [--throughput] [--out FILE.json]

Each round runs, for each checkout in turn (the order alternating between rounds), a fresh interpreter in
that checkout that builds, through the builders' keyword calls both versions accept:
  crops-memory      datasets.crops.build cache=memory on benchmarks.preparation's grey scenes and boxes
  crops-disk-first  cache=disk into an empty folder; crops-disk-second: the same again (mapped)
  crops-none-items  cache=none, then every 500th training item read (LazyCrops, as a DataLoader worker does:
                    each decodes its whole source file, ~0.1 s for a 1024x1024 PNG)
  imagefolder-memory  datasets.folders.build_imagefolder cache=memory on benchmarks.folder_cache's JPEGs
Best of the rounds per case. Then each checkout's benchmarks.peak_memory (a cache=memory build's peak RSS
growth against its uint8 bytes), and with --throughput each checkout's `benchmarks.throughput --quick`,
compared case by case. Ratios above 1 mean the current code takes longer (seconds) or delivers more (samples/s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import folder_cache, preparation
from benchmarks.report import run as run_benchmark, write as write_report

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "full": {"files": 16, "side": 1024, "per_file": 4000, "per_class": 100, "folder_side": 256, "rounds": 3},
    "smoke": {"files": 2, "side": 192, "per_file": 40, "per_class": 2, "folder_side": 48, "rounds": 1},
}
# Run inside each checkout: only the builders' keyword calls, which both versions accept.
CASES = """
import json, shutil, sys, time
from datasets import crops, folders
csv_path, images, cache = sys.argv[1:]
keys = dict(width=32, height=32, channels=3, val_fraction=0.2, mean=[0.5], std=[0.5], seed=0)
def timed(fn):
    started = time.perf_counter(); result = fn(); return time.perf_counter() - started, result
def crop_build(mode):
    return crops.build(csv=csv_path, root=None, cache=mode, cache_dir=cache, **keys)
seconds = {}
seconds["crops-memory"], _ = timed(lambda: crop_build("memory"))
seconds["crops-disk-first"], _ = timed(lambda: crop_build("disk"))
seconds["crops-disk-second"], _ = timed(lambda: crop_build("disk"))
shutil.rmtree(cache)
_, lazy = timed(lambda: crop_build("none"))
seconds["crops-none-items"], _ = timed(lambda: [lazy.train[i] for i in range(0, len(lazy.train), 500)])
seconds["imagefolder-memory"], _ = timed(lambda: folders.build_imagefolder(images, cache="memory", **keys))
print(json.dumps(seconds))
"""


def cases(checkout: Path, csv_path: Path, images: Path, cache: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", CASES, str(csv_path), str(images), str(cache)], cwd=checkout,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def in_checkout(checkout: Path, module: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=checkout, capture_output=True, text=True,
                          check=True).stdout


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="a checkout (or git archive) of the earlier code")
    parser.add_argument("--smoke", action="store_true", help="every case once on little data: checks it runs")
    parser.add_argument("--throughput", action="store_true", help="also each checkout's throughput --quick")
    parser.add_argument("--out", type=Path, help="JSON file (default: outputs/benchmarks/before_after[-smoke].json)")
    args = parser.parse_args(argv)
    size = "smoke" if args.smoke else "full"
    settings = SETTINGS[size]
    out = args.out or ROOT / "outputs" / "benchmarks" / f"before_after{'' if size == 'full' else '-smoke'}.json"
    sides = {"old": args.old.resolve(), "new": ROOT}
    load_before = os.getloadavg()
    best: dict[str, dict[str, float]] = {"old": {}, "new": {}}
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = preparation.generate(Path(tmp), settings["files"], settings["side"], settings["per_file"])
        images = folder_cache.generate(Path(tmp) / "images", settings["per_class"], settings["folder_side"])
        for round_ in range(settings["rounds"]):
            for side in (("old", "new") if round_ % 2 == 0 else ("new", "old")):
                found = cases(sides[side], csv_path, images, Path(tmp) / f"cache-{side}-{round_}")
                for name, seconds in found.items():
                    best[side][name] = min(best[side].get(name, float("inf")), seconds)
                print(f"  round {round_ + 1}/{settings['rounds']} {side}: {found}", file=sys.stderr)
        peaks = {side: json.loads(in_checkout(path, "benchmarks.peak_memory", str(csv_path)))
                 for side, path in sides.items()}
    ratios = {name: best["new"][name] / best["old"][name] for name in best["new"]}
    ratios["memory_peak_vs_uint8"] = peaks["new"]["ratio"] / peaks["old"]["ratio"]
    report = {
        "command": " ".join(["python -m benchmarks.before_after", *(argv if argv is not None else sys.argv[1:])]),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "settings": settings,
        "seconds": {side: {name: round(value, 4) for name, value in cases_.items()} for side, cases_ in best.items()},
        "peak_memory": peaks,
        "ratios_new_vs_old": {name: round(value, 3) for name, value in ratios.items()},
    }
    if args.throughput:
        found = {}
        for side, path in sides.items():
            json_out = Path(tempfile.gettempdir()) / f"throughput-{side}-{os.getpid()}.json"
            in_checkout(path, "benchmarks.throughput", "--quick", "--threads", "1", "--out", str(json_out))
            found[side] = json.loads(json_out.read_text())["cases"]
        report["throughput_new_vs_old"] = {name: round(found["new"][name] / found["old"][name], 3)
                                           for name in found["new"] if name in found["old"]}
    print("| case | old s | new s | new / old |\n| --- | ---: | ---: | ---: |")
    for name, ratio in ratios.items():
        old, new = (best[side].get(name, peaks[side]["ratio"]) for side in ("old", "new"))
        print(f"| `{name}` | {old:.3f} | {new:.3f} | {ratio:.2f}x |")
    for name, ratio in report.get("throughput_new_vs_old", {}).items():
        print(f"| throughput `{name}` (samples/s) | | | {ratio:.2f}x |")
    print(f"\nload {report['load_average_before_after']}; JSON: {out}")
    write_report(report, out)
    return report


if __name__ == "__main__":
    run_benchmark(main)
