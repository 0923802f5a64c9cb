"""What a run reports while it trains: train.log, TensorBoard (rank 0 only: scalars, images, hparams, the
custom-scalars layout and the markdown run summary), the progress bar, the starvation warning, and the
final value of every scalar, which becomes metrics.json.

The runner decides what happens; this module is the one place that decides how it is shown.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from datasets.base import DataBundle
from errors import UserError
from progress import progress_bar
from training import metrics
from training.board import (LAYOUT, class_count_table, confusion_image, hparam_value, input_grid, mistakes_image,
                            summary_markdown, target_name, write_hparams)
from training.loaders import DeviceLoader
from training.loop import Window

log = logging.getLogger(__name__)

DATA_WAIT_WARNING = 0.2  # a window waiting more than this fraction of its time on data is starved
# Windows in a row that must be starved before the warning: one window of a few milliseconds can wait 20%
# on a single preemption of a busy machine's loader thread, which says nothing about the loader.
STARVED_WINDOWS = 2
IMBALANCE_WARNING = 10.0  # largest / smallest training class above this: suggest the balanced sampler
SUMMARY_TAG = "run/summary"  # the TEXT entry: data, model, recipe, machine and results of one run
RESULT_METRICS = ("val/acc", "val/acc_best", "val/f1_macro", "val/loss", "train/loss", "train/throughput",
                  "train/data_wait")
HPARAM_METRICS = ("val/acc", "val/loss", "val/acc_best", "val/f1_macro")  # those this run logged
EVENT_FILE_SECOND = re.compile(r"events\.out\.tfevents\.(\d+)\.")  # the second an event file was opened


def _write_errors_once(handler: logging.FileHandler) -> None:
    """A full disk or an unwritable run folder fails every later write of train.log, and logging would print a
    traceback for each line: say it once, in one line, and keep logging to the console."""
    def handle_error(record: logging.LogRecord) -> None:
        if not getattr(handler, "write_failed", False):
            handler.write_failed = True
            error = sys.exc_info()[1]
            sys.stderr.write(f"cannot write {handler.baseFilename} ({getattr(error, 'strerror', None) or error}): "
                             "the log goes on on the console only; free space there or make the folder writable\n")

    handler.handleError = handle_error


@contextmanager
def run_log(run_dir: Path):
    """Log to run_dir/train.log: Hydra already does under train.py (and to evaluate.log, export.log, preview.log
    under the other entry points: that file is the run folder's log then, not a second copy); tests and other
    callers get train.log here."""
    path = (run_dir / "train.log").resolve()
    root = logging.getLogger()
    existing = [h for h in root.handlers
                if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == path.parent]
    if existing:
        _write_errors_once(existing[0])
        yield
        return
    handler = logging.FileHandler(path)
    _write_errors_once(handler)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(min(previous_level, logging.INFO) if previous_level else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        try:
            handler.close()  # flushes: on a full disk it fails again, and that was already said
        except OSError:
            pass


def _wait_to_sort_last(run_dir: Path) -> None:
    """TensorBoard reads a run's event files in name order, and names a file by the second it was opened, then
    host, pid and a counter (not zero-padded). A resumed attempt opened in the same second as an earlier
    attempt's file (one killed early and restarted at once) may sort before it: that file's session start, read
    last, then hides every point of the resumed attempt. Opening in the next second puts the new file last
    (a wait of at most 1 s, and only then)."""
    opened = [int(found.group(1)) for found in map(EVENT_FILE_SECOND.match, (p.name for p in run_dir.iterdir()))
              if found]
    if opened and max(opened) == int(time.time()):
        time.sleep(1 - time.time() % 1)


def starvation_advice(loader) -> str:
    """What to try when training waits on data, for the loader that made it wait."""
    if isinstance(loader, DeviceLoader):  # nothing left to cache: each batch's fixed cost shows
        return "the data is already sliced on the device, so the steps are too small: raise loader.batch_size"
    return "try dataset.cache=memory (or disk), loader.mode=device, or more loader.num_workers"


def _events_written(method):
    """A RunLogger method whose TensorBoard writes fail (a full disk, a read-only folder) raises one line. The
    event writer writes from its own thread and hands the OSError to the next call on this one."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as e:
            self.failed = True
            raise UserError(f"cannot write TensorBoard events to {self.run_dir} ({e.strerror or e}): free space there "
                            "or make the run folder writable; checkpoints/last.pt keeps the last saved state, "
                            "continue with resume=") from None

    return wrapped


class RunLogger:
    """Scalars, images and hparams go to TensorBoard on the main process only (`run_dir` None elsewhere); every
    process keeps `final`, the last value of each scalar, since every process returns the run's metrics."""

    def __init__(self, run_dir: Path | None, purge_step: int | None, loader, progress: bool):
        # purge_step: a resumed run drops whatever the interrupted one logged after its checkpoint, so no step
        # is logged twice.
        self.run_dir, self.failed = run_dir, False
        self.writer = None
        if run_dir is not None:
            self._open(run_dir, purge_step)
            # The event writer's thread would print its own traceback before this thread sees the error.
            self.previous_hook, threading.excepthook = threading.excepthook, self._quiet_event_writer
        self.last_step = purge_step - 1 if purge_step else 0
        self.about: dict[str, dict[str, str]] = {}
        # The advice, not the loader: every thread started while this logger's excepthook is in place (a
        # DataLoader worker queue's feeder thread among them) keeps the logger alive for as long as it runs, and
        # a loader held here would keep that thread's queue and its persistent workers alive with it: an
        # in-process run (a Hydra sweep's jobs, training.run) left its DataLoader workers running after it ended.
        self.starved_advice = starvation_advice(loader)
        self.progress = progress and run_dir is not None
        self.final: dict[str, float] = {}
        self.bar = None
        self.warned_starved = False
        self.starved_in_a_row = 0

    @_events_written
    def _open(self, run_dir: Path, purge_step: int | None) -> None:
        continued = any(run_dir.glob("events.out.tfevents.*"))  # this run's earlier attempt wrote the layout
        _wait_to_sort_last(run_dir)
        # A fresh run starts a session at step 0 too: TensorBoard's server takes a run's first session start
        # for its beginning and purges only on a later one, so without it a resume would purge nothing.
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step if purge_step is not None else 0)
        if not continued:
            self.writer.add_custom_scalars(LAYOUT)

    def _quiet_event_writer(self, args) -> None:
        """threading.excepthook while this logger is open: an OSError in TensorBoard's writer thread is raised
        again on the next write here, as one line; anything else is reported as before."""
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard.")):
            self.previous_hook(args)

    @_events_written
    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        self.final.update(values)
        self.last_step = max(self.last_step, step)

    @_events_written
    def window(self, window: Window) -> None:
        """A closed logging window: loss always; speed and data wait once past warm-up."""
        self.scalars({"train/loss": window.loss}, window.step)
        if window.throughput is None:
            return
        if self.writer is not None:
            self.writer.add_scalar("train/throughput", window.throughput, window.step)
        self.scalars({"train/data_wait": window.data_wait}, window.step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{window.loss:.3f}", samples_s=f"{window.throughput:.0f}",
                                 wait=f"{window.data_wait:.0%}", refresh=False)
        self.starved_in_a_row = self.starved_in_a_row + 1 if window.data_wait > DATA_WAIT_WARNING else 0
        if self.starved_in_a_row >= STARVED_WINDOWS and not self.warned_starved:
            self.warned_starved = True
            log.warning("training waited on data %.0f%% of the time (step %d): the loader is the bottleneck; %s",
                        100 * window.data_wait, window.step, self.starved_advice)

    @contextmanager
    def epoch_bar(self, total: int, desc: str):
        """A progress bar for one epoch; `step` advances it by one batch."""
        with progress_bar(total=total, desc=desc, unit="batch", enabled=self.progress) as bar:
            self.bar = bar
            try:
                yield
            finally:
                self.bar = None

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update()

    @_events_written
    def first_batch(self, normalized: torch.Tensor, mean, std, step: int) -> None:
        """What the model saw, de-normalised, once per run."""
        if self.writer is not None:
            self.writer.add_image("train/first_batch", input_grid(normalized, mean, std), step)

    @_events_written
    def validation(self, val: dict, best_acc: float, classes: list[str], lr: float, epoch_seconds: float,
                   step: int) -> dict[str, float]:
        """An epoch's validation and timing scalars, per-class accuracy and the confusion image; returns the
        metrics a checkpoint keeps."""
        kept = {"val/loss": val["loss"], "val/acc": val["acc"], "val/acc_best": best_acc}
        self.scalars({"train/lr": lr, "train/epoch_seconds": epoch_seconds, **kept}, step)
        self.scalars({f"val/acc_class/{name}": acc for name, acc in zip(classes, val["per_class_acc"])
                      if acc is not None}, step)
        if self.writer is not None:
            self.writer.add_image("val/confusion", confusion_image(val["confusion"], classes), step,
                                  dataformats="HWC")
        return kept

    @_events_written
    def validation_details(self, val: dict, classes: list[str], step: int) -> None:
        """Beyond accuracy: val/f1_macro, one PR curve per class (val/pr/<class>) and the val/mistakes image."""
        if val["f1_macro"] is not None:
            self.scalars({"val/f1_macro": val["f1_macro"]}, step)
        if self.writer is None:
            return
        for name, histogram in zip(classes, val["pr_buckets"]):
            tp, fp, tn, fn, precision, recall = metrics.pr_curve(histogram)
            self.writer.add_pr_curve_raw(f"val/pr/{name}", tp, fp, tn, fn, precision, recall, step,
                                         num_thresholds=histogram.shape[-1])
        mistakes = val["mistakes"]
        if len(mistakes.images):
            image = mistakes_image(mistakes.images, mistakes.targets.tolist(), mistakes.predicted.tolist(), classes)
            self.writer.add_image("val/mistakes", image, step, dataformats="HWC")

    @_events_written
    def class_counts(self, classes: list[str], counts: dict[str, list[int]], sampler: str, step: int | None) -> None:
        """Items per class of each split: a train.log line per split, a data/class_counts table in TensorBoard
        (when `step` is not None), and one warning when training's classes are far apart in size."""
        for split, per_class in counts.items():
            log.info("%s class counts: %s", split, ", ".join(f"{name} {n}" for name, n in zip(classes, per_class)))
        if self.writer is not None and step is not None:
            self.writer.add_text("data/class_counts", class_count_table(classes, counts), step)
        largest, smallest, ratio = metrics.imbalance(counts["train"])
        if ratio > IMBALANCE_WARNING and sampler != "balanced":
            log.warning("class imbalance: training has %d %r items but %d %r (%s): consider loader.sampler=balanced",
                        counts["train"][largest], classes[largest], counts["train"][smallest], classes[smallest],
                        f"{ratio:.1f}:1" if ratio != float("inf") else "none at all")

    def epoch_throughput(self, throughput: float | None) -> None:
        """metrics.json's train/throughput: the last epoch's training samples/s (validation excluded)."""
        if throughput is not None:
            self.final["train/throughput"] = throughput

    @_events_written
    def hparams(self, config: dict, failed: bool = False) -> None:
        if self.writer is not None and not self.failed:  # after a failed write: the one line already said why
            write_hparams(self.writer, config, {tag: self.final[tag] for tag in HPARAM_METRICS if tag in self.final},
                          failed)

    def describe(self, about: dict[str, dict[str, str]]) -> None:
        """What the run summary says about the data, model, recipe and machine (see `describe_run`)."""
        self.about = about

    @_events_written
    def summary(self, outcome: str, checkpoints: dict[str, Path]) -> None:
        """The run summary (TEXT, tag SUMMARY_TAG) with the final and best metrics: written one step past the
        last, so a resumed run's purge (every step after its checkpoint's) removes the earlier attempt's and
        the run keeps one."""
        if self.writer is None or self.failed:  # after a failed write: the one line already said why
            return
        results = {"outcome": outcome, "last step": str(self.last_step)}
        results |= {tag: f"{self.final[tag]:.4g}" for tag in RESULT_METRICS if tag in self.final}
        results |= {name: f"`{path}`" for name, path in checkpoints.items() if path.is_file()}
        text = summary_markdown(f"Run {self.writer.log_dir}", {**self.about, "Results": results})
        self.writer.add_text(SUMMARY_TAG, text, self.last_step + 1)

    def reached(self, step: int) -> None:
        """Training got to `step` (a stop between logging windows): the summary goes after it, where a resumed run's
        purge removes it."""
        self.last_step = max(self.last_step, step)

    @_events_written
    def flush(self) -> None:
        """Write what was logged to the event files now (the writer otherwise holds it up to 120 s): called
        before each checkpoint, so a SIGKILL after a save loses no point the resumed run will not log again."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is None:
            return
        failed_before = self.failed
        try:
            self._close()
        except UserError:
            if not failed_before:  # a failure already raised is not raised twice; one first seen here is
                raise
        finally:
            threading.excepthook = self.previous_hook

    @_events_written
    def _close(self) -> None:
        self.writer.close()  # flushes what was logged, also when the run stops on an error or Ctrl-C


def _settings(node) -> str:
    """A group as its name and constructor settings: SGD (lr=0.01, momentum=0.9)."""
    settings = ", ".join(f"{key}={hparam_value(value)}" for key, value in node.items() if not key.startswith("_"))
    return f"{target_name(node['_target_'])} ({settings})" if settings else target_name(node["_target_"])


def _class_counts(counts: list[int], classes: list[str]) -> str:
    """Items per class of a split, as one line of the summary."""
    return f"{sum(counts)} items: " + ", ".join(f"{name} {n}" for name, n in zip(classes, counts))


@dataclass(frozen=True)
class Where:
    """Where a run trains, for its summary."""

    device: torch.device
    precision: str  # as resolved (training/speed.py)
    processes: int  # DDP world size
    loader: object  # the training loader: its kind and workers


def describe_run(config: dict, bundle: DataBundle, counts: dict[str, list[int]], parameters: int, prep_seconds: float,
                 where: Where) -> dict[str, dict[str, str]]:
    """The run summary's sections other than its results, from the resolved config and what was built;
    `counts`: items per class of each split."""
    world_size, loader = where.processes, where.loader
    dataset, optim, trainer = config["dataset"], config["optim"], config["trainer"]
    source = dataset.get("csv") or dataset.get("root") or "the bundled demo"
    augment = {f"augment.{k}": v for k, v in config.get("augment", {}).items()}
    return {
        "Data": {
            "family": target_name(dataset["_target_"]),
            "source": f"`{source}`",
            "classes": f"{len(bundle.classes)}",
            "train": _class_counts(counts["train"], bundle.classes),
            "val": _class_counts(counts["val"], bundle.classes),
            "input (C, H, W)": str(tuple(bundle.input_shape)),
            "cache": str(dataset.get("cache", "memory")),
            "prepared in": f"{prep_seconds:.2f} s",
        },
        "Model": {
            "name": target_name(config["model"]["_target_"]),
            "parameters": f"{parameters:,}",
        },
        "Recipe": {
            "optimiser": _settings(optim),
            "schedule": _settings(config["scheduler"]) if config.get("scheduler") else "constant",
            "batch size": f"{config['loader']['batch_size']} per process, {config['loader']['batch_size'] * world_size} in all",
            "epochs": str(trainer["epochs"]),
            "augmentation": ", ".join(f"{k}={hparam_value(v)}" for k, v in augment.items()),
            "seed": str(trainer["seed"]),
        },
        "Where": {
            "device": str(where.device),
            "precision": str(where.precision),
            "processes": str(world_size),
            "loader": f"{type(loader).__name__}, {loader.num_workers} workers",
        },
    }
