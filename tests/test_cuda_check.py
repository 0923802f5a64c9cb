"""benchmarks/cuda_check.sh, run here without CUDA: it records every step's exit code in summary.json,
keeps going after a failed step, and the cuda tests skip saying why. (Its CUDA figures need a GPU.)"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "cuda_check.sh"


@pytest.mark.slow
def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.slow
def test_cpu_run_writes_every_steps_exit_code_and_goes_on_after_a_failure(tmp_path):
    # train, evaluate, torchrun and benchmark are left out for time (each is tested in process elsewhere).
    env = {**os.environ, "CUDA_CHECK_DEVICE": "cpu", "CUDA_CHECK_SKIP": "train,evaluate,torchrun,benchmark",
           "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    steps = {name: step["exit"] for name, step in summary["steps"].items()}
    assert steps == {"env": 0, "install": 0, "cuda-tests": 0, "train": "skipped",
                     "train-graphs": 1,  # CUDA graphs on the CPU: refused in one line, and the next step runs
                     "evaluate": "skipped", "torchrun": "skipped", "benchmark": "skipped"}
    tests = (tmp_path / "out" / "cuda-tests.log").read_text()
    assert "SKIPPED" in tests and "needs a CUDA GPU" in tests and " passed" not in tests
    assert (tmp_path / "out" / "cuda-tests.xml").is_file()
    assert "trainer.cuda_graphs=true cannot be used: it needs trainer.device=cuda" in (tmp_path / "out" / "train-graphs.log").read_text()
    assert "torch" in (tmp_path / "out" / "env.log").read_text()


def test_every_cuda_test_is_in_a_file_the_script_collects(request):
    """The script runs `pytest -m cuda` on the files grep finds spelling `pytest.mark.cuda`, not on the whole
    suite: a cuda test marked some other way would never run on a GPU. Checked over this session's tests (the
    whole suite in a full run)."""
    spelled = {path.name for path in (ROOT / "tests").glob("test_*.py")
               if re.search(r"pytest\.mark\.cuda", path.read_text())}
    marked = {Path(item.path).name for item in request.session.items if item.get_closest_marker("cuda")}
    assert "pytest.mark.cuda" in SCRIPT.read_text().replace("\\", "")  # the script's own pattern, unescaped
    assert marked <= spelled, f"cuda tests the script would not collect: {sorted(marked - spelled)}"
