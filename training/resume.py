"""What a resumed run continues from and what it takes from its own command line.

`resume=auto` continues this run folder's checkpoints/last.pt when there is one and starts fresh there when there
is none, so one command serves a cluster job's first start and every requeue of it: a job preempted mid-epoch
(training/stop.py saved last.pt) finishes bit for bit as an unbroken run would. A resumed run otherwise takes its
checkpoint's config; an override typed beside `resume=` that this drops is named in one warning line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from training import distributed
from training.run_folder import CHECKPOINT_DIR

log = logging.getLogger(__name__)

AUTO = "auto"
# What a resumed run takes from its own command line; everything else comes from the checkpoint.
FROM_COMMAND_LINE = ("resume", "trainer.epochs", "trainer.device", "trainer.progress", "trainer.stop_signals",
                     "max_image_pixels")
_ABSENT = object()


def auto_checkpoint(run_dir: Path) -> str | None:
    """resume=auto: `run_dir`'s checkpoints/last.pt when rank 0 sees one (every rank then reads that file), else
    None. A collective under torchrun: every rank calls it."""
    last = run_dir / CHECKPOINT_DIR / "last.pt"
    return distributed.from_main(str(last) if last.is_file() else None)


def typed_overrides() -> list[str]:
    """train.py's command-line overrides as typed (none when training.run was called without Hydra's run)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def ignored(command: DictConfig, resumed: DictConfig, typed: Sequence[str]) -> list[str]:
    """The overrides of `typed` that the resumed config does not follow: a key whose value differs from the
    checkpoint's, or a group without a key of its own (experiment=...) when the configs differ anywhere."""
    found = []
    for override in typed:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in FROM_COMMAND_LINE or key.split(".")[0].split("/")[0] == "hydra":
            continue
        value = _plain(OmegaConf.select(command, key, default=_ABSENT))
        if value is _ABSENT:
            differs = _settings(command) != _settings(resumed)
        else:
            differs = value != _plain(OmegaConf.select(resumed, key, default=_ABSENT))
        if differs:
            found.append(override)
    return found


def warn_ignored(command: DictConfig, resumed: DictConfig, source: str) -> None:
    """One line naming the overrides typed beside `resume=` that the resumed run drops."""
    dropped = ignored(command, resumed, typed_overrides())
    if dropped:
        log.warning("resume=%s continues with its checkpoint's config and ignores %s (a resumed run takes only %s "
                    "from its command; start a new run to change the others)", source, " ".join(dropped),
                    ", ".join(FROM_COMMAND_LINE))


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def _settings(cfg: DictConfig) -> dict:
    """The config's values that a resume takes from the checkpoint (not the command's own, not the run folder)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("run_dir", None)
    for key in FROM_COMMAND_LINE:
        *parents, name = key.split(".")
        node = plain
        for parent in parents:
            node = node.get(parent, {})
        node.pop(name, None)
    return plain
