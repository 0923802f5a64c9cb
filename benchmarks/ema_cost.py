"""What `trainer.ema` costs per training step: the app's step with and without the weights' moving average,
side by side in one process, on the same uint8 batches already on the device.

    python -m benchmarks.ema_cost [--device cuda] [--seconds 2] [--repeats 3] [--out FILE.json]

Cases, in samples/s: MODEL/B/off and MODEL/B/on for the tutorial CNN and fastnet (its BatchNorm statistics are
averaged too), at train.py's speed settings for the device (on CUDA: bf16, channels_last, CUDA graphs, so
the average's update is replayed inside the captured step). Every case runs for `--seconds` after warm-up,
in round-robin order, best of `--repeats`; the report gives each model's on/off ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks import throughput
from benchmarks.report import run as run_benchmark, write as write_report
from cores import available_cores
from models.fastnet import FastNet
from models.cnn import TutorialCNN
from training import speed as speeds
from training.build import resolve_device
from training.ema import WeightAverage
from training.graphs import WARMUP_STEPS, make_step
from training.loop import Normalizer
from training.step import StepOptions

DECAY = 0.999
MODELS = {"tutorial_cnn": TutorialCNN, "fastnet": FastNet}
BATCH = {"cpu": {"tutorial_cnn": 256, "fastnet": 32}, "cuda": {"tutorial_cnn": 512, "fastnet": 512}}
WARMUP = WARMUP_STEPS + 2  # eager warm-up steps, then the capture, then timed steps


def steps_per_second(model_name: str, batch: int, ema: bool, device: torch.device, seconds: float) -> float:
    """Samples/s of the app's step on a fresh model, timed for `seconds` after warm-up."""
    speed = throughput.train_speed(device)
    torch.manual_seed(0)
    model = speeds.prepare(speed, MODELS[model_name](3, 32, 32, throughput.CLASSES).to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    normalize = Normalizer([0.5] * 3, [0.5] * 3, device, speeds.memory_format(speed))
    options = StepOptions(speeds.MixedPrecision(speed.precision, device), cuda_graphs=speed.cuda_graphs)
    step = make_step(model, optimizer, normalize, options, device, batch, WeightAverage(model, DECAY) if ema else None)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=generator).to(device)
    targets = torch.randint(0, throughput.CLASSES, (batch,), generator=generator).to(device)
    for _ in range(WARMUP):
        step(images, targets)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started, steps = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        step(images, targets)
        steps += 1
        if device.type == "cuda" and steps % 50 == 0:
            torch.cuda.synchronize(device)  # a bounded queue: the clock must not run far ahead of the GPU
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - started)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds of each case")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case, the best kept")
    parser.add_argument("--out", type=Path, default=throughput.ROOT / "outputs" / "benchmarks" / "ema_cost.json")
    args = parser.parse_args(argv)
    device = resolve_device(args.device, "--device")
    batches = BATCH[device.type]
    cases = {f"{name}/{batches[name]}/{'on' if ema else 'off'}":
             (lambda name=name, ema=ema: steps_per_second(name, batches[name], ema, device, args.seconds))
             for name in MODELS for ema in (False, True)}
    best = throughput.measure(cases, args.repeats)
    ratios = {f"{name}_on_vs_off": round(best[f"{name}/{batches[name]}/on"] / best[f"{name}/{batches[name]}/off"], 3)
              for name in MODELS}
    report = {
        "command": " ".join(["python -m benchmarks.ema_cost", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"device": str(device), "torch": torch.__version__, "cores": available_cores(),
                    "torch_threads": torch.get_num_threads(), "gpu": throughput.gpu_info(device)},
        "settings": {"decay": DECAY, "seconds": args.seconds, "repeats": args.repeats, "batches": batches},
        "cases": {name: round(value, 1) for name, value in best.items()},
        "ratios": ratios,
    }
    for name, value in best.items():
        print(f"{name:28s} {value:10.0f} samples/s")
    for name, ratio in ratios.items():
        print(f"{name:28s} {ratio:10.3f}")
    return write_report(report, args.out)


if __name__ == "__main__":
    run_benchmark(main)
