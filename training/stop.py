"""Stopping a run on request so that what it trained survives: Ctrl-C at a terminal, and the signals a scheduler
sends before it kills a job (SLURM on preemption, Kubernetes and `docker stop` send SIGTERM; SLURM's
`--signal` and submitit send SIGUSR1/SIGUSR2 some seconds before the time limit). `trainer.stop_signals`
lists the ones besides Ctrl-C.

Before the epoch loop (data preparation, a cache=disk build) a stop signal raises `Stopped` at once: nothing is
trained yet, and the cleanups on the way out run (a cache build removes its temp file). From the loop on it only
sets a flag: the step in flight finishes (a CUDA-graph replay is never cut), the loop stops at that step
boundary (under torchrun at the same step on every rank, once they agree), the runner saves a mid-epoch
checkpoints/last.pt and flushes TensorBoard, then raises `Stopped`. A second stop signal during that save is
noted and dropped, so it cannot cut the save short; a second Ctrl-C outside the save aborts at once, as a
terminal user expects.

A process a signal ended exits with 128 + the signal's number, as a shell reports it: 130 Ctrl-C, 143 SIGTERM,
138 SIGUSR1, 140 SIGUSR2. A handler that was in place before the run (submitit's, which requeues the job on
SIGUSR2) is called once the checkpoint is saved.

Under torchrun the workers also watch their launcher: if torchrun itself dies (SIGKILL, a lost login shell),
each worker stops as on SIGTERM instead of training on as an orphan.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch

from errors import UserError
from training import distributed

log = logging.getLogger(__name__)

PARENT_POLL_SECONDS = 0.5  # how often a torchrun worker checks that its launcher is still alive
PARENT_GRACE_SECONDS = 30.0  # then how long it may take to save and exit before it exits without saving


class Stopped(KeyboardInterrupt):
    """The run stopped on a signal (after saving last.pt when it came during training). A KeyboardInterrupt, so
    code that already lets Ctrl-C through (Hydra, pytest, `finally` blocks) treats every stop signal alike."""

    def __init__(self, signum: int, previous_handler=None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.previous_handler = previous_handler  # what handled the signal before the run installed its own

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def preempted(self) -> bool:
        """Stopped by a scheduler's signal rather than by Ctrl-C."""
        return self.signum != signal.SIGINT


def parse(names: Sequence[str]) -> tuple[signal.Signals, ...]:
    """trainer.stop_signals as signals; one line for a name Python does not know or a signal no process can catch."""
    found = []
    for name in names:
        text = str(name).upper()
        text = text if text.startswith("SIG") else f"SIG{text}"
        sig = getattr(signal.Signals, text, None) if text.isidentifier() else None
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise UserError(f"trainer.stop_signals: {name!r} is not a signal a run can catch: list names such as "
                            "[SIGTERM, SIGUSR1, SIGUSR2] (SIGKILL and SIGSTOP cannot be caught)")
        if sig not in found:
            found.append(sig)
    return tuple(found)


class StopSignals:
    """Ctrl-C and `signals`, while `installed`: raise `Stopped` at once until `at_step_boundaries` is called,
    then only record the request for the loop to see between steps."""

    def __init__(self, signals: Sequence[signal.Signals]):
        self.signals = tuple(dict.fromkeys((signal.SIGINT, *signals)))
        self.requested: int | None = None
        self.boundaries = False
        self.in_save = False
        self.previous: dict[int, object] = {}

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield self
            return
        self.previous = {sig: signal.signal(sig, self._on_signal) for sig in self.signals}
        try:
            yield self
        finally:
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)

    def at_step_boundaries(self) -> None:
        """From now on a signal stops the run at the next step boundary instead of where it lands."""
        self.boundaries = True

    @contextmanager
    def saving(self):
        """A checkpoint is being written: every stop signal, a second Ctrl-C included, waits until it is whole."""
        self.in_save = True
        try:
            yield
        finally:
            self.in_save = False

    def stopped(self) -> Stopped:
        """The exception that ends a run stopped by the signal it received."""
        assert self.requested is not None
        return Stopped(self.requested, self.previous.get(self.requested))

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            if signum == signal.SIGINT and not self.in_save:
                raise Stopped(signum, self.previous.get(signum))  # Ctrl-C twice: the user does not want to wait
            log.warning("%s: already stopping%s", name, " (saving checkpoints/last.pt first)" if self.in_save else "")
            return
        self.requested = signum
        if not self.boundaries:
            raise self.stopped()
        how = "Ctrl-C again to abort" if signum == signal.SIGINT else "a second signal is ignored"
        log.warning("%s: stopping after this step and saving checkpoints/last.pt (%s)", name, how)

    def agreed(self, device: torch.device, every: int) -> Callable[[], bool]:
        """`should_stop` for the training loop. Under DDP the ranks must stop at the same step, or their
        collectives mismatch and hang: they agree every `every` calls with one small all-reduce (any rank asked
        -> all stop)."""
        calls = 0

        def should_stop() -> bool:
            nonlocal calls
            if distributed.world_size() == 1:
                return self.requested is not None
            calls += 1
            if calls % every:
                return False
            # The largest signal number asked on any rank: every rank then stops for, and exits with, that one.
            asked = int(distributed.max_(float(self.requested or 0), device))
            if asked and self.requested is None:
                self.requested = asked
            return asked > 0

        return should_stop


def hand_on(stopped: Stopped) -> None:
    """End the process after a stop: the handler that was in place before the run gets the signal first (a job
    scheduler's requeue, e.g. submitit's on SIGUSR2, which exits by itself), then exit with 128 + its number."""
    handler = stopped.previous_handler
    if callable(handler) and handler is not signal.default_int_handler:
        handler(stopped.signum, None)
    sys.exit(stopped.exit_code)


@contextmanager
def watch_launcher(launched: bool):
    """Under torchrun: stop this worker as on SIGTERM when its launcher dies, and exit without saving if that
    stop takes longer than PARENT_GRACE_SECONDS (a rank stuck waiting on a dead one). torchrun starts each worker
    in a session of its own, so nothing else would end a worker whose torchrun was SIGKILLed."""
    if not launched:
        yield
        return
    parent, done = os.getppid(), threading.Event()

    def watch() -> None:
        while not done.wait(PARENT_POLL_SECONDS):
            if os.getppid() != parent:  # re-parented: the launcher is gone
                log.warning("torchrun (process %d) is gone: stopping this worker", parent)
                os.kill(os.getpid(), signal.SIGTERM)
                if not done.wait(PARENT_GRACE_SECONDS):
                    log.error("still running %.0f s after torchrun died: exiting without saving", PARENT_GRACE_SECONDS)
                    os._exit(128 + signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
