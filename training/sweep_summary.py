"""One summary per multirun, in its sweep folder: summary.json and summary.md list each job's overrides, status
and final and best metrics, with the mean and standard deviation across the finished jobs, and per setting
(the jobs that differ only in trainer.seed or dataset.fold) where several jobs share one. One run's validation
accuracy moves by several points between seeds and epochs, so a sweep is read from its spread, not one job.

The summary is rebuilt from the job folders themselves (.hydra/overrides.yaml, metrics.json, error.txt) after
every job and once more at the sweep's end: Hydra's basic sweeper raises a failed job's error after the last
job and never calls on_multirun_end then, and launchers such as submitit run each job in its own process.
A job that failed is listed as failed, with its error's first line; a folder with neither metrics.json nor
error.txt is a job still running, or one killed before it could say why ("no result").
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from training import run_folder

log = logging.getLogger(__name__)

JSON_NAME, MARKDOWN_NAME = "summary.json", "summary.md"
ERROR_FILE = "error.txt"  # a failed job's error, one line, in its own folder
# Overrides that repeat one setting rather than change it: jobs that differ only in these form one group.
REPEAT_KEYS = ("trainer.seed", "dataset.fold")
# The columns of summary.md, where the runs have them; summary.json has every numeric metric.
TABLE_METRICS = ("val/acc", "val/acc_best", "val/loss", "val/f1_macro", "train/loss", "train/throughput")
FINISHED, FAILED, NO_RESULT = "finished", "failed", "no result"


def override_key(override: str) -> str:
    """The key an override sets: `optim.lr=0.1` -> optim.lr, `+extra=1` -> extra, `~key` -> key."""
    return override.partition("=")[0].lstrip("+~")


def collect(sweep_dir: Path) -> list[dict]:
    """Every job folder under `sweep_dir` (one holding .hydra/overrides.yaml), in job order: its folder relative
    to the sweep, job number, overrides, status, metrics (finished jobs) and error (failed ones)."""
    jobs = []
    for overrides_file in sweep_dir.rglob(".hydra/overrides.yaml"):
        folder = overrides_file.parent.parent
        hydra_file = folder / ".hydra" / "hydra.yaml"
        number = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.job.num") if hydra_file.is_file() else None
        job = {"folder": str(folder.relative_to(sweep_dir)), "job": number,
               "overrides": [str(o) for o in OmegaConf.load(overrides_file)], "status": NO_RESULT}
        metrics_file, error_file = folder / "metrics.json", folder / ERROR_FILE
        if metrics_file.is_file():
            job |= {"status": FINISHED, "metrics": json.loads(metrics_file.read_text())}
        elif error_file.is_file():
            job |= {"status": FAILED, "error": error_file.read_text().strip()}
        jobs.append(job)
    return sorted(jobs, key=lambda j: (j["job"] is None, j["job"] or 0, j["folder"]))


def spread(values: Sequence[float]) -> dict:
    """n, mean, sample standard deviation (n - 1; None for one value), min and max of finite values."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    return {"n": len(values), "mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None, "min": min(values), "max": max(values)}


def _stats(jobs: Sequence[dict]) -> dict:
    """spread() of every numeric metric that the finished jobs among `jobs` report."""
    finished = [j["metrics"] for j in jobs if j["status"] == FINISHED]
    names = sorted({k for m in finished for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return {name: spread([m[name] for m in finished if isinstance(m.get(name), (int, float))]) for name in names}


def _setting(job: Mapping) -> dict[str, str]:
    """A job's overrides as key -> value text."""
    return {override_key(o): o.partition("=")[2] for o in job["overrides"]}


def summarise(sweep_dir: Path, jobs: Sequence[dict]) -> dict:
    """summary.json's content: the jobs, which override keys vary between them, the statistics over all finished
    jobs, and per group of jobs that differ only in REPEAT_KEYS (when some group has more than one job)."""
    settings = [_setting(job) for job in jobs]
    keys = list(dict.fromkeys(key for setting in settings for key in setting))
    varying = [key for key in keys if len({setting.get(key) for setting in settings}) > 1]
    grouped_by = [key for key in varying if key not in REPEAT_KEYS]
    groups: dict[tuple, list[dict]] = {}
    for job, setting in zip(jobs, settings):
        groups.setdefault(tuple(setting.get(key, "") for key in grouped_by), []).append(job)
    counts = {status: sum(j["status"] == status for j in jobs) for status in (FINISHED, FAILED, NO_RESULT)}
    summary = {"sweep_dir": str(sweep_dir), "jobs": list(jobs), "counts": counts, "varying": varying,
               "repeat_keys": [key for key in varying if key in REPEAT_KEYS], "all": _stats(jobs)}
    if len(groups) > 1 and any(len(members) > 1 for members in groups.values()):
        summary["groups"] = [{"setting": dict(zip(grouped_by, setting)), "jobs": [j["folder"] for j in members],
                              "stats": _stats(members)} for setting, members in groups.items()]
    scored = [j for j in jobs if j["status"] == FINISHED and isinstance(j["metrics"].get("val/acc_best"), float)]
    if scored:
        best = max(scored, key=lambda j: j["metrics"]["val/acc_best"])
        summary["best"] = {"folder": best["folder"], "overrides": best["overrides"],
                           "val/acc_best": best["metrics"]["val/acc_best"]}
    return summary


def _number(value) -> str:
    return "" if value is None else f"{value:.4g}"


def _mean_sd(stat: Mapping | None) -> str:
    if not stat or stat["mean"] is None:
        return ""
    return _number(stat["mean"]) if stat["sd"] is None else f"{_number(stat['mean'])} ± {_number(stat['sd'])}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _stats_table(keys: Sequence[str], rows: Sequence[Mapping], columns: Sequence[str]) -> list[str]:
    """Rows of {"setting", "jobs", "stats"} as a table: the setting's keys, finished of all jobs, mean ± sd."""
    lines = ["| " + " | ".join([*keys, "jobs", *columns]) + " |", "|" + " --- |" * len(keys) + " ---: |" * (len(columns) + 1)]
    for row in rows:
        n = max((row["stats"][m]["n"] for m in columns if m in row["stats"]), default=0)
        lines.append("| " + " | ".join([*(_cell(row["setting"][k]) for k in keys), f"{n} of {len(row['jobs'])}",
                                        *(_mean_sd(row["stats"].get(m)) for m in columns)]) + " |")
    return lines


def markdown(summary: Mapping) -> str:
    """summary.md: the jobs as a table (varying overrides as columns), then mean ± sd per group and overall."""
    jobs, varying, counts = summary["jobs"], summary["varying"], summary["counts"]
    columns = [m for m in TABLE_METRICS if m in summary["all"]]
    lines = [f"# Sweep summary: {summary['sweep_dir']}", "",
             f"{len(jobs)} jobs: {counts[FINISHED]} finished, {counts[FAILED]} failed"
             + (f", {counts[NO_RESULT]} with no result (still running, or killed)" if counts[NO_RESULT] else "")
             + ". Mean ± sample standard deviation (n - 1) over the finished jobs.", ""]
    if "best" in summary:
        best = summary["best"]
        lines += [f"Best val/acc_best: {_number(best['val/acc_best'])}, job folder `{best['folder']}` "
                  f"({' '.join(best['overrides']) or 'no overrides'}).", ""]
    lines += ["## Jobs", "", "| job | " + " | ".join([*varying, "status", *columns]) + " |",
              "| --- |" + " --- |" * (len(varying) + 1) + " ---: |" * len(columns)]
    for job in jobs:
        setting, metrics = _setting(job), job.get("metrics", {})
        status = f"failed: {job['error']}" if job["status"] == FAILED else job["status"]
        cells = [job["folder"], *(setting.get(k, "") for k in varying), status, *(_number(metrics.get(m)) for m in columns)]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if "groups" in summary:
        over = " and ".join(summary["repeat_keys"]) or "the jobs of each setting"
        lines += ["", f"## By setting (mean ± sd over {over})", ""]
        lines += _stats_table(list(summary["groups"][0]["setting"]), summary["groups"], columns)
    everything = {"setting": {}, "jobs": [j["folder"] for j in jobs], "stats": summary["all"]}
    lines += ["", "## All jobs", ""] + _stats_table([], [everything], columns)
    return "\n".join(lines) + "\n"


def write(sweep_dir: Path) -> dict:
    """Collect the jobs under `sweep_dir` and write summary.json and summary.md there (each whole or not at all)."""
    summary = summarise(sweep_dir, collect(sweep_dir))
    run_folder.write_text(sweep_dir / JSON_NAME, json.dumps(summary, indent=1))
    run_folder.write_text(sweep_dir / MARKDOWN_NAME, markdown(summary))
    return summary


class SweepSummary(Callback):
    """configs/train.yaml's hydra.callbacks: after each job of a multirun (a failed one records its error in
    its folder's error.txt and train.log first) and at the multirun's end, rewrite the sweep's summary."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        if OmegaConf.select(config, "hydra.mode") != RunMode.MULTIRUN:
            return
        if job_return.status == JobStatus.FAILED:
            try:
                job_return.return_value  # raises the job's exception
            except Exception as e:  # noqa: BLE001 - any error ends a job; its first line is what the summary shows
                first = (str(e).strip().splitlines() or [""])[0]
                error = f"{type(e).__name__}: {first}" if first else type(e).__name__
                log.error("job failed: %s", error)  # the job's train.log: Hydra raises it only after the last job
                run_folder.write_text(Path(config.hydra.runtime.output_dir) / ERROR_FILE, error + "\n")
        write(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        summary = write(Path(config.hydra.sweep.dir))
        log.info("sweep summary: %s (%d finished, %d failed)", Path(config.hydra.sweep.dir) / MARKDOWN_NAME,
                 summary["counts"][FINISHED], summary["counts"][FAILED])
