"""training.run(cfg): build everything from the config, train, evaluate, log, and return the final metrics.

The only module that writes files or logs during training: the run dir gets the resolved config,
classes.json, TensorBoard events, train.log, metrics.json and checkpoints/{last,best}.pt.
"""

from __future__ import annotations

import json
import logging
import math
import copy
import random
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cores import cores_per_process, local_processes
from datasets.base import DataBundle, labels_of, limit_image_pixels
from errors import UserError
from models.size import cost as model_cost
from training import checkpoint as checkpoints
from training import distributed, early_stop, folder_lock, launch, metrics, resume, run_folder, saved_config, stop
from training import speed as speeds
from training.augment import Augment
from training.build import (Data, build_augment, build_data, build_model, build_optimizer, import_data_code,
                            require_keys, resolve_device, saved_mapping, set_capturable, check_same_split)
from training.logger import RunLogger, Where, describe_run, run_log
from training.schema import check_ranges
from training.loop import NonFiniteLoss, Normalizer, evaluate, train_one_epoch
from training.ema import WeightAverage
from training.graphs import make_step
from training.position import EpochPlan, Position, warmup_end
from training.step import StepOptions, TrainStep

log = logging.getLogger(__name__)

CHECKPOINT_DIR = run_folder.CHECKPOINT_DIR
FROM_COMMAND_LINE = resume.FROM_COMMAND_LINE


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def torch_threads(workers: int):
    """Share the cores: each DDP process on this node gets its part, and each loader worker a core of it
    (2 workers plus 2 torch threads oversubscribe 2 cores, and torch's threads then spin in their barriers
    waiting for each other)."""
    before = torch.get_num_threads()
    if workers or local_processes() > 1:
        torch.set_num_threads(max(1, min(before, cores_per_process() - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(cfg: DictConfig) -> dict:
    check_ranges(cfg)  # the command's own values (a resumed run keeps its checkpoint's, checked when it started)
    process = launch.from_environment()
    # From here to the end Ctrl-C and trainer.stop_signals stop the run cleanly (training/stop.py).
    signals = stop.StopSignals(stop.parse(cfg.trainer.stop_signals))
    with signals.installed(), stop.watch_launcher(process.launched):
        return _run_process(cfg, process, signals)


def _run_process(cfg: DictConfig, process: distributed.Process, signals: stop.StopSignals) -> dict:
    checkpoint = None
    if cfg.resume and cfg.resume != resume.AUTO:
        checkpoint = checkpoints.load(cfg.resume, "resume")
        cfg = _resumed(checkpoint, cfg)
    device = resolve_device(cfg.trainer.device)
    if process.distributed and device.type == "cuda":
        device = distributed.process_device(process, device, torch.cuda.device_count())  # one GPU per process
        torch.cuda.set_device(device)
    distributed.timeout(cfg.trainer.dist_timeout_minutes)  # a bad value fails here on every run, not just under DDP
    distributed.init(process, device, cfg.trainer.dist_timeout_minutes)
    try:
        run_dir = Path(distributed.from_main(str(cfg.run_dir)))  # every rank's Hydra made its own; rank 0's wins
        with ExitStack() as held:
            if process.is_main:
                # train.py's Hydra callback took it before Hydra wrote there; tests and sweeps come here directly.
                if run_folder.take(run_dir, cfg.resume if checkpoint is not None or cfg.resume == resume.AUTO else None,
                                   "hydra.run.dir (or run_dir)"):
                    held.callback(folder_lock.release, run_dir)
            if cfg.resume == resume.AUTO:  # only now: under torchrun the other ranks learn the folder from rank 0
                found = resume.auto_checkpoint(run_dir)
                cfg = copy.deepcopy(cfg)
                cfg.resume = found
                if found is not None:
                    checkpoint = checkpoints.load(found, "resume=auto")
                    cfg = _resumed(checkpoint, cfg)
                log.info("resume=auto: %s", f"continuing {found}" if found else f"no checkpoint in {run_dir}, starting")
            require_keys(cfg)
            limit_image_pixels(cfg.max_image_pixels)
            _check_schedule_length(cfg)
            if not process.is_main:
                return _run(cfg, run_dir, checkpoint, process, device, signals)
            with run_log(run_dir):
                return _run(cfg, run_dir, checkpoint, process, device, signals)
    finally:
        distributed.shutdown()


def _resumed(checkpoint: dict, command: DictConfig) -> DictConfig:
    resumed = _resumed_config(checkpoint, command, epochs_given=_given_on_command_line("trainer.epochs"))
    resume.warn_ignored(command, resumed, command.resume)
    return resumed


def _given_on_command_line(key: str) -> bool:
    """Whether train.py's command line set `key`; True when there is no Hydra command line (a caller of
    training.run composed its config itself, so every value in it is meant)."""
    if not HydraConfig.initialized():
        return True
    return any(override.split("=", 1)[0].lstrip("+~") == key for override in HydraConfig.get().overrides.task)


def _resumed_config(checkpoint: dict, cfg: DictConfig, epochs_given: bool = True) -> DictConfig:
    """The checkpoint's own config, so `resume=PATH` alone finishes that run exactly (to the epochs it was
    started with; `trainer.epochs=N` sets another end); only the keys in FROM_COMMAND_LINE come from this
    command. A checkpoint inside a run's checkpoints/ folder continues that run dir (its events, log and
    checkpoints); one kept elsewhere starts a new run dir."""
    # Rebuilt from the shipped config groups: a checkpoint's config may not choose what code runs.
    resumed = saved_config.rebuild(checkpoint["config"], checkpoint.get("choices"), f"resume={cfg.resume}")
    for key in FROM_COMMAND_LINE:
        if key != "trainer.epochs" or epochs_given:  # else the default (10) would end a longer run early
            OmegaConf.update(resumed, key, OmegaConf.select(cfg, key))
    saved_stop = checkpoint.get("early_stop")  # checked in full when restored; here only whether it ended the run
    stopped = saved_stop.get("stopped_epoch") if isinstance(saved_stop, dict) else None
    if isinstance(stopped, int) and stopped > 0:
        raise UserError(f"resume={cfg.resume} stopped early after epoch {stopped} (trainer.early_stop): its run is "
                        "finished; start a new run to train further")
    if checkpoint["epoch"] >= resumed.trainer.epochs:
        raise UserError(f"resume={cfg.resume} has already trained {checkpoint['epoch']} epochs: "
                        f"set trainer.epochs above {checkpoint['epoch']} to train further")
    path = Path(cfg.resume).resolve()
    resumed.run_dir = str(path.parent.parent if path.parent.name == CHECKPOINT_DIR else cfg.run_dir)
    return resumed


def _check_schedule_length(cfg: DictConfig) -> None:
    """A per-step schedule spans scheduler.epochs (trainer.epochs when the run started, kept by a resumed run):
    training past its end would go on at a rate of zero (warmup_cosine) or fail (onecycle)."""
    scheduler = cfg.get("scheduler")
    if scheduler is None or scheduler.get("interval") != "step" or cfg.trainer.epochs <= scheduler.epochs:
        return
    resumed = f" (resume={cfg.resume} keeps the schedule its run started with)" if cfg.resume else ""
    raise UserError(f"scheduler.epochs={scheduler.epochs} ends the learning-rate schedule before "
                    f"trainer.epochs={cfg.trainer.epochs}{resumed}: set trainer.epochs <= {scheduler.epochs}, "
                    "or start a new run")


def _check_classes(checkpoint: dict, cfg: DictConfig, bundle: DataBundle) -> None:
    """The same config can meet other data: a CSV or folder edited since the checkpoint was saved."""
    if checkpoint["classes"] != bundle.classes:
        raise UserError(f"resume={cfg.resume} was trained on classes {checkpoint['classes']} but its data now has "
                        f"{bundle.classes}: restore that data, or train a new run")


def _check_input_size(cfg: DictConfig) -> None:
    """Build the model and the augmentation once for the configured input size before any data is decoded,
    so a crop too small for either fails in a second rather than after decoding a large data set. (CIFAR10
    declares no size: its fixed 32x32 is checked once it is loaded.)"""
    shape = tuple(OmegaConf.select(cfg, f"dataset.{key}") for key in ("channels", "height", "width"))
    if None not in shape:
        build_model(cfg.model, shape, 2, torch.device("cpu"))
        build_augment(cfg.get("augment"), shape)


def _run(cfg: DictConfig, run_dir: Path, checkpoint: dict | None, process: distributed.Process,
         device: torch.device, signals: stop.StopSignals) -> dict:
    trainer = cfg.trainer
    main = process.is_main  # rank 0 alone writes files and TensorBoard
    _check_input_size(cfg)  # before seeding: its throwaway model must not shift the real one's initial weights
    seed_everything(trainer.seed)  # the same on every rank: identical initial weights, one shared epoch order

    # Before any data is read: a setting this device cannot run fails in a second.
    speed = speeds.resolve(speeds.SpeedSettings.of(trainer), device, distributed=process.distributed,
                           per_step_scheduler=OmegaConf.select(cfg, "scheduler.interval") == "step")
    # A resumed run maps values and normalises as it did before (mean/std=auto is not recomputed).
    fixed = saved_mapping(checkpoint, cfg.dataset) if checkpoint is not None else None
    data, prep_seconds = _prepare_data(cfg, run_dir, process, device, fixed)
    bundle = data.bundle
    augment = build_augment(cfg.get("augment"), bundle.input_shape, bundle.mean)

    model = build_model(cfg.model, bundle.input_shape, len(bundle.classes), device)
    parameters, flops = model_cost(model, bundle.input_shape)
    log.info("model: %s, %.3gM parameters, %.3g MFLOPs per sample (forward)", type(model).__name__, parameters / 1e6,
             flops / 1e6)
    model = speeds.prepare(speed, model)  # before the average copies it: both lay out their weights alike
    ema = WeightAverage(model, trainer.ema) if trainer.get("ema") is not None else None
    stopper = early_stop.from_config(trainer.get("early_stop"))
    # The whole epoch's batches, whether or not a resumed epoch skips some: a per-step schedule spans epochs x these.
    optimizer, scheduler, per_step = build_optimizer(cfg.optim, cfg.get("scheduler"), model,
                                                     steps_per_epoch=data.train_loader.batches_per_epoch,
                                                     capturable=speed.cuda_graphs)
    amp = speeds.MixedPrecision(speed.precision, device)
    config = OmegaConf.to_container(cfg, resolve=True)
    state = checkpoints.TrainingState(model, optimizer, scheduler, amp, data.train_loader, bundle, config,
                                      choices=saved_config.choices(cfg), ema=ema,
                                      early_stop=stopper)
    position, best_acc = Position(), -1.0
    if checkpoint is not None:
        _check_classes(checkpoint, cfg, bundle)
        check_same_split(checkpoint, bundle, f"resume={cfg.resume}")
        position = state.restore(checkpoint, f"resume={cfg.resume}")
        set_capturable(optimizer, speed.cuda_graphs)  # as this run steps, whatever the saved run did
        best_acc = checkpoint["metrics"]["val/acc_best"]
        log.info("resuming %s after epoch %d (step %d) in %s with its config; from this command: %s", cfg.resume,
                 position.epoch, position.step, run_dir,
                 ", ".join(f"{k}={OmegaConf.select(cfg, k)}" for k in FROM_COMMAND_LINE))
    state.model = _wrap(model, speed, process, device)
    normalize = Normalizer(bundle.mean, bundle.std, device, speeds.memory_format(speed))
    options = StepOptions(amp, cfg.optim.get("clip_grad_norm"), trainer.get("label_smoothing", 0.0), speed.cuda_graphs)
    step = make_step(state.model, optimizer, normalize, options, device, cfg.loader.batch_size, ema)
    log.info("speed: %s", ", ".join(f"{k}={v}" for k, v in vars(speed).items()))

    if main:
        run_folder.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        run_folder.write_text(run_dir / "classes.json", json.dumps(bundle.classes, indent=1))
    log.info(
        "data: %d train / %d val items of %s, %d classes, %s loader (%d workers), prepared in %.2f s; device %s",
        len(bundle.train), len(bundle.val), bundle.input_shape, len(bundle.classes),
        type(data.train_loader).__name__, data.train_loader.num_workers, prep_seconds, device,
    )

    logger = RunLogger(run_dir if main else None, purge_step=position.step + 1 if checkpoint is not None else None,
                       loader=data.train_loader, progress=trainer.progress)
    outcome = "stopped by an error (see train.log)"
    try:
        counts = _class_counts(bundle)
        if main:
            # Step 0 only: a resumed run's events already hold the table from its start.
            logger.class_counts(bundle.classes, counts, cfg.loader.get("sampler", "uniform"),
                                step=0 if checkpoint is None else None)
        last_val = checkpoint["metrics"] if checkpoint is not None else {"val/acc_best": best_acc}
        where = Where(device, speed.precision, process.world_size, data.train_loader)
        logger.describe(describe_run(config, bundle, counts, parameters, prep_seconds, where))
        loop = EpochLoop(cfg=cfg, run_dir=run_dir, data=data, state=state, schedule_per_step=per_step,
                         augment=augment, step=step, logger=logger, process=process, signals=signals)
        last_val = loop.run(position, best_acc, last_val)
        logger.hparams(config)
        outcome = "finished"
        if stopper is not None and stopper.stopped_epoch:
            outcome = f"stopped early after epoch {stopper.stopped_epoch} of {trainer.epochs}: {stopper.reason()}"
    except KeyboardInterrupt as e:
        by = f"preempted ({e.args[0]})" if isinstance(e, stop.Stopped) and e.preempted else "interrupted"
        outcome = f"{by}: continue with resume={run_dir / CHECKPOINT_DIR / 'last.pt'} (or resume=auto)"
        raise
    except Exception:
        logger.hparams(config, failed=True)  # HPARAMS lists it as failed beside the others (a search's NaN trial)
        raise
    finally:
        try:
            logger.summary(outcome, {name: run_dir / CHECKPOINT_DIR / name for name in ("last.pt", "best.pt")})
        finally:
            logger.close()  # restores threading.excepthook, whatever the summary did

    metrics = {**logger.final, **(stopper.record() if stopper is not None else {}), "data/prep_seconds": prep_seconds,
               "world_size": process.world_size}
    if main:
        run_folder.write_text(run_dir / "metrics.json", json.dumps(metrics, indent=1))
    log.info("done: val acc %.2f%% (best %.2f%%); run dir %s", 100 * last_val["val/acc"],
             100 * last_val["val/acc_best"], run_dir)
    return metrics


def _prepare_data(cfg: DictConfig, run_dir: Path, process: distributed.Process, device: torch.device,
                  fixed: dict | None) -> tuple[Data, float]:
    """The data and its loaders, and the seconds preparing them took; `fixed`: dataset keys a resumed run takes
    from its checkpoint (build.saved_mapping)."""
    import_data_code(cfg.dataset)
    started = time.perf_counter()
    # Under DDP with cache=disk, rank 0 writes the cache while the others wait, then they map it, instead
    # of every rank decoding every crop at once on the same cores.
    main_builds_first = process.distributed and OmegaConf.select(cfg, "dataset.cache") == "disk"
    if main_builds_first and not process.is_main:
        distributed.barrier()
    data = build_data(cfg.dataset, cfg.loader, cfg.trainer.seed, device, process.rank, process.world_size,
                      fixed=fixed)
    if main_builds_first and process.is_main:
        distributed.barrier()
    if data.train_loader.notice:  # loader.mode=auto fell back from the device loader: say why, once
        log.warning("%s", data.train_loader.notice)
    if data.bundle.skipped and process.is_main:  # dataset.on_bad_rows=skip: the rows left out are kept with the run
        run_folder.write_text(run_dir / "skipped_rows.txt", "\n".join(data.bundle.skipped) + "\n")
        log.warning("skipped %d bad row(s), listed in %s", len(data.bundle.skipped), run_dir / "skipped_rows.txt")
    return data, time.perf_counter() - started


def _class_counts(bundle: DataBundle) -> dict[str, list[int]]:
    """Items per class in each split, from the labels alone (nothing decoded)."""
    return {split: metrics.class_counts(labels_of(dataset), len(bundle.classes))
            for split, dataset in (("train", bundle.train), ("val", bundle.val))}


def _wrap(model: nn.Module, speed: speeds.Speed, process: distributed.Process, device: torch.device) -> nn.Module:
    """DDP after the weights are loaded (it copies rank 0's parameters to every rank as it wraps), then compile.
    On CUDA, BatchNorm layers become SyncBatchNorm: batch statistics over the whole effective batch, as
    usual for DDP (same state-dict keys, so checkpoints load into the plain model). Gloo on CPU has no
    SyncBatchNorm: each process normalises by its own batch and DDP copies rank 0's running statistics."""
    if process.distributed:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if speed.compile else model


@dataclass
class EpochLoop:
    """The epoch loop from a position to trainer.epochs: train, validate, log, save."""

    cfg: DictConfig
    run_dir: Path
    data: Data
    state: checkpoints.TrainingState
    schedule_per_step: bool  # the scheduler steps after every optimizer step, not once per epoch
    augment: Augment  # applied to training batches on the device, before normalisation
    step: TrainStep  # normalisation and the optimizer step (replayed as one CUDA graph under trainer.cuda_graphs)
    logger: RunLogger
    process: distributed.Process
    signals: stop.StopSignals | None = None  # Ctrl-C and trainer.stop_signals: stop at the next step boundary

    def run(self, position: Position, best_acc: float, last_val: dict) -> dict:
        """Train from `position`; returns the last validation metrics."""
        trainer, bundle, loader = self.cfg.trainer, self.data.bundle, self.data.train_loader
        warmup_until = warmup_end(position, trainer.warmup_steps, loader.batches_per_epoch)
        signals = self.signals or stop.StopSignals(())
        signals.at_step_boundaries()
        should_stop = signals.agreed(self.step.device, trainer.log_every)
        with torch_threads(loader.num_workers):
            self._first_batch(self._plan(position, warmup_until))
            for epoch in range(position.epoch, trainer.epochs):
                plan = self._plan(position, warmup_until)
                loader.set_epoch(plan.epoch, plan.first_batch)
                lr = self.state.optimizer.param_groups[0]["lr"]
                epoch_started = time.perf_counter()
                with self.logger.epoch_bar(plan.batches_left, f"epoch {epoch + 1}/{trainer.epochs}"):
                    stats = train_one_epoch(self.step, loader, plan, on_window=self.logger.window,
                                            on_step=lambda step: self._after_step(plan, step, last_val),
                                            should_stop=should_stop, augment=self._augment(plan))
                epoch_seconds = time.perf_counter() - epoch_started
                position = plan.position_after(stats.steps, tuple(stats.open_window))
                if stats.interrupted:
                    self.logger.reached(position.step)
                    with signals.saving():
                        self._save(position, last_val, best=False)
                    log.warning("interrupted at step %d (epoch %d, batch %d): saved %s; continue with resume=%s "
                                "(or resume=auto)", position.step, epoch + 1, position.batches_done,
                                self._path("last.pt"), self._path("last.pt"))
                    raise signals.stopped()
                val = self._validate(epoch, position.step)
                stopper = self.state.early_stop
                # Before the save below: the checkpoint holds the counters this epoch left.
                stop_now = stopper is not None and stopper.update(
                    epoch + 1, {"val/acc": val["acc"], "val/loss": val["loss"], "val/f1_macro": val["f1_macro"]})
                improved = val["acc"] > best_acc
                best_acc = max(best_acc, val["acc"])
                last_val = self.logger.validation(val, best_acc, bundle.classes, lr, epoch_seconds, position.step)
                self.logger.validation_details(val, bundle.classes, position.step)
                self.logger.epoch_throughput(stats.throughput)
                if self.state.scheduler is not None and not self.schedule_per_step:
                    self.state.scheduler.step()
                position = position.next_epoch()
                self._save(position, last_val, best=improved)
                log.info(
                    "epoch %d/%d: train loss %.4f, %s samples/s, %.1f s | val loss %.4f, acc %.2f%%%s",
                    epoch + 1, trainer.epochs, stats.loss, f"{stats.throughput:.0f}" if stats.throughput else "n/a",
                    epoch_seconds, val["loss"], 100 * val["acc"], " (best)" if improved else "",
                )
                if stop_now:
                    log.info("early stop after epoch %d/%d: %s", epoch + 1, trainer.epochs, stopper.reason())
                    break
        return last_val

    def _plan(self, position: Position, warmup_until: int) -> EpochPlan:
        loader = self.data.train_loader
        return EpochPlan.at(position, loader.batches_per_epoch, warmup_until, self.cfg.trainer.log_every)

    def _after_step(self, plan: EpochPlan, step: int, last_val: dict) -> None:
        """After every optimizer step: the progress bar, a per-step schedule, and every trainer.checkpoint_every
        steps a mid-epoch save of last.pt."""
        self.logger.step()
        if self.schedule_per_step and self.state.scheduler is not None:
            self.state.scheduler.step()  # first: a mid-epoch checkpoint holds the per-step schedule's new state
        every = self.cfg.trainer.checkpoint_every  # optimizer steps between mid-epoch saves; None: epoch ends only
        position = plan.position_after(step - plan.start_step)
        # Every rank counts the same steps, so all agree on when; only rank 0 writes. An epoch's last step is left
        # to the end-of-epoch save that follows its validation.
        if every and step % every == 0 and position.batches_done < plan.batches_per_epoch:
            self._require_finite_weights(step)  # losses are checked per window; weights now
            self._save(position, last_val, best=False)

    def _augment(self, plan: EpochPlan):
        """This rank's augmentation for an epoch, from its batch `plan.first_batch` on (a resumed epoch's next)."""
        return self.augment.for_epoch(self.cfg.trainer.seed, plan.epoch, self.process.rank, plan.first_batch)

    def _first_batch(self, plan: EpochPlan) -> None:
        """The first batch the model will see, augmented, logged as an image once per run (by the main process)."""
        loader = self.data.train_loader
        loader.set_epoch(plan.epoch, plan.first_batch)
        # None when Ctrl-C came during an epoch's last step: the resumed epoch has no batches left.
        first = next(iter(loader), None) if self.process.is_main else None
        if first is not None:
            images = self._augment(plan)(first[0].to(self.step.device))
            self.logger.first_batch(self.step.normalize(images), self.data.bundle.mean, self.data.bundle.std,
                                    plan.start_step)

    def _validate(self, epoch: int, step: int) -> dict:
        # The bare model (or its average): DDP's forward would sync buffers, and ranks hold different numbers of
        # val batches. Each rank scores its shard with the model rank 0 saves, BatchNorm statistics included, so
        # the logged val/loss and val/acc are the checkpoint's (evaluate.py's) and best.pt is chosen by them.
        distributed.rank0_buffers_(self.state.scored_model)
        val = evaluate(self.state.scored_model, self.data.val_loader, self.step.normalize,
                       self.step.device, len(self.data.bundle.classes), self.state.amp)
        if not math.isfinite(val["loss"]):  # never let a broken model become best.pt or last.pt
            raise NonFiniteLoss(
                f"the validation loss became {val['loss']} after epoch {epoch + 1} (step {step}): training stopped "
                "and checkpoints/last.pt keeps the last good epoch; lower optim.lr or optim.weight_decay, or set "
                "optim.clip_grad_norm (e.g. 1.0)"
            )
        return val

    def _require_finite_weights(self, step: int) -> None:
        """A mid-epoch save may come before its window's loss check: never let it replace last.pt with NaN
        weights (one host sync per trainer.checkpoint_every steps)."""
        parameters = list(checkpoints.unwrap(self.state.model).parameters())
        if not bool(torch.stack([p.isfinite().all() for p in parameters]).all()):
            raise NonFiniteLoss(
                f"the weights became NaN or infinite by step {step}: training stopped and checkpoints/last.pt keeps "
                "the last good state; lower optim.lr or optim.weight_decay, or set optim.clip_grad_norm (e.g. 1.0)"
            )

    def _path(self, name: str) -> Path:
        return self.run_dir / CHECKPOINT_DIR / name

    def _save(self, position: Position, metrics: dict, best: bool) -> None:
        """last.pt (and best.pt when validation improved), written by the main process only."""
        if not self.process.is_main:
            return
        self.logger.flush()  # events first: a kill after this save keeps every point up to its step
        snapshot = self.state.snapshot(position, metrics)
        checkpoints.save(snapshot, self._path("last.pt"))
        if best:
            checkpoints.save(snapshot, self._path("best.pt"))
