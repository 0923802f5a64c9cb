"""Each speed knob of the tutorial CNN's training step on a GPU, one at a time against train.py's CUDA defaults.

    python -m benchmarks.gpu_knobs [--device cuda] [--seconds 0.5] [--out FILE.json]

Every case trains through the app's device loader (memory cache, random boxes on the demo scenes, as in
benchmarks/throughput.py) for `--seconds` after its warm-up and capture, best of `--repeats`, in samples/s:
  default/B           train.py's defaults on this device (on CUDA: bf16, channels_last, CUDA graphs) at
                      batch B (256, 512, 1024, 2048)
  KNOB/512            the defaults at batch 512 with one knob changed: fp32, channels_last off, eager steps
                      (no CUDA graphs), SGD's fused kernel instead of its foreach default; and eager with
                      each of those, since graphs hide most launch costs the other knobs change
The ratio of each case to default/512 is reported. torch.compile is left out: its start-up (tens of
seconds) is more than a whole short run of this model, and it cannot be combined with CUDA graphs here.
On a CPU every case runs eagerly in fp32 (graphs and bf16 cases are skipped), which only shows the script runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import throughput
from datasets import demo
from benchmarks.report import run as run_benchmark, write as write_report
from training.build import resolve_device

BATCHES = (256, 512, 1024, 2048)
SAMPLES = 16 * max(BATCHES)  # an epoch's items: 16 batches of the largest size
# name: (overrides of train.py's speed settings, SGD's fused kernel)
KNOBS = {
    "fp32": ({"precision": "fp32"}, False),
    "nchw": ({"channels_last": False}, False),
    "fused-sgd": ({}, True),
    "eager": ({"cuda_graphs": False}, False),
    "eager-fp32": ({"cuda_graphs": False, "precision": "fp32"}, False),
    "eager-nchw": ({"cuda_graphs": False, "channels_last": False}, False),
    "eager-fused-sgd": ({"cuda_graphs": False}, True),
}


class Setup(throughput.App):
    """The app's step with train.py's speed settings changed by `overrides`, and SGD fused when asked."""

    def __init__(self, mean, std, device, overrides: dict, fused: bool):
        super().__init__(mean, std, device, throughput.train_speed(device, **overrides))
        self.fused = fused

    def step(self, batch: int):
        step = super().step(batch)
        if self.fused:  # the same SGD on the same parameters, used by the step (eager or graphed)
            step.optimizer = torch.optim.SGD(step.model.parameters(), lr=throughput.TUTORIAL["lr"],
                                             momentum=throughput.TUTORIAL["momentum"], fused=True)
        return step


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--seconds", type=float, default=0.5, help="timed seconds of each case")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each case, the best kept")
    parser.add_argument("--rows", type=int, default=10_000, help=f"random boxes cut, then repeated to {SAMPLES:,} items")
    parser.add_argument("--out", type=Path, default=throughput.ROOT / "outputs" / "benchmarks" / "gpu_knobs.json")
    args = parser.parse_args(argv)
    device = resolve_device(args.device, "--device")
    cuda = device.type == "cuda"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        demo.generate(folder)
        bundle = throughput.build_crops(throughput.random_boxes(folder, args.rows), "memory", folder / "cache")
        # The crops repeated to a whole number of batches of every size: no short last batch (run eagerly).
        train = throughput.repeated(bundle.train.store, SAMPLES)
        setups = {f"default/{b}": (Setup(bundle.mean, bundle.std, device, {}, False), b) for b in BATCHES}
        for name, (overrides, fused) in KNOBS.items():
            if cuda or not ({"precision", "cuda_graphs"} & set(overrides) or fused):
                setups[f"{name}/512"] = (Setup(bundle.mean, bundle.std, device, overrides, fused and cuda), 512)

        def case(setup: Setup, batch: int):
            return lambda: throughput.app_train(throughput.app_loader(train, device, "device", batch), setup,
                                                args.seconds, 3)

        cases = throughput.measure({name: case(*setup) for name, setup in setups.items()}, args.repeats)
    base = cases["default/512"]
    report = {
        "command": " ".join(["python -m benchmarks.gpu_knobs", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"device": str(device), "torch": torch.__version__, "gpu": throughput.gpu_info(device),
                    "defaults": {k: v for k, v in vars(throughput.train_speed(device)).items()}},
        "cases": {name: round(value, 1) for name, value in cases.items()},
        "vs_default_512": {name: round(value / base, 3) for name, value in cases.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    print("| case | samples/s | vs default/512 |\n| --- | ---: | ---: |")
    for name, value in cases.items():
        print(f"| `{name}` | {value:,.0f} | {value / base:.2f}x |")
    return write_report(report, args.out)


if __name__ == "__main__":
    run_benchmark(main)
