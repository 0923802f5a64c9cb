"""Peak resident memory of building the crop dataset with cache=memory (or disk), in its own process.

python -m benchmarks.peak_memory CROPS.csv [--cache disk]
    ->  prints JSON {"rows", "uint8_bytes", "peak_bytes", "ratio", "seconds", "cpu_seconds", ...}

uint8_bytes is what the store holds: one channel per crop where every source is grey (the model still sees
3), so the ratio is the peak against the bytes actually kept.

cache=disk writes a new cache into a temporary folder; its array goes to the file as it is cut, so its peak
should stay far below the array's size.

The baseline is taken after a warm-up build of the CSV's first rows, so the one-time cost of paging in
torch's and PIL's code is not counted as data; the peak is the kernel's high-water mark (VmHWM), reset
just before the measured build through /proc/self/clear_refs. Where the kernel does not reset it (a sandbox
without that file, such as gVisor), "peak_reset" is false and the peak is the process's whole life's: still
the build's when nothing before it (importing torch, the warm-up) went higher.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from datasets import crops
from datasets.base import limit_image_pixels

WARMUP_ROWS = 200


def _status_bytes(key: str) -> int:
    kib = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)
    return int(kib) * 1024


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); whether the kernel did."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_bytes("VmHWM") <= _status_bytes("VmRSS") + 2**20  # read in this order, RSS can only be higher


def _build(csv_path: Path, root: Path, cache: str, cache_dir: Path):
    return crops.build(csv=str(csv_path), root=str(root), width=32, height=32, channels=3, cache=cache,
                       cache_dir=str(cache_dir), val_fraction=0.2, mean=[0.5], std=[0.5], seed=0)


def main(csv_path: Path, cache: str = "memory", max_image_pixels: int | None = None) -> dict:
    """The measured build's rows, stored bytes, peak above the baseline, and seconds (`max_image_pixels`: as
    the top-level key sets it, for images over PIL's default limit)."""
    if max_image_pixels is not None:
        limit_image_pixels(max_image_pixels)
    lines = csv_path.read_text().splitlines(keepends=True)
    with tempfile.TemporaryDirectory() as tmp:
        warmup = Path(tmp) / "warmup.csv"
        warmup.write_text("".join(lines[: WARMUP_ROWS + 1]))
        _build(warmup, csv_path.parent, cache, Path(tmp) / "cache")
        baseline = _status_bytes("VmRSS")
        reset = _reset_peak()
        started, cpu_started = time.perf_counter(), time.process_time()
        bundle = _build(csv_path, csv_path.parent, cache, Path(tmp) / "cache")
        # CPU seconds of every thread: unlike the wall time, barely moved by what else runs on the machine.
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        # At least 0: the reset sets the peak to the RSS of that moment, which can sit a page or two below the
        # baseline read just before it (a page freed in between); a build cannot have used less than nothing.
        peak = max(0, _status_bytes("VmHWM") - baseline)
    uint8_bytes = bundle.train.store.images.numel()
    return {"cache": cache, "rows": len(bundle.train.store), "stored_shape": list(bundle.train.store.images.shape[1:]),
            "uint8_bytes": uint8_bytes, "peak_bytes": peak, "ratio": peak / uint8_bytes, "peak_reset": reset,
            "seconds": seconds, "cpu_seconds": cpu_seconds}


def in_own_process(csv_path: Path, cache: str = "memory", max_image_pixels: int | None = None) -> dict:
    """main() in a fresh interpreter, so nothing the caller allocated before counts in its peak."""
    limit = [] if max_image_pixels is None else ["--max-image-pixels", str(max_image_pixels)]
    out = subprocess.run([sys.executable, "-m", "benchmarks.peak_memory", str(csv_path), "--cache", cache, *limit],
                         cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("--cache", choices=("memory", "disk"), default="memory")
    parser.add_argument("--max-image-pixels", type=int, help="as max_image_pixels= (default: PIL's)")
    args = parser.parse_args()
    print(json.dumps(main(args.csv, args.cache, args.max_image_pixels)))
