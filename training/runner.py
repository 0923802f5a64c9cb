"""training.run(cfg): build everything from the config, train, evaluate, log, and return the final metrics.

The only module that writes files or logs during training: the run dir gets the resolved config,
classes.json, TensorBoard events, train.log, metrics.json and checkpoints/{last,best}.pt.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from datasets.base import DataBundle
from errors import UserError
from training import checkpoint as checkpoints
from training import distributed
from training import speed as speeds
from training.board import confusion_image, input_grid, write_hparams
from training.build import build_data, build_model, build_optimizer, require_keys, resolve_device, saved_mapping
from training.loaders import DeviceLoader, cores_per_process
from training.loop import NonFiniteLoss, Normalizer, Window, evaluate, train_one_epoch

log = logging.getLogger(__name__)

DATA_WAIT_WARNING = 0.2  # a window waiting more than this fraction of its time on data is starved
CHECKPOINT_DIR = "checkpoints"
HPARAM_METRICS = ("val/acc", "val/loss", "val/acc_best")
# What a resumed run takes from its own command line; everything else comes from the checkpoint.
FROM_COMMAND_LINE = ("resume", "trainer.epochs", "trainer.device", "trainer.progress")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def run_log(run_dir: Path):
    """Log to run_dir/train.log: Hydra already does under train.py; tests and other callers get it here."""
    path = (run_dir / "train.log").resolve()
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path for h in root.handlers):
        yield
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(min(previous_level, logging.INFO) if previous_level else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()


class StopRequest:
    """Ctrl-C (SIGINT) asks the loop to stop at the next step boundary, so the run can save a consistent
    last.pt and close TensorBoard; a second Ctrl-C interrupts at once, as usual.

    Under DDP the ranks must stop at the same step, or their collectives mismatch and hang: they agree
    every `every` steps with one small all-reduce (any rank asked -> all stop)."""

    def __init__(self, device: torch.device, every: int):
        self.requested = False
        self.device, self.every, self.calls = device, every, 0

    def __call__(self) -> bool:
        if distributed.world_size() == 1:
            return self.requested
        self.calls += 1
        if self.calls % self.every:
            return False
        return distributed.max_(float(self.requested), self.device) > 0

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return

        def on_sigint(signum, frame):
            self.requested = True
            signal.signal(signal.SIGINT, previous)
            log.warning("Ctrl-C: stopping after this step and saving checkpoints/last.pt (Ctrl-C again to abort)")

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def starvation_advice(loader) -> str:
    """What to try when training waits on data, for the loader that made it wait."""
    if isinstance(loader, DeviceLoader):  # nothing left to cache: each batch's fixed cost shows
        return "the data is already sliced on the device, so the steps are too small: raise loader.batch_size"
    return "try dataset.cache=memory (or disk), loader.mode=device, or more loader.num_workers"


class NoWriter:
    """What ranks other than 0 log to: nothing."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    def add_image(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


@contextmanager
def torch_threads(workers: int):
    """Share the cores: each DDP process on this node gets its part, and each loader worker a core of it
    (2 workers plus 2 torch threads oversubscribe 2 cores, and torch's threads then spin in their barriers
    waiting for each other)."""
    before = torch.get_num_threads()
    if workers or distributed.local_processes() > 1:
        torch.set_num_threads(max(1, min(before, cores_per_process() - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(cfg: DictConfig) -> dict:
    checkpoint = checkpoints.load(cfg.resume, "resume") if cfg.resume else None
    if checkpoint is not None:
        cfg = _resumed_config(checkpoint, cfg)
    require_keys(cfg)
    if cfg.trainer.epochs < 1:
        raise UserError(f"trainer.epochs must be at least 1, got {cfg.trainer.epochs}")
    if not 0 <= cfg.trainer.seed < 2**32:  # numpy's seeding range
        raise UserError(f"trainer.seed must be between 0 and 2**32 - 1, got {cfg.trainer.seed}")
    process = distributed.from_environment()
    device = resolve_device(cfg.trainer.device)
    if process.distributed and device.type == "cuda":
        device = torch.device("cuda", process.local_rank)  # one GPU per process, as torchrun lays them out
        torch.cuda.set_device(device)
    distributed.init(process, device)
    try:
        run_dir = Path(distributed.from_main(str(cfg.run_dir)))  # every rank's Hydra made its own; rank 0's wins
        if not process.is_main:
            return _run(cfg, run_dir, checkpoint, process, device)
        resuming_here = (checkpoint is not None
                         and Path(cfg.resume).resolve().parent == (run_dir / CHECKPOINT_DIR).resolve())
        if not resuming_here and any((run_dir / name).exists() for name in ("metrics.json", CHECKPOINT_DIR)):
            raise UserError(f"{run_dir} already holds another run: a run never writes into another's folder; pick a "
                            f"new hydra.run.dir, or continue it with resume={run_dir / CHECKPOINT_DIR / 'last.pt'}")
        run_dir.mkdir(parents=True, exist_ok=True)
        with run_log(run_dir):
            return _run(cfg, run_dir, checkpoint, process, device)
    finally:
        distributed.shutdown()


def _resumed_config(checkpoint: dict, cfg: DictConfig) -> DictConfig:
    """The checkpoint's own config, so `resume=PATH trainer.epochs=N` alone continues that run exactly; only
    the keys in FROM_COMMAND_LINE come from this command. A checkpoint inside a run's checkpoints/ folder
    continues that run dir (its events, log and checkpoints); one kept elsewhere starts a new run dir."""
    if checkpoint["epoch"] >= cfg.trainer.epochs:
        raise UserError(f"resume={cfg.resume} has already trained {checkpoint['epoch']} epochs: "
                        f"set trainer.epochs above {checkpoint['epoch']} to train further")
    resumed = OmegaConf.create(checkpoint["config"])
    for key in FROM_COMMAND_LINE:
        OmegaConf.update(resumed, key, OmegaConf.select(cfg, key))
    path = Path(cfg.resume).resolve()
    resumed.run_dir = str(path.parent.parent if path.parent.name == CHECKPOINT_DIR else cfg.run_dir)
    return resumed


def _check_classes(checkpoint: dict, cfg: DictConfig, bundle: DataBundle) -> None:
    """The same config can meet other data: a CSV or folder edited since the checkpoint was saved."""
    if checkpoint["classes"] != bundle.classes:
        raise UserError(f"resume={cfg.resume} was trained on classes {checkpoint['classes']} but its data now has "
                        f"{bundle.classes}: restore that data, or train a new run")


def _check_input_size(cfg: DictConfig) -> None:
    """Build the model once for the configured input size before any data is decoded, so a crop too small
    for it fails in a second rather than after decoding a large data set. (CIFAR10 declares no size.)"""
    shape = tuple(OmegaConf.select(cfg, f"dataset.{key}") for key in ("channels", "height", "width"))
    if None not in shape:
        build_model(cfg.model, shape, 2, torch.device("cpu"))


def _run(cfg: DictConfig, run_dir: Path, checkpoint: dict | None, process: distributed.Process,
         device: torch.device) -> dict:
    trainer = cfg.trainer
    main = process.is_main  # rank 0 alone writes files and TensorBoard
    _check_input_size(cfg)  # before seeding: its throwaway model must not shift the real one's initial weights
    seed_everything(trainer.seed)  # the same on every rank: identical initial weights, one shared epoch order

    prep_started = time.perf_counter()
    # Under DDP with cache=disk, rank 0 writes the cache while the others wait, then they map it, instead
    # of every rank decoding every crop at once on the same cores.
    main_builds_first = process.distributed and OmegaConf.select(cfg, "dataset.cache") == "disk"
    if main_builds_first and not main:
        distributed.barrier()
    data = build_data(cfg.dataset, cfg.loader, trainer.seed, device, process.rank, process.world_size,
                      fixed=saved_mapping(checkpoint, cfg.dataset) if checkpoint is not None else None)
    if main_builds_first and main:
        distributed.barrier()
    bundle, train_loader = data.bundle, data.train_loader
    if bundle.skipped and main:  # dataset.on_bad_rows=skip: the rows left out are kept with the run
        (run_dir / "skipped_rows.txt").write_text("\n".join(bundle.skipped) + "\n")
        log.warning("skipped %d bad row(s), listed in %s", len(bundle.skipped), run_dir / "skipped_rows.txt")
    prep_seconds = time.perf_counter() - prep_started

    model = build_model(cfg.model, bundle.input_shape, len(bundle.classes), device)
    optimizer, scheduler = build_optimizer(cfg.optim, cfg.get("scheduler"), model)
    clip_grad_norm = cfg.optim.get("clip_grad_norm")
    speed = speeds.resolve(trainer.precision, trainer.channels_last, trainer.compile, trainer.deterministic, device)
    amp = speeds.MixedPrecision(speed.precision, device)
    normalize = Normalizer(bundle.mean, bundle.std, device, speeds.memory_format(speed))
    config = OmegaConf.to_container(cfg, resolve=True)

    start_epoch, batches_done, step, best_acc = 0, 0, 0, -1.0
    if checkpoint is not None:
        _check_classes(checkpoint, cfg, bundle)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
        amp.load_state_dict(checkpoint["scaler"])
        train_loader.load_state_dict(checkpoint["loader"])
        # Last, so that building the model above (which draws initial weights) does not shift the streams.
        checkpoints.restore_rng(checkpoint["rng"])
        start_epoch, batches_done, step = checkpoint["epoch"], checkpoint["batches_done"], checkpoint["step"]
        best_acc = checkpoint["metrics"]["val/acc_best"]
        log.info("resuming %s after epoch %d (step %d) in %s with its config; from this command: %s", cfg.resume,
                 start_epoch, step, run_dir, ", ".join(f"{k}={OmegaConf.select(cfg, k)}" for k in FROM_COMMAND_LINE))
    model = speeds.prepare(speed, model)
    if process.distributed:  # after loading weights: DDP copies rank 0's parameters to every rank as it wraps
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if speed.compile:
        model = torch.compile(model)
    log.info("speed: %s", ", ".join(f"{k}={v}" for k, v in vars(speed).items()))

    if main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (run_dir / "classes.json").write_text(json.dumps(bundle.classes, indent=1))
    log.info(
        "data: %d train / %d val items of %s, %d classes, %s loader (%d workers), prepared in %.2f s; device %s",
        len(bundle.train), len(bundle.val), bundle.input_shape, len(bundle.classes),
        type(train_loader).__name__, train_loader.num_workers, prep_seconds, device,
    )

    # A resumed run drops whatever the interrupted one logged after its checkpoint, so no step is logged twice.
    writer = (SummaryWriter(log_dir=str(run_dir), purge_step=step + 1 if checkpoint is not None else None)
              if main else NoWriter())
    final: dict = {}
    warned_starved = False

    def on_window(window: Window) -> None:
        nonlocal warned_starved
        writer.add_scalar("train/loss", window.loss, window.step)
        final["train/loss"] = window.loss
        if window.throughput is None:
            return
        writer.add_scalar("train/throughput", window.throughput, window.step)
        writer.add_scalar("train/data_wait", window.data_wait, window.step)
        final["train/data_wait"] = window.data_wait
        bar.set_postfix(loss=f"{window.loss:.3f}", samples_s=f"{window.throughput:.0f}",
                        wait=f"{window.data_wait:.0%}", refresh=False)
        if window.data_wait > DATA_WAIT_WARNING and not warned_starved:
            warned_starved = True
            log.warning("training waited on data %.0f%% of the time (step %d): the loader is the bottleneck; %s",
                        100 * window.data_wait, window.step, starvation_advice(train_loader))

    def log_scalars(values: dict) -> None:
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
        final.update(values)

    # Warm-up is per process (a resumed run warms up again), and never a whole epoch: every epoch is timed.
    warmup_until = step + min(trainer.warmup_steps, max(len(train_loader) - 1, 0))
    last_val = checkpoint["metrics"] if checkpoint is not None else {"val/acc_best": best_acc}
    stop = StopRequest(device, trainer.log_every)

    def snapshot(epochs_done: int, batches_in_epoch: int) -> dict:
        return {
            "format": checkpoints.FORMAT,
            "epoch": epochs_done,  # a resume starts at this epoch index...
            "batches_done": batches_in_epoch,  # ...after this many of its batches (non-zero after Ctrl-C)
            "step": step,
            "model": checkpoints.unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": amp.state_dict(),
            "rng": checkpoints.rng_state(),
            "loader": train_loader.state_dict(),
            "classes": bundle.classes,
            "input_shape": list(bundle.input_shape),  # (C, H, W)
            "channels": bundle.input_shape[0],
            "normalization": {"mean": list(bundle.mean), "std": list(bundle.std)},
            "value_range": list(bundle.value_range) if isinstance(bundle.value_range, tuple) else bundle.value_range,
            "metrics": last_val,
            "config": config,
        }

    try:
        with torch_threads(train_loader.num_workers), stop.installed():
            train_loader.set_epoch(start_epoch, batches_done)
            # None when Ctrl-C came during an epoch's last step: the resumed epoch has no batches left.
            first = next(iter(train_loader), None) if main else None
            if first is not None:
                writer.add_image("train/first_batch", input_grid(normalize(first[0].to(device)), bundle.mean,
                                                                 bundle.std), step)
            for epoch in range(start_epoch, trainer.epochs):
                skip = batches_done if epoch == start_epoch else 0
                train_loader.set_epoch(epoch, skip)
                lr = optimizer.param_groups[0]["lr"]
                epoch_started = time.perf_counter()
                with tqdm(total=len(train_loader), desc=f"epoch {epoch + 1}/{trainer.epochs}", unit="batch",
                          leave=False, disable=not (trainer.progress and main)) as bar:
                    stats = train_one_epoch(model, optimizer, train_loader, normalize, device, step, warmup_until,
                                            trainer.log_every, on_window, lambda: bar.update(), clip_grad_norm, stop,
                                            amp)
                epoch_seconds = time.perf_counter() - epoch_started
                step += stats.steps
                if stats.interrupted:
                    if main:
                        checkpoints.save(snapshot(epoch, skip + stats.steps), run_dir / CHECKPOINT_DIR / "last.pt")
                    log.warning("interrupted at step %d (epoch %d, batch %d): saved %s; continue with resume=%s",
                                step, epoch + 1, skip + stats.steps, run_dir / CHECKPOINT_DIR / "last.pt",
                                run_dir / CHECKPOINT_DIR / "last.pt")
                    raise KeyboardInterrupt
                # The bare model: DDP's forward would sync buffers, and ranks hold different numbers of val batches.
                val = evaluate(checkpoints.unwrap(model), data.val_loader, normalize, device, len(bundle.classes), amp)
                if not math.isfinite(val["loss"]):  # never let a broken model become best.pt or last.pt
                    raise NonFiniteLoss(
                        f"the validation loss became {val['loss']} after epoch {epoch + 1} (step {step}): training "
                        "stopped and checkpoints/last.pt keeps the last good epoch; lower optim.lr or set "
                        "optim.clip_grad_norm (e.g. 1.0)"
                    )
                improved = val["acc"] > best_acc
                best_acc = max(best_acc, val["acc"])
                last_val = {"val/loss": val["loss"], "val/acc": val["acc"], "val/acc_best": best_acc}
                log_scalars({"train/lr": lr, "train/epoch_seconds": epoch_seconds, **last_val})
                log_scalars({f"val/acc_class/{name}": acc for name, acc in zip(bundle.classes, val["per_class_acc"])
                             if acc is not None})
                if main:
                    writer.add_image("val/confusion", confusion_image(val["confusion"], bundle.classes), step,
                                     dataformats="HWC")
                if stats.throughput is not None:
                    final["train/throughput"] = stats.throughput
                if scheduler is not None:
                    scheduler.step()
                if main:
                    state = snapshot(epoch + 1, 0)
                    checkpoints.save(state, run_dir / CHECKPOINT_DIR / "last.pt")
                    if improved:
                        checkpoints.save(state, run_dir / CHECKPOINT_DIR / "best.pt")
                log.info(
                    "epoch %d/%d: train loss %.4f, %s samples/s, %.1f s | val loss %.4f, acc %.2f%%%s",
                    epoch + 1, trainer.epochs, stats.loss,
                    f"{stats.throughput:.0f}" if stats.throughput else "n/a", epoch_seconds,
                    val["loss"], 100 * val["acc"], " (best)" if improved else "",
                )
        if main:
            write_hparams(writer, config, {tag: final[tag] for tag in HPARAM_METRICS})
    finally:
        writer.close()  # flushes what was logged, also when the run stops on an error or Ctrl-C

    metrics = {**final, "data/prep_seconds": prep_seconds, "world_size": process.world_size}
    if main:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log.info("done: val acc %.2f%% (best %.2f%%); run dir %s", 100 * final["val/acc"], 100 * best_acc, run_dir)
    return metrics
