"""Where the entry points write: a location that cannot be written is one line before anything is written there,
an export never replaces another's file, a killed export's temp file is cleaned, and each folder has one log."""

import os
from pathlib import Path

import pytest

from errors import UserError
from tests.helpers import run_python
from training import run_folder
from commands.onnx_model import export, run_export
from tests.test_onnx import _compose

ROOT = Path(__file__).resolve().parent.parent


def test_an_output_folder_behind_a_file_is_one_line_before_export_starts(tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    cfg = _compose("export", f"checkpoint={tmp_path / 'absent.pt'}", f"output={tmp_path / 'blocker' / 'models' / 'm.onnx'}",
                   f"run_dir={tmp_path / 'export'}")
    with pytest.raises(UserError, match=r"^output=.*blocker/models cannot be written \(Not a directory\)") as error:
        run_export(cfg)  # refused before the (absent) checkpoint is even read
    assert "\n" not in str(error.value)


def test_a_run_folder_on_a_read_only_file_system_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"^hydra.run.dir=/proc/v21-run cannot be written"):
        run_folder.require_writable(Path("/proc/v21-run"), "hydra.run.dir")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "export.py", "preview.py"])
def test_every_entry_point_says_in_one_line_when_its_run_dir_cannot_be_written(script, tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    result = run_python(ROOT / script, f"hydra.run.dir={tmp_path / 'blocker' / 'run'}", "checkpoint=x.pt",
                        cwd=tmp_path) if script in ("evaluate.py", "export.py") else \
        run_python(ROOT / script, f"hydra.run.dir={tmp_path / 'blocker' / 'run'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("Error: hydra.run.dir=") and "cannot be written (Not a directory)" in line


@pytest.mark.slow
def test_evaluate_py_writes_one_log_in_its_folder(evaluate_py_run):
    result, folder = evaluate_py_run, evaluate_py_run.run_dir
    assert result.returncode == 0, result.stderr
    assert folder is not None  # one folder under outputs/eval/
    logs = sorted(p.name for p in folder.glob("*.log"))
    assert logs == ["evaluate.log"], logs
    assert "wrote" in (folder / "evaluate.log").read_text()


@pytest.mark.slow
def test_an_export_never_replaces_a_file_written_meanwhile_and_cleans_a_killed_exports_temp(shared_run, tmp_path):
    """The second of two exports to one output finds the first's file at the rename: refused, the file kept.
    A temp file whose process is gone (a SIGKILLed export) is removed; one of a live process is left."""
    checkpoint = shared_run().checkpoint("best")
    output = tmp_path / "model.onnx"
    output.write_bytes(b"the first export's model")
    dead = tmp_path / f".model.onnx.tmp-{2**22 + 12345}"  # above the kernel's default pid_max: never alive
    dead.write_bytes(b"left by a killed export")
    live = tmp_path / f".model.onnx.tmp-{os.getppid()}"
    live.write_bytes(b"an export running now")
    with pytest.raises(UserError, match=r"was written by another export meanwhile"):
        export(checkpoint, output, "checkpoint=best.pt")
    assert output.read_bytes() == b"the first export's model"
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([output.name, live.name])
