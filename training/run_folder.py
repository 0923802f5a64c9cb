"""A run never writes into another run's folder: the check, and the Hydra callback that makes it (and locks the
folder, training/folder_lock.py) before Hydra itself writes there; and the run folder's own files, written whole
or not at all.

train.py's Hydra saves .hydra/config.yaml, hydra.yaml, overrides.yaml and opens train.log in the run folder
before the task (and the callbacks' on_job_start) runs, so a check in the runner alone comes too late:
`hydra.run.dir=outputs/OLD` would be refused only after OLD's files were rewritten. Hydra calls
on_run_start before any of that; the runner keeps the same check for callers without Hydra's run mode
(tests, sweeps, other scripts). A sweep folder is locked by the same callback before Hydra writes there.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from errors import UserError
from training import folder_lock, launch

CHECKPOINT_DIR = "checkpoints"
# What a finished or checkpointed run leaves in its folder.
RUN_MARKERS = ("metrics.json", CHECKPOINT_DIR)


def refuse_used(run_dir: Path, resume: str | None) -> None:
    """UserError when run_dir already holds a run, unless `resume` continues that very run (resume=auto: when
    run_dir has a checkpoints/last.pt to continue)."""
    if resume == "auto":
        last = run_dir / CHECKPOINT_DIR / "last.pt"
        resume = str(last) if last.is_file() else None
    if resume and Path(resume).resolve().parent == (run_dir / CHECKPOINT_DIR).resolve():
        return
    if any((run_dir / name).exists() for name in RUN_MARKERS):
        raise UserError(f"{run_dir} already holds another run: a run never writes into another's folder; pick a "
                        f"new hydra.run.dir, or continue it with resume={run_dir / CHECKPOINT_DIR / 'last.pt'}")


def create(run_dir: Path) -> None:
    """The run folder, or one line when it cannot be made (a read-only parent, a file in the way)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the run folder {run_dir} ({e.strerror or e}): point hydra.run.dir (or "
                        "run_dir) at a writable folder") from None


def write_text(path: Path, text: str) -> None:
    """config.yaml, classes.json, metrics.json, ...: written to a temp file and renamed over `path`, so a full
    disk or a read-only folder is one line and leaves the previous file (a resumed run's) whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        kept = "the previous one is kept" if path.exists() else "it was not written"
        raise UserError(f"cannot write {path} ({e.strerror or e}); {kept}: free space there or make the run folder "
                        "writable") from None
    finally:
        tmp.unlink(missing_ok=True)


def take(run_dir: Path, resume: str | None, key: str) -> bool:
    """Refuse a used run_dir (read only: a refused run leaves it as it was), then create and lock it (see
    folder_lock.claim, whose value this returns)."""
    refuse_used(run_dir, resume)
    create(run_dir)
    took = folder_lock.claim(run_dir, key)
    refuse_used(run_dir, resume)  # a run that finished between the check and the lock
    return took


def require_writable(folder: Path, key: str) -> None:
    """Make `folder` and write a file in it, or say in one line why not (a read-only file system, a file in the
    way, no space left), before anything else is written there."""
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)  # a page: a full disk fails here, where an empty file might still be made
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"{key}={folder} cannot be written ({e.strerror or e}): point it at a writable folder "
                        "with free space") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


class WritableRunDir(Callback):
    """Every entry point's hydra.callbacks: a hydra.run.dir that cannot be made or written (read-only, full, a
    file in the way) is one line before Hydra writes its .hydra/ files there, which would raise inside Hydra."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        HydraConfig.instance().set_config(config)  # for ${hydra:...} in hydra.run.dir, as run_job does next
        _one_line(lambda: require_writable(Path(str(OmegaConf.select(config, "hydra.run.dir"))), "hydra.run.dir"))


class RefuseUsedRunDir(Callback):
    """configs/train.yaml's hydra.callbacks: refuse a used hydra.run.dir, or one another run holds, before Hydra
    writes anything there, then hold its lock until this process ends; the same for a sweep's hydra.sweep.dir."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        HydraConfig.instance().set_config(config)  # for ${hydra:...} in hydra.run.dir, as run_job does next
        if not launch.from_environment().is_main:  # torchrun's other ranks write nothing there (train.py)
            return
        _one_line(lambda: take(Path(str(OmegaConf.select(config, "hydra.run.dir"))),
                               OmegaConf.select(config, "resume"), "hydra.run.dir"))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """Each job's own folder is taken by the runner as the job starts."""
        HydraConfig.instance().set_config(config)

        def take_sweep() -> None:
            sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
            create(sweep_dir)
            folder_lock.claim(sweep_dir, "hydra.sweep.dir")

        _one_line(take_sweep)


def _one_line(work) -> None:
    try:
        work()
    except UserError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # One line, as train.py reports a UserError; Hydra's logging is not set up yet, and a callback's
        # exception would print Hydra's own multi-line report.
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
