"""A crop of a large .npy array: what building the data set reads now (the crops' windows) against what it read
before (the whole file, for dataset.value_range), side by side in one process.

python -m benchmarks.npy_window [--mib 1024] [--out result.json]

The array is a sparse file (no disk space, read as zeros), so its size costs nothing to write; reading it still
pages in every value. The peak is the kernel's high-water mark (VmHWM, memory-mapped file pages included),
reset before each measurement through /proc/self/clear_refs (Linux >= 4.0).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from datasets import crops, transforms, values

WIDTH = 8192  # float32 columns: 32 KiB a row


def _status(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) * 1024


def _measure(work) -> tuple[float, int]:
    """(seconds, peak bytes above the resident size at the start) of work()."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    started = time.perf_counter()
    work()
    return time.perf_counter() - started, _status("VmHWM") - before


def main(mib: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "big.npy"
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(mib * 2**20 // (4 * WIDTH), WIDTH))
        array[0, 0] = 1.0
        array.flush()
        del array
        (folder / "crops.csv").write_text("path,x0,y0,x1,y1,label,split\nbig.npy,0,0,10,10,a,train\n"
                                          "big.npy,10,10,20,20,b,train\nbig.npy,20,20,30,30,a,val\n"
                                          "big.npy,30,30,40,40,b,val\n")

        def build():
            crops.build(csv=str(folder / "crops.csv"), root=None, width=10, height=10, channels=1, cache="memory",
                        cache_dir=str(folder / "cache"), val_fraction=0.2, mean=[0.5], std=[0.5], seed=0)

        build()  # warm-up: imports and first allocations are not the data's
        window_s, window_peak = _measure(build)
        whole_s, whole_peak = _measure(lambda: values.array_stats(transforms.open_array(path), path))
    return {"array_mib": mib, "window_seconds": window_s, "window_peak_bytes": window_peak,
            "whole_scan_seconds": whole_s, "whole_scan_peak_bytes": whole_peak,
            "time_ratio": whole_s / window_s, "peak_ratio": whole_peak / max(window_peak, 4096)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="array size in MiB (sparse: no disk space used)")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()
    result = main(args.mib)
    print(f"{'':<28}{'seconds':>10}{'peak MiB':>10}")
    print(f"{'4 crops, windows read':<28}{result['window_seconds']:>10.3f}{result['window_peak_bytes'] / 2**20:>10.1f}")
    print(f"{'whole-file scan (before)':<28}{result['whole_scan_seconds']:>10.3f}"
          f"{result['whole_scan_peak_bytes'] / 2**20:>10.1f}")
    print(f"ratio: {result['time_ratio']:.0f}x the time, {result['peak_ratio']:.0f}x the peak")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
