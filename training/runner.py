"""training.run(cfg): build everything from the config, train, evaluate, log, and return the final metrics.

The only module that writes files or logs: the run dir gets the resolved config, classes.json,
TensorBoard events, train.log and metrics.json. All `instantiate` calls live here.
"""

from __future__ import annotations

import json
import logging
import random
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from datasets.base import DataBundle
from errors import UserError
from training.loaders import available_cores
from training.loop import Normalizer, Window, evaluate, train_one_epoch

log = logging.getLogger(__name__)

SCALARS = ("train/loss", "train/throughput", "train/data_wait", "val/loss", "val/acc")
DATA_WAIT_WARNING = 0.2  # a window waiting more than this fraction of its time on data is starved


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when available, else CPU. Asking for CUDA without it fails here, before any work."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"trainer.device={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"trainer.device={name} but CUDA is not available here: use trainer.device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"trainer.device={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise UserError(f"trainer.device={name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


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


@contextmanager
def torch_threads(workers: int):
    """Fewer torch threads while loader workers run (at least one): 2 workers plus 2 torch threads
    oversubscribe 2 cores, and torch's threads then spin in their barriers waiting for each other."""
    before = torch.get_num_threads()
    if workers:
        torch.set_num_threads(max(1, min(before, available_cores() - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(cfg: DictConfig) -> dict:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_log(run_dir):
        return _run(cfg, run_dir)


def _run(cfg: DictConfig, run_dir: Path) -> dict:
    trainer = cfg.trainer
    if trainer.epochs < 1:
        raise UserError(f"trainer.epochs must be at least 1, got {trainer.epochs}")
    device = resolve_device(trainer.device)
    seed_everything(trainer.seed)

    prep_started = time.perf_counter()
    bundle: DataBundle = instantiate(cfg.dataset, seed=trainer.seed)
    channels, height, width = bundle.input_shape
    make_loader = instantiate(cfg.loader)
    train_loader = make_loader(bundle.train, device=device, seed=trainer.seed, train=True)
    val_loader = make_loader(bundle.val, device=device, seed=trainer.seed, train=False)
    prep_seconds = time.perf_counter() - prep_started

    model = instantiate(cfg.model, in_channels=channels, height=height, width=width,
                        num_classes=len(bundle.classes)).to(device)
    optimizer = instantiate(cfg.optim, params=model.parameters())
    normalize = Normalizer(bundle.mean, bundle.std, device)

    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "classes.json").write_text(json.dumps(bundle.classes, indent=1))
    log.info(
        "data: %d train / %d val items of %s, %d classes, %s loader (%d workers), prepared in %.2f s; device %s",
        len(bundle.train), len(bundle.val), bundle.input_shape, len(bundle.classes),
        type(train_loader).__name__, train_loader.num_workers, prep_seconds, device,
    )

    writer = SummaryWriter(log_dir=str(run_dir))
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
            log.warning(
                "training waited on data %.0f%% of the time (step %d): the loader is the bottleneck; "
                "try dataset.cache=memory (or disk), loader.mode=device, or more loader.num_workers",
                100 * window.data_wait, window.step,
            )

    step = 0
    best_acc = -1.0
    with torch_threads(train_loader.num_workers):
        for epoch in range(trainer.epochs):
            train_loader.set_epoch(epoch)
            with tqdm(total=len(train_loader), desc=f"epoch {epoch + 1}/{trainer.epochs}", unit="batch",
                      leave=False, disable=not trainer.progress) as bar:
                stats = train_one_epoch(model, optimizer, train_loader, normalize, device, step,
                                        trainer.warmup_steps, trainer.log_every, on_window, lambda: bar.update())
            step += len(train_loader)
            val = evaluate(model, val_loader, normalize, device, len(bundle.classes))
            writer.add_scalar("val/loss", val["loss"], step)
            writer.add_scalar("val/acc", val["acc"], step)
            best_acc = max(best_acc, val["acc"])
            final.update({"val/loss": val["loss"], "val/acc": val["acc"], "val/acc_best": best_acc})
            if stats.throughput is not None:
                final["train/throughput"] = stats.throughput
            log.info(
                "epoch %d/%d: train loss %.4f, %s samples/s | val loss %.4f, acc %.2f%%",
                epoch + 1, trainer.epochs, stats.loss,
                f"{stats.throughput:.0f}" if stats.throughput else "n/a", val["loss"], 100 * val["acc"],
            )
    writer.close()

    metrics = {**final, "data/prep_seconds": prep_seconds, "world_size": 1}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log.info("done: val acc %.2f%% (best %.2f%%); run dir %s", 100 * final["val/acc"], 100 * best_acc, run_dir)
    return metrics
