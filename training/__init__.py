"""The runner: `training.run(cfg)` trains, evaluates, logs and returns the final metrics."""

from training.runner import run

__all__ = ["run"]
