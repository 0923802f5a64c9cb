"""Progress bars are for terminals: redirected output keeps one log line per epoch and no bar frames."""

import os
import pty
import re
import subprocess
import sys

import pytest

from progress import progress_bar
from tests.helpers import TRAIN_PY, run_python


@pytest.mark.slow
def test_redirected_train_py_output_has_no_bar_frames(crop_csv, tmp_path):
    """As under nohup or a SLURM job: stdout and stderr go to one file, with the bar left at its default (on)."""
    log = tmp_path / "console.log"
    with open(log, "w") as out:
        result = run_python(TRAIN_PY, f"dataset.csv={crop_csv}", "loader.batch_size=8", "trainer.epochs=2",
                            "trainer.device=cpu", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                            capture_output=False, stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text()
    assert result.returncode == 0, text
    assert "\r" not in text
    assert len(re.findall(r"epoch \d/2: train loss", text)) == 2
    assert "decoding crops" not in text  # the data-preparation bar follows the same rule


def test_bar_is_drawn_on_a_terminal_only(monkeypatch):
    """The same bar on a real terminal device (a pseudo-terminal) is on; on a pipe it is off."""
    leader, follower = pty.openpty()
    read_end, write_end = os.pipe()
    with os.fdopen(follower, "w") as terminal, os.fdopen(write_end, "w") as pipe:
        for stream, drawn in ((terminal, True), (pipe, False)):
            monkeypatch.setattr(sys, "stderr", stream)
            with progress_bar(range(3), desc="frames") as bar:
                assert bar.disable is not drawn
    os.close(leader)
    os.close(read_end)
