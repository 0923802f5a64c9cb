"""The benchmark still runs end to end and names every case and target (its speeds are not checked here:
speed belongs to the benchmark itself, on a quiet machine)."""

import json

import numpy as np
import pytest
import tifffile

from benchmarks import throughput


@pytest.mark.slow
def test_smoke_run_measures_every_case_and_target(tmp_path):
    out = tmp_path / "bench.json"
    report = throughput.main(["--smoke", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))  # the JSON holds the whole report
    cases = report["cases"]
    for batch in throughput.BATCHES:
        assert cases[f"compute/{batch}"] > 0
        for cache in ("none", "memory", "disk"):
            for mode in ("device", "dataloader") if cache != "none" else ("dataloader",):
                for kind in ("loader", "train"):
                    assert cases[f"{cache}/{mode}/{kind}/{batch}"] > 0
    assert cases["tutorial/train/4"] > 0 and cases["tutorial/loader/4"] > 0
    assert set(report["targets"]) == set(throughput.TARGETS)
    assert all(target["ratio"] > 0 for target in report["targets"].values())
    assert report["peak_memory"]["ratio"] > 0
    # The GPU comparisons (fp32 against bf16; graphs need CUDA) and the whole-epoch timing run in smoke too.
    assert cases[f"memory/device/train-fp32/{throughput.GPU_BATCH}"] > 0
    assert cases[f"memory/device/train-bf16/{throughput.GPU_BATCH}"] > 0
    assert report["ratios"]["bf16_vs_fp32"] > 0
    assert report["epoch_seconds"][f"epoch/1200/{throughput.GPU_BATCH}/default"] > 0
    assert report["machine"]["gpu"] is None and report["machine"]["speed"]["precision"] == "fp32"


def test_preparation_smoke_run_times_every_case_against_its_targets(tmp_path):
    from benchmarks import preparation

    out = tmp_path / "prep.json"
    report = preparation.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["seconds"]) == {"reference", "reference-grey", "read-csv", "app", "epoch"}
    assert all(seconds > 0 for seconds in report["seconds"].values())
    assert set(report["targets"]) == set(preparation.TARGETS)
    assert report["peak_memory"]["memory"]["rows"] == report["settings"]["rows"]
    # The grey scenes are stored with one channel, their RGB copies with three; both peaks are measured.
    assert report["peak_memory"]["memory"]["stored_shape"] == [1, 32, 32]
    assert report["peak_memory"]["memory-rgb"]["stored_shape"] == [3, 32, 32]
    assert report["ratios"]["grey_vs_rgb_stored"] == round(1 / 3, 3) and report["ratios"]["grey_vs_rgb_peak"] >= 0
    assert report["vs_reference_grey_levels"]["max"] <= 2  # the same boxes as PIL cuts them, not others


@pytest.mark.slow  # the whole benchmark, in process
def test_gpu_knobs_runs_every_case_a_cpu_can_and_compares_each_with_the_default(tmp_path):
    from benchmarks import gpu_knobs

    out = tmp_path / "knobs.json"
    report = gpu_knobs.main(["--device", "cpu", "--seconds", "0.02", "--repeats", "1", "--rows", "300",
                             "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    # On a CPU: every batch size, and the one knob with no CUDA in it (bf16, graphs and fused SGD need a GPU).
    assert set(report["cases"]) == {f"default/{b}" for b in gpu_knobs.BATCHES} | {"nchw/512"}
    assert all(value > 0 for value in report["cases"].values())
    assert report["vs_default_512"]["default/512"] == 1.0


def test_folder_cache_smoke_run_times_every_case_against_its_target(tmp_path):
    from benchmarks import folder_cache

    out = tmp_path / "folders.json"
    report = folder_cache.main(["--smoke", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["seconds"]) == {"memory", "disk-first", "disk-second"}
    assert all(seconds > 0 for seconds in report["seconds"].values()) and report["target"]["ratio"] > 0


@pytest.mark.slow  # the whole benchmark, in process
def test_ema_cost_times_each_model_with_and_without_the_average(tmp_path):
    from benchmarks import ema_cost

    out = tmp_path / "ema.json"
    report = ema_cost.main(["--device", "cpu", "--seconds", "0.01", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report["cases"]) == {f"{m}/{ema_cost.BATCH['cpu'][m]}/{s}" for m in ema_cost.MODELS for s in ("off", "on")}
    assert all(value > 0 for value in report["cases"].values())
    assert set(report["ratios"]) == {f"{m}_on_vs_off" for m in ema_cost.MODELS}


@pytest.mark.slow  # peak memory is measured in child processes
def test_tiled_tiff_smoke_run_measures_every_case_on_identical_pixels(tmp_path, monkeypatch):
    from benchmarks import tiled_tiff

    # One round of the alternated tiff/npy builds, not two: each build is a process of its own (~3.3 s of CPU,
    # mostly importing torch), and one round still runs every case end to end.
    monkeypatch.setattr(tiled_tiff, "ROUNDS", 1)
    result = tiled_tiff.main(side=700, n=300, folder=tmp_path, seconds=0.2)
    assert set(result["cases"]) == {"tiff/memory", "npy/memory", "png/memory"}
    assert all(case["rows"] == 300 and case["stored_shape"] == [1, 32, 32] for case in result["cases"].values())
    # The .npy and the TIFF hold the same pixels, tile by tile, and the PNG's crops are the TIFF's.
    assert np.array_equal(tifffile.imread(tmp_path / "slide.tif"), np.load(tmp_path / "slide.npy"))
    assert result["png_crops_equal_tiff_crops"] is True
    assert result["none"]["train"] > 0 and result["none"]["items_per_cpu_second"] > 0
    assert set(result["met"]) == {"peak", "time", "none_train"}
    assert "> Stamp:" in tiled_tiff.report(result)
