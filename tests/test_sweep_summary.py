"""The sweep summary (training/sweep_summary.py) read from job folders written here as Hydra and the runner write
them: .hydra/overrides.yaml and hydra.yaml, metrics.json for a finished job, error.txt for a failed one.
A real multirun that writes it is in test_train.py (test_sweep_survives_a_failing_job)."""

import json
import statistics

import pytest
import yaml

from training import sweep_summary

ACC_BEST = {("0.01", "0"): 0.71, ("0.01", "1"): 0.65, ("0.01", "2"): 0.68, ("0.1", "0"): 0.5}


def write_job(sweep, number, overrides, metrics=None, error=None):
    folder = sweep / str(number)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": number}}}))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if error is not None:
        (folder / "error.txt").write_text(error + "\n")


@pytest.fixture
def sweep(tmp_path):
    """Six jobs of `-m optim.lr=0.01,0.1 trainer.seed=0,1,2`: four finished, one failed, one without a result."""
    sweep = tmp_path / "sweep"
    number = 0
    for lr in ("0.01", "0.1"):
        for seed in ("0", "1", "2"):
            overrides = ["dataset.csv=crops.csv", f"optim.lr={lr}", f"trainer.seed={seed}"]
            best = ACC_BEST.get((lr, seed))
            if best is not None:
                write_job(sweep, number, overrides, {"val/acc": best - 0.02, "val/acc_best": best, "val/loss": 1.0 - best,
                                                     "world_size": 1})
            elif seed == "1":
                write_job(sweep, number, overrides, error="NonFiniteLoss: the training loss became nan at step 3")
            else:
                write_job(sweep, number, overrides)
            number += 1
    return sweep


def test_jobs_statuses_and_spread_per_setting(sweep):
    summary = sweep_summary.write(sweep)
    written = json.loads((sweep / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert [job["folder"] for job in written["jobs"]] == ["0", "1", "2", "3", "4", "5"]
    assert [job["status"] for job in written["jobs"]] == ["finished"] * 4 + ["failed", "no result"]
    assert written["jobs"][4]["error"] == "NonFiniteLoss: the training loss became nan at step 3"
    assert written["jobs"][1]["overrides"] == ["dataset.csv=crops.csv", "optim.lr=0.01", "trainer.seed=1"]
    assert written["counts"] == {"finished": 4, "failed": 1, "no result": 1}
    assert written["varying"] == ["optim.lr", "trainer.seed"] and written["repeat_keys"] == ["trainer.seed"]

    low, high = written["groups"]
    assert low["setting"] == {"optim.lr": "0.01"} and low["jobs"] == ["0", "1", "2"]
    three = [0.71, 0.65, 0.68]
    assert low["stats"]["val/acc_best"] == pytest.approx(
        {"n": 3, "mean": statistics.fmean(three), "sd": statistics.stdev(three), "min": 0.65, "max": 0.71})
    assert high["setting"] == {"optim.lr": "0.1"} and high["stats"]["val/acc_best"]["n"] == 1
    assert high["stats"]["val/acc_best"]["sd"] is None  # one finished job: no spread to report
    four = [*three, 0.5]
    assert written["all"]["val/acc_best"]["mean"] == pytest.approx(statistics.fmean(four))
    assert written["all"]["val/acc_best"]["sd"] == pytest.approx(statistics.stdev(four))
    assert written["best"] == {"folder": "0", "val/acc_best": 0.71,
                               "overrides": ["dataset.csv=crops.csv", "optim.lr=0.01", "trainer.seed=0"]}


def test_markdown_tables(sweep):
    sweep_summary.write(sweep)
    lines = (sweep / "summary.md").read_text().splitlines()
    assert "6 jobs: 4 finished, 1 failed, 1 with no result (still running, or killed)." in lines[2]

    def rows(header_start):
        start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
        table = []
        for line in lines[start:]:
            if not line.startswith("|"):
                break
            table.append([cell.strip() for cell in line.strip("|").split(" | ")])
        return table[0], table[2:]  # the header and the rows, without the alignment line

    header, jobs = rows("| job |")
    assert header == ["job", "optim.lr", "trainer.seed", "status", "val/acc", "val/acc_best", "val/loss"]
    assert jobs[0] == ["0", "0.01", "0", "finished", "0.69", "0.71", "0.29"]
    assert jobs[4][:4] == ["4", "0.1", "1", "failed: NonFiniteLoss: the training loss became nan at step 3"]
    assert jobs[4][4:] == ["", "", ""] and jobs[5][3] == "no result"

    header, groups = rows("| optim.lr |")
    assert header == ["optim.lr", "jobs", "val/acc", "val/acc_best", "val/loss"]
    mean, sd = statistics.fmean([0.71, 0.65, 0.68]), statistics.stdev([0.71, 0.65, 0.68])
    assert groups[0][:2] == ["0.01", "3 of 3"] and groups[0][3] == f"{mean:.4g} ± {sd:.4g}"
    assert groups[1][:2] == ["0.1", "1 of 3"] and groups[1][3] == "0.5"  # no ± for one job
    header, everything = rows("| jobs |")
    assert everything[0][0] == "4 of 6"


def test_seeds_alone_make_one_setting(tmp_path):
    """A sweep over seeds only has no per-setting table: its one setting is the whole sweep."""
    sweep = tmp_path / "seeds"
    for seed, best in enumerate([0.6, 0.7]):
        write_job(sweep, seed, [f"trainer.seed={seed}"], {"val/acc_best": best})
    summary = sweep_summary.write(sweep)
    assert "groups" not in summary and summary["varying"] == ["trainer.seed"]
    assert summary["all"]["val/acc_best"]["sd"] == pytest.approx(statistics.stdev([0.6, 0.7]))
    assert "## By setting" not in (sweep / "summary.md").read_text()


def test_a_cell_with_a_bar_stays_one_cell(tmp_path):
    sweep = tmp_path / "bars"
    write_job(sweep, 0, ["dataset.csv=a|b.csv"], error="UserError: bad row | here")
    write_job(sweep, 1, ["dataset.csv=c.csv"], {"val/acc_best": 0.5})
    sweep_summary.write(sweep)
    (row,) = [line for line in (sweep / "summary.md").read_text().splitlines() if line.startswith("| 0 |")]
    assert row == "| 0 | a\\|b.csv | failed: UserError: bad row \\| here |  |"
