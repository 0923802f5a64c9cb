"""Progress bars are for terminals: redirected output keeps one log line per epoch and no bar frames."""

import os
import pty
import re
import sys

import pytest

from progress import progress_bar


@pytest.mark.slow
def test_redirected_train_py_output_has_no_bar_frames(train_py_run):
    """As under nohup or a SLURM job: stdout and stderr go to one file, with the bar left at its default (on)."""
    text = train_py_run.stdout  # stdout and stderr, both sent to one file
    assert train_py_run.returncode == 0, text
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
