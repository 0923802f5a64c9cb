"""benchmarks/recipes.py runs every recipe over several seeds and reports mean ± sd; a recipe is called better
than the default only where the difference exceeds the spread (its accuracies belong to the benchmark itself)."""

import json

import pytest

from benchmarks import recipes


def test_a_recipe_is_better_only_beyond_the_spread():
    reference = {"mean": 0.60, "sd": 0.02, "n": 3}
    assert recipes.verdict({"mean": 0.65, "sd": 0.02, "n": 3}, reference).startswith("better (+5.0 > 4.0)")
    assert recipes.verdict({"mean": 0.63, "sd": 0.02, "n": 3}, reference).startswith("within spread (+3.0, spread 4.0)")
    assert recipes.verdict({"mean": 0.55, "sd": 0.005, "n": 3}, reference).startswith("worse (-5.0 < -2.5)")
    assert recipes.spread([0.5, 0.6, 0.7]) == pytest.approx({"mean": 0.6, "sd": 0.1, "n": 3})
    # On the same runs the spread is that of the per-seed differences (+1, +2, +3 points: mean 2 > sd 1).
    runs = [{"tta": 0.51, "plain": 0.50}, {"tta": 0.62, "plain": 0.60}, {"tta": 0.73, "plain": 0.70}]
    assert recipes.paired_verdict(runs, "tta", "plain") == "better (+2.0 > 1.0)"
    assert recipes.paired_verdict(runs[:1] + [{"tta": 0.58, "plain": 0.60}], "tta", "plain").startswith("within spread")


@pytest.mark.slow  # every recipe trains twice (one epoch each), in process
def test_smoke_run_trains_every_recipe_over_seeds_and_tabulates_mean_and_sd(tmp_path, capsys):
    out = tmp_path / "recipes.json"
    report = recipes.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = report["data"]["generated"]
    assert [row["recipe"] for row in rows] == [recipe.name for recipe in recipes.RECIPES]
    for row in rows:
        accs = [run["val/acc"] for run in row["runs"]]
        assert [run["seed"] for run in row["runs"]] == [0, 1] and row["epochs"] == 1
        assert row["val/acc"] == pytest.approx(recipes.spread(accs))
        assert all(run["train_seconds"] > 0 for run in row["runs"])
    with_tta = [row for row in rows if row["tta"] != "none"]
    assert {row["tta"] for row in with_tta} == {"hflip", "dihedral"}
    for row in with_tta:  # scored again from last.pt, whose plain score was checked equal to the run's own
        assert row["val/acc_tta"] == pytest.approx(recipes.spread([run["val/acc_tta"] for run in row["runs"]]))
    # The photo goal's preset runs with EMA: its live weights (the recipe without EMA) are scored too.
    small_data = next(row for row in rows if row["recipe"] == "small_data")
    assert "trainer.ema" not in " ".join(small_data["overrides"]) and "val/acc_live" in small_data
    # Its TTA also zooms out: scored with and without the zoom on the same runs.
    assert small_data["tta_scales"] == [1.0, 0.8] and "val/acc_tta_unzoomed" in small_data
    assert {"date", "cpu", "torch", "torch_threads", "load_average_1min", "load_average_1min_after"} <= set(report["stamp"])
    printed = capsys.readouterr().out
    assert "| recipe | epochs | batch | train s | val acc (last) | best epoch | vs default | with TTA |" in printed
    assert "| without EMA and TTA | EMA + TTA vs neither |" in printed
    assert "small_data: " in printed and "  tta_scales [1.0, 0.8] against dihedral alone: " in printed
    assert next(line for line in printed.splitlines() if line.startswith("| small_data |")).count(" ± ") == 4
    assert printed.count(" ± ") >= 2 * len(rows)
