"""Early stopping (`trainer.early_stop`): end a run once a validation metric has not improved for `patience`
epochs, instead of training to trainer.epochs past the point where it stopped learning.

An epoch improves on the best so far when its metric beats it by more than `min_delta` (in the metric's own
units: 0.01 of val/acc is one point); `mode` says which way is better (auto: up for accuracy and F1, down for
the loss). The best value, its epoch and the count of epochs without improvement are saved with every
checkpoint, so a resumed run stops at the epoch an unbroken one stops at. Pure bookkeeping: the runner
validates, logs and saves.
"""

from __future__ import annotations

from dataclasses import dataclass

from errors import UserError

METRICS = ("val/acc", "val/loss", "val/f1_macro")
HIGHER_IS_BETTER = {"val/acc": True, "val/loss": False, "val/f1_macro": True}


@dataclass
class EarlyStop:
    metric: str  # one of METRICS
    patience: int  # epochs without improvement before the run stops
    min_delta: float = 0.0
    mode: str = "auto"  # auto | max | min
    best: float | None = None  # the best value so far (None before the first validation)
    best_epoch: int = 0  # 1-based: the epoch whose validation gave `best`
    bad_epochs: int = 0  # epochs since `best` without an improvement of more than min_delta
    stopped_epoch: int = 0  # 1-based: the epoch after which the run stopped; 0 while it goes on

    @property
    def maximise(self) -> bool:
        return HIGHER_IS_BETTER[self.metric] if self.mode == "auto" else self.mode == "max"

    def update(self, epoch: int, scores: dict[str, float | None]) -> bool:
        """After epoch `epoch` (1-based) validated to `scores` (val/acc, val/loss, val/f1_macro): whether the run
        stops here. A metric without a value (F1 when no validation class has items) never improves."""
        value = scores[self.metric]
        if value is not None and (self.best is None or (value > self.best + self.min_delta if self.maximise
                                                        else value < self.best - self.min_delta)):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            self.stopped_epoch = epoch
        return self.stopped_epoch > 0

    def reason(self) -> str:
        best = "no value" if self.best is None else f"best {self.best:.4g} after epoch {self.best_epoch}"
        return (f"{self.metric} did not improve by more than {self.min_delta:g} for {self.bad_epochs} epoch(s) "
                f"({best}; trainer.early_stop.patience={self.patience})")

    def record(self) -> dict[str, float]:
        """What metrics.json keeps of it."""
        return {"early_stop/stopped_epoch": self.stopped_epoch, "early_stop/best_epoch": self.best_epoch,
                **({"early_stop/best": self.best} if self.best is not None else {})}

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict, source: str) -> None:
        """A checkpoint's counters, checked: they come from a file."""
        ok = (isinstance(state, dict) and (state.get("best") is None or isinstance(state.get("best"), (int, float)))
              and all(isinstance(state.get(k), int) and not isinstance(state.get(k), bool) and state[k] >= 0
                      for k in ("best_epoch", "bad_epochs", "stopped_epoch")))
        if not ok:
            raise UserError(f"{source}: its early_stop state is not what this trainer saves: use the checkpoint as "
                            "the run saved it")
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.bad_epochs, self.stopped_epoch = state["bad_epochs"], state["stopped_epoch"]


def from_config(node) -> EarlyStop | None:
    """The trainer.early_stop node (absent from configs saved before it existed) as an EarlyStop; None when off."""
    if node is None or node.get("patience") is None:
        return None
    return EarlyStop(metric=node.metric, patience=node.patience, min_delta=node.min_delta, mode=node.mode)
