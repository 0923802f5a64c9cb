"""What the validation split reports against accuracy on parts of real photos the model never saw.

    python -m benchmarks.split_leak [--seeds 0 1 2] [--epochs 10] [--boxes-per-half 200] [--out FILE.json]

Data: benchmarks/real_photos.py, ten photographs, one class each. Per seed, three runs of the default recipe
(train.py's defaults, `trainer.epochs` as given) through `training.run`:
- held out: `held_out.csv`, trained on boxes from the photos' left halves, validated on their right halves:
  the accuracy on pixels never trained on, the figure the others should report;
- default: `whole.csv` (boxes over whole photos, no split column) with the default `dataset.split_by=auto`;
  it holds WHOLE_PER_HALF boxes a photo for each held-out training box, so its training split (~0.8 of its
  rows, less the crops a region split leaves out) is about as large as the held-out run's: more training
  crops alone raise accuracy after 10 epochs, which is not a leak;
- row: the same CSV with `dataset.split_by=row`, the split every run drew before split_by existed.
A split that leaks reads above the held-out figure; the table gives each run's final and best validation
accuracy, the gap of each to the held-out run of its seed, and the machine's load average (other jobs
slow it, never change the accuracies: every run is seeded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

import training
from benchmarks.real_photos import make_photo_crops
from training import schema

ROOT = Path(__file__).resolve().parent.parent
WHOLE_PER_HALF = 1.3  # whole.csv's boxes a photo per held-out training box a photo
CASES = {  # name -> (CSV of make_photo_crops, overrides)
    "held out": ("held_out_csv", []),
    "default": ("whole_csv", []),
    "row": ("whole_csv", ["dataset.split_by=row"]),
}


def run_case(csv_path: Path, overrides: list[str], run_dir: Path, seed: int, epochs: int) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            *overrides, f"dataset.csv={csv_path}", f"run_dir={run_dir}", f"trainer.seed={seed}",
            f"trainer.epochs={epochs}", "trainer.progress=false", "trainer.device=cpu"])
    metrics = training.run(cfg)
    split = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["split"]
    return {"val/acc": metrics["val/acc"], "val/acc_best": metrics["val/acc_best"], "split": split}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10, help="train.py's default")
    parser.add_argument("--boxes-per-half", type=int, default=200)
    parser.add_argument("--whole-per-half", type=float, default=WHOLE_PER_HALF,
                        help="whole.csv's boxes a photo per held-out training box (2: as many rows in all)")
    parser.add_argument("--colour", action="store_true", help="keep the photos' colour (default: grey)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a busy machine)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks" / "split_leak.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    schema.register()
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__, "python": platform.python_version(),
                          "date": datetime.date.today().isoformat(), "load_average_start": os.getloadavg()},
              "epochs": args.epochs, "boxes_per_half": args.boxes_per_half, "whole_per_half": args.whole_per_half,
              "colour": args.colour,
              "runs": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            photos = make_photo_crops(Path(tmp) / f"photos-{seed}", seed=seed, boxes_per_half=args.boxes_per_half,
                                      whole_boxes=round(args.whole_per_half * args.boxes_per_half),
                                      grey=not args.colour)
            for name, (csv_name, overrides) in CASES.items():
                result = run_case(getattr(photos, csv_name), overrides, Path(tmp) / f"run-{seed}-{len(report['runs'])}",
                                  seed, args.epochs)
                report["runs"].append({"seed": seed, "case": name, **result, "load_average": os.getloadavg()})
                print(json.dumps(report["runs"][-1]), flush=True)
                out.write_text(json.dumps(report, indent=1))  # what has run so far survives a kill
    report["summary"] = summary(report["runs"])
    report["machine"]["load_average_end"] = os.getloadavg()
    out.write_text(json.dumps(report, indent=1))
    print(table(report))
    return report


def summary(runs: list[dict]) -> dict:
    """Per case: mean and standard deviation over seeds of the final and best accuracy, and of the gap of the
    final accuracy to the held-out run of the same seed (points)."""
    held = {r["seed"]: r["val/acc"] for r in runs if r["case"] == "held out"}
    found = {}
    for case in CASES:
        rows = [r for r in runs if r["case"] == case]
        final = np.array([r["val/acc"] for r in rows]) * 100
        best = np.array([r["val/acc_best"] for r in rows]) * 100
        gap = np.array([r["val/acc"] * 100 - held[r["seed"]] * 100 for r in rows if r["seed"] in held])
        found[case] = {"seeds": len(rows), "final": [final.mean(), final.std()], "best": [best.mean(), best.std()],
                       "gap": [gap.mean(), gap.std()] if len(gap) else None,
                       "split": rows[0]["split"]["by"] if rows else None}
    return found


def table(report: dict) -> str:
    lines = ["| run | split used | val acc, final (%) | best (%) | final minus held out (points) |",
             "| --- | --- | ---: | ---: | ---: |"]
    for case, s in report["summary"].items():
        gap = "" if s["gap"] is None or case == "held out" else f"{s['gap'][0]:+.1f} ± {s['gap'][1]:.1f}"
        lines.append(f"| {case} | {s['split']} | {s['final'][0]:.1f} ± {s['final'][1]:.1f} | "
                     f"{s['best'][0]:.1f} ± {s['best'][1]:.1f} | {gap} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
