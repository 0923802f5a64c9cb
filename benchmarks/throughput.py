"""How fast data reaches the tutorial CNN: the app's data paths against the tutorial pipeline and the
compute-only ceiling, measured side by side in one process on the same generated data.

    python -m benchmarks.throughput [--quick | --smoke | --gpu-check] [--device cuda] [--out FILE.json]

Data: the demo's 30 scenes (480x480 PNGs, datasets/demo.py) and a CSV of random boxes 24-48 px on them,
resized to 32x32x3 (CIFAR's shape), 10 random classes. Cases, each in samples/s:
  compute/B                    training steps on normalised float batches already in place (the ceiling)
  tutorial/{loader,train}/4    the PyTorch CIFAR10 tutorial as written: a CIFAR10-style dataset of PIL
                               images, ToTensor + Normalize, DataLoader(batch 4, shuffle, 2 workers), SGD
  CACHE/MODE/{loader,train}/B  the app: datasets.crops.build (cache none|memory|disk) and
                               training.loaders.build_loader (mode device|dataloader, workers auto), then
                               Normalizer (loader) or training.loop.train_one_epoch (train)
  none/dataloader-wN/...       cache=none with N loader workers, to choose loader.num_workers=auto
  memory/device/train-P[-graphs]/512
                               on CUDA (and in --smoke): memory/device/train at batch 512 in precision P
                               (fp32, bf16), eager or replayed from a CUDA graph (trainer.cuda_graphs)
  epoch/S/512 (seconds)        on CUDA (and in --smoke): one whole epoch of S samples (50,000 on CUDA),
                               device loader, batch 512, after one warm-up epoch; defaults, and eager where they are graphed
The app's cases train with train.py's defaults for the device (trainer.precision, channels_last, cuDNN
autotuning: training/speed.py); the tutorial runs as written, on the CPU.
Each case runs for a fixed time after warm-up batches, cycling epochs; every case is repeated in
round-robin order and the best run is kept, so a burst of load from elsewhere shows as less noise.
Also: data preparation time per cache mode (disk twice: write, then reuse) and the peak memory of a
cache=memory build against its uint8 bytes (benchmarks/peak_memory.py, in a subprocess).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from datasets import crops, demo
from datasets.crop_csv import write_crops
from benchmarks.peak_memory import in_own_process as peak_in_own_process
from benchmarks.report import run as run_benchmark, write as write_report
from models.cnn import TutorialCNN
from datasets.base import ArrayStore, InMemoryDataset
from training import schema
from training import speed as speeds
from training.build import resolve_device
from training.graphs import WARMUP_STEPS as GRAPH_WARMUP_STEPS, make_step
from cores import available_cores
from training.loaders import build_loader
from training.loop import Normalizer, train_one_epoch
from training.position import EpochPlan
from training.step import StepOptions, TrainStep
from training.runner import torch_threads

ROOT = Path(__file__).resolve().parent.parent


def _train_defaults() -> tuple[dict, dict]:
    """The loader and trainer keys exactly as `python train.py` composes them."""
    schema.register()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train")
    loader = {k: v for k, v in OmegaConf.to_container(cfg.loader).items() if not k.startswith("_")}
    return loader, OmegaConf.to_container(cfg.trainer)


LOADER_DEFAULTS, TRAINER_DEFAULTS = _train_defaults()


def train_speed(device: torch.device, **overrides) -> speeds.Speed:
    """What train.py would use on this device (its trainer defaults), with `overrides` (precision=...)."""
    t = {**TRAINER_DEFAULTS, **overrides}
    return speeds.resolve(speeds.SpeedSettings.of(t), device)
SETTINGS = {
    "quick": {"rows": 10_000, "memory_rows": 20_000, "seconds": 0.75, "repeats": 3, "warmup_batches": 3,
              "worker_sweep": True, "epoch_samples": 50_000},
    "full": {"rows": 50_000, "memory_rows": 50_000, "seconds": 4.0, "repeats": 3, "warmup_batches": 3,
             "worker_sweep": True, "epoch_samples": 50_000},
    # Every case once on a little data: proves the benchmark still runs (tests/test_benchmark.py); its
    # numbers mean nothing. 60 rows (48 training crops, fewer than a batch of 64 or 256): the cache=none cases
    # decode a 480x480 scene per crop, and at 300 rows they took 13 of the smoke run's 21 CPU seconds (4 now).
    "smoke": {"rows": 60, "memory_rows": 300, "seconds": 0.02, "repeats": 1, "warmup_batches": 1,
              "worker_sweep": False, "epoch_samples": 1_200},
    # What benchmarks/cuda_check.sh measures on a lent GPU, in under 2 minutes: every GPU target and
    # comparison, the cache cases at batch 256 and 512 only, no worker sweep.
    "gpu-check": {"rows": 10_000, "memory_rows": 10_000, "seconds": 0.5, "repeats": 2, "warmup_batches": 3,
                  "worker_sweep": False, "epoch_samples": 50_000, "batches": (256,)},
}
BATCHES = (4, 64, 256)  # every size's batch sizes unless it names its own; GPU_BATCH is added on CUDA
GPU_BATCH = 512  # the batch of the GPU targets and of the precision / CUDA-graph comparisons
CLASSES = 10
TUTORIAL = {"lr": 0.001, "momentum": 0.9, "batch_size": 4, "num_workers": 2}
TARGETS = {  # name: (what, minimum ratio); AT_MOST holds the ones that are maxima
    "app_vs_ceiling_256": ("memory/device/train/256 / compute/256", 0.95),
    "app_vs_tutorial_256": ("memory/device/train/256 / tutorial/train/4", 12.0),
    "cache_vs_none_loader": ("best of memory,disk device loader / none loader, each batch", 100.0),
    "cache_vs_none_train": ("best of memory,disk device train / none train, each batch", 10.0),
    "disk_second_prep_speedup": ("first / second prep seconds with cache=disk", 10.0),
    "peak_memory_vs_uint8": ("peak RSS growth of a cache=memory build / its uint8 bytes (at most)", 1.2),
}
GPU_TARGETS = {  # on CUDA only (the GPU targets); the comparisons below them have no bound
    "app_vs_ceiling_512": ("memory/device/train/512 / compute/512", 0.9),
    "app_vs_tutorial_512": ("memory/device/train/512 / tutorial/train/4", 100.0),
    "epoch_50k_seconds": ("seconds for a 50,000-sample epoch, device loader, batch 512 (at most)", 0.1),
}
AT_MOST = ("peak_memory_vs_uint8", "epoch_50k_seconds")


def random_boxes(folder: Path, rows: int) -> Path:
    """A CSV of `rows` random boxes (24-48 px a side, 10 classes) on the demo scenes in `folder`."""
    rng = np.random.default_rng(0)
    side = demo.GRID * demo.SLOT
    boxes = []
    for _ in range(rows):
        h, w = (int(v) for v in rng.integers(24, 49, size=2))
        y0, x0 = int(rng.integers(0, side - h + 1)), int(rng.integers(0, side - w + 1))
        boxes.append({"path": f"scene_{int(rng.integers(demo.N_IMAGES)):02d}.png", "x0": x0, "y0": y0,
                      "x1": x0 + w, "y1": y0 + h, "label": int(rng.integers(CLASSES))})
    return write_crops(folder / f"boxes-{rows}.csv", boxes)


class Timed:
    """A loader cut off `seconds` after its first `warmup` batches (allocator, worker start-up, and draining
    batches the workers prefetched meanwhile), cycling epochs as needed.
    Counts the samples and seconds of the timed part, for loader-only cases."""

    def __init__(self, loader, seconds: float, warmup: int, device: torch.device = torch.device("cpu")):
        self.loader, self.seconds, self.warmup, self.device = loader, seconds, warmup, device
        self.samples, self.elapsed = 0, 0.0

    def __iter__(self):
        started = None
        for epoch in range(10**9):
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(epoch)
            for n, batch in enumerate(self.loader, start=epoch * len(self.loader)):
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # the consumer's queued work belongs to the timed part
                now = time.perf_counter()
                if n == self.warmup:
                    started = now
                elif started is not None:
                    self.elapsed = now - started
                    if self.elapsed > self.seconds:
                        return
                yield batch
                if started is not None:
                    self.samples += len(batch[1])

    @property
    def throughput(self) -> float:
        return self.samples / self.elapsed


def new_model(device, speed: speeds.Speed | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The tutorial CNN and its SGD; laid out as `speed` says (and cuDNN set up so) when given."""
    torch.manual_seed(0)
    model = TutorialCNN(3, 32, 32, CLASSES).to(device)
    if speed is not None:
        model = speeds.prepare(speed, model)
    return model, torch.optim.SGD(model.parameters(), lr=TUTORIAL["lr"], momentum=TUTORIAL["momentum"])


class App:
    """How the app trains on a device: train.py's speed settings, the normaliser laid out for them."""

    def __init__(self, mean, std, device: torch.device, speed: speeds.Speed):
        self.device, self.speed = device, speed
        self.amp = speeds.MixedPrecision(speed.precision, device)
        self.normalize = Normalizer(mean, std, device, speeds.memory_format(speed))

    def step(self, batch: int) -> TrainStep:
        """The training step on a fresh model and optimizer, captured as a CUDA graph when the speed settings ask."""
        model, optimizer = new_model(self.device, self.speed)
        options = StepOptions(self.amp, cuda_graphs=self.speed.cuda_graphs)
        return make_step(model, optimizer, self.normalize, options, self.device, batch)


def no_windows(warmup_until: int) -> EpochPlan:
    """An epoch plan for a benchmark: from step 0, timed from `warmup_until`, no logging window before its end."""
    return EpochPlan(epoch=0, first_batch=0, start_step=0, batches_per_epoch=0, warmup_until=warmup_until,
                     log_every=10**9)


def app_loader_only(loader, app: App, seconds: float, warmup: int) -> float:
    timed = Timed(loader, seconds, warmup, app.device)
    for images, _ in timed:
        app.normalize(images.to(app.device))
    return timed.throughput


def app_train(loader, app: App, seconds: float, warmup: int) -> float:
    step = app.step(loader.batch_size)
    if app.speed.cuda_graphs:  # the graph's own warm-up steps and its capture stay out of the timed part
        warmup += GRAPH_WARMUP_STEPS + 1
    stats = train_one_epoch(step, Timed(loader, seconds, warmup), no_windows(warmup), on_window=lambda window: None)
    return stats.throughput


def epoch_seconds(loader, app: App) -> float:
    """Wall seconds of one whole epoch, after a first epoch that warms up (cuDNN autotuning, graph capture)."""
    step = app.step(loader.batch_size)
    for epoch in range(2):
        loader.set_epoch(epoch)
        stats = train_one_epoch(step, loader, no_windows(0), on_window=lambda window: None)
    return stats.seconds


def compute_only(images: torch.Tensor, labels: torch.Tensor, app: App, batch: int, seconds: float,
                 warmup: int) -> float:
    """The ceiling: the training step on batches that are already normalised floats on the device; with CUDA graphs
    (train.py's default on CUDA), the captured step replayed on uint8 batches already on the device."""
    if app.speed.cuda_graphs:
        return graphed_compute_only(images, labels, app, batch, seconds, warmup)
    step = app.step(batch)
    batches = [(app.normalize(images[i : i + batch].to(app.device)), labels[i : i + batch].to(app.device))
               for i in range(0, 8 * batch, batch)]
    for inputs, targets in batches[:warmup]:
        step.on_inputs(inputs, targets)
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        inputs, targets = batches[steps % len(batches)]
        loss = step.on_inputs(inputs, targets)
        steps += 1
    loss.item()  # waits for queued device work before the clock is read
    return steps * batch / (time.perf_counter() - started)


def graphed_compute_only(images: torch.Tensor, labels: torch.Tensor, app: App, batch: int, seconds: float,
                         warmup: int) -> float:
    graphed = app.step(batch)
    batches = [(images[i : i + batch].to(app.device), labels[i : i + batch].to(app.device))
               for i in range(0, 8 * batch, batch)]
    for step in range(warmup + GRAPH_WARMUP_STEPS + 1):  # the graph's own warm-up and its capture too
        graphed(*batches[step % len(batches)])
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        loss = graphed(*batches[steps % len(batches)])
        steps += 1
    loss.item()
    return steps * batch / (time.perf_counter() - started)


class TutorialCIFAR(Dataset):
    """torchvision's CIFAR10 as the tutorial uses it: HWC uint8 rows, a PIL image per item, then transform."""

    def __init__(self, data: np.ndarray, targets: list[int], transform):
        self.data, self.targets, self.transform = data, targets, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.data[index])
        return self.transform(img), self.targets[index]


def tutorial_loader(images: torch.Tensor, labels: torch.Tensor) -> DataLoader:
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    trainset = TutorialCIFAR(images.permute(0, 2, 3, 1).numpy(), labels.tolist(), transform)
    return DataLoader(trainset, batch_size=TUTORIAL["batch_size"], shuffle=True, num_workers=TUTORIAL["num_workers"])


def tutorial_train(trainloader: DataLoader, seconds: float, warmup: int) -> float:
    """The tutorial's training loop, verbatim but for the clock (on the CPU, as the tutorial runs it)."""
    net, optimizer = new_model("cpu")
    criterion = nn.CrossEntropyLoss()
    timed = Timed(trainloader, seconds, warmup)
    running_loss = 0.0
    for inputs, labels in timed:
        optimizer.zero_grad()
        outputs = net(inputs)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
    return timed.throughput


def tutorial_loader_only(trainloader: DataLoader, seconds: float, warmup: int) -> float:
    timed = Timed(trainloader, seconds, warmup)
    for _ in timed:
        pass
    return timed.throughput


def build_crops(csv_path: Path, cache: str, cache_dir: Path):
    return crops.build(csv=str(csv_path), root=None, width=32, height=32, channels=3, cache=cache,
                       cache_dir=str(cache_dir), val_fraction=0.2, mean=[0.5], std=[0.5], seed=0)


def app_loader(dataset, device, mode: str, batch: int, workers="auto"):
    return build_loader(dataset, device=device, seed=0, train=True,
                        **{**LOADER_DEFAULTS, "mode": mode, "batch_size": batch, "num_workers": workers})


def prepare(csv_path: Path, cache_dir: Path, device) -> tuple[dict, dict]:
    """Build each cache mode as a run would (dataset + loader); disk twice. Returns bundles and seconds."""
    bundles, seconds = {}, {}
    for name, cache in (("none", "none"), ("memory", "memory"), ("disk_first", "disk"), ("disk", "disk")):
        started = time.perf_counter()
        bundle = build_crops(csv_path, cache, cache_dir)
        app_loader(bundle.train, device, "auto", 64)
        seconds[name] = time.perf_counter() - started
        bundles[name] = bundle
    del bundles["disk_first"]
    return bundles, seconds


def define_cases(bundles: dict, device, seconds: float, warmup: int, worker_sweep: bool, variants: bool,
                 batches: tuple[int, ...]) -> dict[str, Callable[[], float]]:
    memory = bundles["memory"].train
    app = App(bundles["memory"].mean, bundles["memory"].std, device, train_speed(device))
    images, labels = memory.store.images[memory.indices], memory.store.labels[memory.indices]
    trainloader = tutorial_loader(images, labels)
    cases = {
        "tutorial/loader/4": lambda: tutorial_loader_only(trainloader, seconds, warmup),
        "tutorial/train/4": lambda: tutorial_train(trainloader, seconds, warmup),
    }

    def app_case(dataset, mode, batch, train, workers="auto", setup=app):
        def run():
            loader = app_loader(dataset, device, mode, batch, workers)
            with torch_threads(loader.num_workers):  # as training.run does
                return (app_train if train else app_loader_only)(loader, setup, seconds, warmup)
        return run

    for batch in batches:
        cases[f"compute/{batch}"] = lambda b=batch: compute_only(images, labels, app, b, seconds, warmup)
        for cache, modes in (("memory", ("device", "dataloader")), ("disk", ("device", "dataloader")),
                             ("none", ("dataloader",))):
            for mode in modes:
                for kind in ("train", "loader"):  # memory/device/train/B right after compute/B: compared
                    cases[f"{cache}/{mode}/{kind}/{batch}"] = app_case(bundles[cache].train, mode, batch, kind == "train")
    for workers in range(available_cores() + 1) if worker_sweep else ():
        for kind in ("loader", "train"):
            cases[f"none/dataloader-w{workers}/{kind}/64"] = app_case(bundles["none"].train, "dataloader", 64,
                                                                     kind == "train", workers)
    for name, setup in variant_setups(bundles["memory"], device).items() if variants else ():
        cases[f"memory/device/train-{name}/{GPU_BATCH}"] = app_case(memory, "device", GPU_BATCH, True, setup=setup)
    return cases


def variant_setups(bundle, device: torch.device) -> dict[str, App]:
    """fp32 against bf16, and on CUDA each eager against CUDA graphs: the rest of train.py's defaults kept."""
    setups = {}
    for precision in ("fp32", "bf16"):
        for graphs in (False, True) if device.type == "cuda" else (False,):
            speed = train_speed(device, precision=precision, cuda_graphs=graphs)
            setups[f"{precision}{'-graphs' if graphs else ''}"] = App(bundle.mean, bundle.std, device, speed)
    return setups


def repeated(store: ArrayStore, samples: int) -> InMemoryDataset:
    """`samples` items: the store's crops repeated in order (an epoch of a chosen length)."""
    take = torch.arange(samples) % len(store)
    return InMemoryDataset(ArrayStore(store.images[take], store.labels[take], store.channels))


def measure_epochs(bundle, device: torch.device, samples: int, repeats: int) -> dict[str, float]:
    """Best of `repeats` whole-epoch times over `samples` items (the cache's crops repeated), device loader,
    batch GPU_BATCH: with train.py's defaults and, where those replay CUDA graphs, with eager steps too (the
    defaults are the graphed case: timing graphs again would repeat them, and where the defaults cannot
    capture a step, fp16 on a 7.x GPU, graphs=true would be refused)."""
    dataset = repeated(bundle.train.store, samples)
    default = train_speed(device)
    setups = {"default": App(bundle.mean, bundle.std, device, default)}
    if default.cuda_graphs:
        setups["eager"] = App(bundle.mean, bundle.std, device, train_speed(device, cuda_graphs=False))
    best = {}
    for name, setup in setups.items():
        loader = app_loader(dataset, device, "device", GPU_BATCH)
        best[f"epoch/{samples}/{GPU_BATCH}/{name}"] = min(epoch_seconds(loader, setup) for _ in range(repeats))
    return best


def measure(cases: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    best = dict.fromkeys(cases, 0.0)
    for round_ in range(repeats):
        for name, case in cases.items():
            best[name] = max(best[name], case())
            print(f"  round {round_ + 1}/{repeats} {name:34s} {best[name]:10.0f} samples/s", file=sys.stderr)
    return best


def ratios(cases: dict[str, float], prep: dict[str, float], memory: dict, epochs: dict[str, float],
           batches: tuple[int, ...]) -> dict[str, float]:
    found = {
        "app_vs_ceiling_256": cases["memory/device/train/256"] / cases["compute/256"],
        "app_vs_tutorial_256": cases["memory/device/train/256"] / cases["tutorial/train/4"],
        "disk_second_prep_speedup": prep["disk_first"] / prep["disk"],
        "peak_memory_vs_uint8": memory["ratio"],
    }
    b = GPU_BATCH
    if f"compute/{b}" in cases:
        found["app_vs_ceiling_512"] = cases[f"memory/device/train/{b}"] / cases[f"compute/{b}"]
        found["app_vs_tutorial_512"] = cases[f"memory/device/train/{b}"] / cases["tutorial/train/4"]
    if f"memory/device/train-bf16/{b}" in cases:
        found["bf16_vs_fp32"] = cases[f"memory/device/train-bf16/{b}"] / cases[f"memory/device/train-fp32/{b}"]
    for precision in ("fp32", "bf16"):
        if f"memory/device/train-{precision}-graphs/{b}" in cases:
            found[f"graphs_vs_eager_{precision}"] = (cases[f"memory/device/train-{precision}-graphs/{b}"]
                                                     / cases[f"memory/device/train-{precision}/{b}"])
    for name, seconds in epochs.items():
        if name.startswith("epoch/50000/") and name.endswith("/default"):
            found["epoch_50k_seconds"] = seconds
        if name.endswith("/eager"):  # measured only where the defaults replay graphs
            found["epoch_graphs_vs_eager"] = seconds / epochs[name.replace("/eager", "/default")]
    for kind in ("loader", "train"):
        per_batch = [max(cases[f"{cache}/device/{kind}/{b}"] for cache in ("memory", "disk"))
                     / cases[f"none/dataloader/{kind}/{b}"] for b in batches]
        for batch, ratio in zip(batches, per_batch):
            found[f"cache_vs_none_{kind}_{batch}"] = ratio
        found[f"cache_vs_none_{kind}"] = min(per_batch)  # the target holds only if it holds at every batch size
    return found


def targets(found: dict[str, float]) -> dict[str, dict]:
    """Each target measured in this run (the GPU ones only on CUDA) against its bound."""
    result = {}
    for name, (what, bound) in {**TARGETS, **GPU_TARGETS}.items():
        if name not in found:
            continue
        ratio = found[name]
        met = ratio <= bound if name in AT_MOST else ratio >= bound
        result[name] = {"what": what, "ratio": round(ratio, 3), "target": bound, "met": met}
    return result


def gpu_info(device: torch.device) -> dict | None:
    """The GPU, driver and CUDA stack the figures come from (None on the CPU)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    try:  # one driver serves every GPU of the machine
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        driver = query.stdout.split("\n")[0].strip() or None
    except (OSError, subprocess.SubprocessError):
        driver = None
    return {"name": props.name, "capability": list(torch.cuda.get_device_capability(device)),
            "memory_gib": round(props.total_memory / 2**30, 1), "driver": driver, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


def table(cases: dict[str, float], device: torch.device) -> str:
    """Markdown: one row per case, with training throughput as a fraction of the ceiling at its batch size
    where the two are alike: on CUDA the ceiling runs train.py's GPU defaults, so neither the tutorial (on
    the CPU) nor the precision/graphs variants are set against it."""
    lines = ["| case | samples/s | vs compute-only |", "| --- | ---: | ---: |"]
    for name, value in cases.items():
        batch = name.rsplit("/", 1)[1]
        ceiling = cases.get(f"compute/{batch}")
        unlike = device.type == "cuda" and (name.startswith("tutorial/") or "/train-" in name)
        share = f"{value / ceiling:.2f}x" if "/train" in name and ceiling and not unlike else ""
        lines.append(f"| `{name}` | {value:,.0f} | {share} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="shorter runs and less data (under 5 min on 2 cores)")
    size.add_argument("--smoke", action="store_true", help="every case once, briefly: checks it runs; numbers mean nothing")
    size.add_argument("--gpu-check", action="store_true",
                      help="the GPU targets and comparisons with less else (benchmarks/cuda_check.sh; ~1.5 min)")
    parser.add_argument("--out", type=Path, help="JSON file to write (default: outputs/benchmarks/throughput[-quick].json)")
    parser.add_argument("--device", default="auto",
                        help="where the app and the ceiling train: auto (CUDA when available), cpu, cuda, cuda:N; "
                             "the tutorial pipeline always runs on the CPU, as the tutorial does")
    parser.add_argument("--threads", type=int, help=f"torch threads for every case (default: torch's, {torch.get_num_threads()} here); "
                        "1 keeps results steady on a machine others are using: two threads stall each other "
                        "whenever another process takes a core")
    parser.add_argument("--repeats", type=int, help="runs of each case, the best kept (default: 3; 1 with --smoke)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    size = "quick" if args.quick else "smoke" if args.smoke else "gpu-check" if args.gpu_check else "full"
    settings = {**SETTINGS[size], **({"repeats": args.repeats} if args.repeats else {})}
    batches = tuple(settings.pop("batches", BATCHES))
    out = args.out or ROOT / "outputs" / "benchmarks" / f"throughput{'' if size == 'full' else '-' + size}.json"
    device = resolve_device(args.device, "--device")
    if device.type == "cuda" and GPU_BATCH not in batches:
        batches += (GPU_BATCH,)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        demo.generate(folder)
        csv_path = random_boxes(folder, settings["rows"])
        memory = peak_in_own_process(random_boxes(folder, settings["memory_rows"]))
        bundles, prep = prepare(csv_path, folder / "cache", device)
        extras = device.type == "cuda" or size == "smoke"  # the GPU comparisons; in smoke, to prove they run
        cases = measure(define_cases(bundles, device, settings["seconds"], settings["warmup_batches"],
                                     settings["worker_sweep"], variants=extras, batches=batches), settings["repeats"])
        epochs = measure_epochs(bundles["memory"], device, settings["epoch_samples"], settings["repeats"]) if extras else {}
    found = ratios(cases, prep, memory, epochs, batches)
    report = {
        "command": " ".join(["python -m benchmarks.throughput", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cores": available_cores(), "torch_threads": torch.get_num_threads(), "device": str(device),
                    "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "python": platform.python_version(), "gpu": gpu_info(device),
                    "speed": {k: v for k, v in vars(train_speed(device)).items()},
                    # 1-min load averages: anything above what this benchmark adds (~1-2) is other work
                    "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "settings": {**settings, "batches": batches, "shape": [3, 32, 32]},
        "cases": {name: round(value, 1) for name, value in cases.items()},
        "epoch_seconds": {name: round(value, 4) for name, value in epochs.items()},
        "prep_seconds": {name: round(value, 4) for name, value in prep.items()},
        "peak_memory": memory,
        "ratios": {name: round(value, 3) for name, value in found.items()},
        "targets": targets(found),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(table(cases, device))
    print()
    print("| target | measured | needed | met |\n| --- | ---: | ---: | --- |")
    for name, target in report["targets"].items():
        sign, unit = ("<=" if name in AT_MOST else ">="), ("" if name.endswith("_seconds") else "x")
        print(f"| {target['what']} | {target['ratio']:.2f}{unit} | {sign} {target['target']}{unit} | "
              f"{'yes' if target['met'] else 'no'} |")
    print(f"\nepoch seconds: {report['epoch_seconds']}; prep seconds: {report['prep_seconds']}; "
          f"total {report['seconds']} s; JSON: {out}")
    write_report(report, out)
    return report


if __name__ == "__main__":
    run_benchmark(main)
