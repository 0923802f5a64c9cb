"""What a run reports while it trains: train.log, TensorBoard (rank 0 only), the progress bar, the starvation
warning, and the final value of every scalar, which becomes metrics.json.

The runner decides what happens; this module is the one place that decides how it is shown.
"""

from __future__ import annotations

import functools
import logging
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from errors import UserError
from training.board import confusion_image, input_grid, write_hparams
from training.loaders import DeviceLoader
from training.loop import Window

log = logging.getLogger(__name__)

DATA_WAIT_WARNING = 0.2  # a window waiting more than this fraction of its time on data is starved
HPARAM_METRICS = ("val/acc", "val/loss", "val/acc_best")


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
        self.loader = loader
        self.progress = progress and run_dir is not None
        self.final: dict[str, float] = {}
        self.bar = None
        self.warned_starved = False

    @_events_written
    def _open(self, run_dir: Path, purge_step: int | None) -> None:
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

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
        if window.data_wait > DATA_WAIT_WARNING and not self.warned_starved:
            self.warned_starved = True
            log.warning("training waited on data %.0f%% of the time (step %d): the loader is the bottleneck; %s",
                        100 * window.data_wait, window.step, starvation_advice(self.loader))

    @contextmanager
    def epoch_bar(self, total: int, desc: str):
        """A progress bar for one epoch; `step` advances it by one batch."""
        with tqdm(total=total, desc=desc, unit="batch", leave=False, disable=not self.progress) as bar:
            self.bar = bar
            try:
                yield
            finally:
                self.bar = None

    def step(self) -> None:
        """One more batch done: the progress bar moves."""
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

    def epoch_throughput(self, throughput: float | None) -> None:
        """metrics.json's train/throughput: the last epoch's training samples/s (validation excluded)."""
        if throughput is not None:
            self.final["train/throughput"] = throughput

    @_events_written
    def hparams(self, config: dict) -> None:
        if self.writer is not None:
            write_hparams(self.writer, config, {tag: self.final[tag] for tag in HPARAM_METRICS})

    def close(self) -> None:
        if self.writer is None:
            return
        try:
            self._close()
        except UserError:
            if not self.failed:  # a failure already raised is not raised twice
                raise
        finally:
            threading.excepthook = self.previous_hook

    @_events_written
    def _close(self) -> None:
        self.writer.close()  # flushes what was logged, also when the run stops on an error or Ctrl-C
