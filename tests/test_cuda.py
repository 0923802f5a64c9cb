"""The CUDA paths: every test here needs a GPU and skips, saying so, without one (`python -m pytest -m cuda`
runs just these; benchmarks/cuda_check.sh runs them on a lent GPU machine)."""

import json
import warnings
from pathlib import Path

import pytest
import torch

import training
from benchmarks import throughput
from datasets.base import ArrayStore, InMemoryDataset
from errors import UserError
from models.cnn import TutorialCNN
from tests import files
from tests.helpers import TRAIN_PY, run_python
from training import checkpoint as checkpoints
from commands.evaluation import run_evaluation
from training.graphs import WARMUP_STEPS, CudaGraphStep
from training.loaders import DeviceLoader, EpochSeededDataLoader, build_loader, free_memory
from training.loop import Normalizer, evaluate
from training.step import StepOptions, TrainStep
from training.speed import MixedPrecision

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def cuda_cfg(make_cfg, crop_csv, *overrides, **kwargs):
    return make_cfg(f"dataset.csv={crop_csv}", "trainer.device=cuda", "loader.batch_size=8", "trainer.epochs=2",
                    *overrides, **kwargs)


def last(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)


@pytest.mark.parametrize("mode, loader", [("device", DeviceLoader), ("dataloader", EpochSeededDataLoader)])
def test_cuda_run_in_each_loader_mode(make_cfg, crop_csv, tmp_path, mode, loader):
    metrics = training.run(cuda_cfg(make_cfg, crop_csv, f"loader.mode={mode}"))
    assert metrics["val/acc"] >= 0.9
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"{loader.__name__} loader" in log and "device cuda" in log
    assert "channels_last=True" in log and "cudnn_benchmark=True" in log and "precision_reason=auto:" in log
    assert "cuda_graphs=True" in log and "cuda_graphs_reason=auto: on" in log  # measured faster: on by default


def test_auto_leaves_cuda_graphs_off_for_a_per_step_scheduler_and_trains(make_cfg, crop_csv, tmp_path):
    metrics = training.run(cuda_cfg(make_cfg, crop_csv, "scheduler=warmup_cosine"))
    assert metrics["val/acc"] >= 0.9
    log = (tmp_path / "run" / "train.log").read_text()
    assert "cuda_graphs=False" in log and "cuda_graphs_reason=auto: off, a per-step scheduler" in log


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_checkpoints_the_scaler_and_resumes(make_cfg, crop_csv, tmp_path, precision):
    metrics = training.run(cuda_cfg(make_cfg, crop_csv, f"trainer.precision={precision}"))
    assert metrics["val/acc"] >= 0.9
    saved = last(tmp_path / "run")
    if precision == "fp16":
        assert saved["scaler"]["scale"] > 0 and saved["scaler"]["_growth_tracker"] >= 0
    else:
        assert saved["scaler"] is None
    resumed = training.run(make_cfg(f"resume={tmp_path / 'run' / 'checkpoints' / 'last.pt'}", "trainer.epochs=3",
                                    "trainer.device=cuda"))
    assert resumed["val/acc"] >= 0.9 and last(tmp_path / "run")["epoch"] == 3


def test_compile_on_cuda_trains(make_cfg, crop_csv):
    assert training.run(cuda_cfg(make_cfg, crop_csv, "trainer.compile=true"))["val/acc"] >= 0.9


def test_cuda_graphs_train_like_eager_steps(make_cfg, crop_csv, tmp_path):
    """fp32, deterministic cuDNN: a run replaying captured steps ends where the eager run does."""
    common = ("trainer.precision=fp32", "trainer.deterministic=true", "scheduler=step", "scheduler.step_size=1")
    eager = training.run(cuda_cfg(make_cfg, crop_csv, *common, "trainer.cuda_graphs=false", run_dir=tmp_path / "eager"))
    graphed = training.run(cuda_cfg(make_cfg, crop_csv, *common, "trainer.cuda_graphs=true", run_dir=tmp_path / "graphs"))
    assert graphed["val/acc"] == eager["val/acc"]
    assert graphed["val/loss"] == pytest.approx(eager["val/loss"], rel=1e-4)
    for name, value in last(tmp_path / "eager")["model"].items():
        torch.testing.assert_close(last(tmp_path / "graphs")["model"][name], value, rtol=1e-4, atol=1e-5)


def test_graphed_step_equals_eager_steps_through_a_short_batch_and_a_new_learning_rate():
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    generator = torch.Generator().manual_seed(0)
    sizes = [16] * (WARMUP_STEPS + 3) + [5] + [16] * 2  # a short last batch, then a new epoch
    batches = [(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator).to(CUDA),
                torch.randint(0, 10, (n,), generator=generator).to(CUDA)) for n in sizes]
    normalize = Normalizer([0.5] * 3, [0.5] * 3, CUDA)
    amp = MixedPrecision("fp32", CUDA)
    models = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = TutorialCNN(3, 32, 32, 10).to(CUDA)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        options = StepOptions(amp, clip_grad_norm=1.0)
        step = (CudaGraphStep(model, optimizer, normalize, options, CUDA, 16) if graphed
                else TrainStep(model, optimizer, normalize, options, CUDA))
        losses = []
        for i, (images, targets) in enumerate(batches):
            if i == len(batches) - 2:
                optimizer.param_groups[0]["lr"] = 0.005  # a scheduler's epoch step
            losses.append(step(images, targets))
        models.append((model, torch.stack(losses).cpu(), step))
    (eager, eager_losses, _), (graphed, graphed_losses, step) = models
    assert step.captures == 2  # once, and again for the new learning rate; the short batch ran eagerly
    torch.testing.assert_close(graphed_losses, eager_losses, rtol=1e-5, atol=1e-6)  # each step's own loss
    for a, b in zip(eager.parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_replayed_steps_never_wait_for_the_gpu():
    model = TutorialCNN(3, 32, 32, 10).to(CUDA)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = CudaGraphStep(model, optimizer, Normalizer([0.5] * 3, [0.5] * 3, CUDA),
                         StepOptions(MixedPrecision("bf16", CUDA)), CUDA, 16)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, device=CUDA)
    targets = torch.randint(0, 10, (16,), device=CUDA)
    for _ in range(WARMUP_STEPS + 1):
        step(images, targets)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(images, targets) for _ in range(10)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.stack(losses)).all()


def test_validation_syncs_the_same_number_of_times_for_one_batch_or_many(build_crops, crop_csv):
    bundle = build_crops(f"dataset.csv={crop_csv}")
    model = TutorialCNN(*bundle.input_shape, len(bundle.classes)).to(CUDA)
    normalize = Normalizer(bundle.mean, bundle.std, CUDA)
    syncs = []
    for batch in (len(bundle.val), 1):  # one batch, then one per item
        loader = DeviceLoader(bundle.val, batch, False, CUDA, seed=0, train=False)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                evaluate(model, loader, normalize, CUDA, 2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchroniz" in str(w.message) for w in caught))
    assert syncs[0] == syncs[1]


@pytest.mark.parametrize("first, then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_resume_across_devices(make_cfg, crop_csv, tmp_path, first, then):
    training.run(make_cfg(f"dataset.csv={crop_csv}", "loader.batch_size=8", f"trainer.device={first}",
                          "trainer.precision=fp32"))
    resumed = training.run(make_cfg(f"resume={tmp_path / 'run' / 'checkpoints' / 'last.pt'}", "trainer.epochs=2",
                                    f"trainer.device={then}"))
    assert resumed["val/acc"] >= 0.9 and last(tmp_path / "run")["epoch"] == 2


def test_evaluate_on_cuda_scores_the_runs_validation_accuracy(make_cfg, make_eval_cfg, crop_csv, tmp_path):
    metrics = training.run(cuda_cfg(make_cfg, crop_csv))  # precision auto: what the GPU trains in
    result = run_evaluation(make_eval_cfg(f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}",
                                          "device=cuda"))
    assert result["acc"] == metrics["val/acc"]
    assert result["loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)


def test_resume_a_checkpoint_from_a_machine_with_more_gpus(make_cfg, crop_csv, tmp_path):
    training.run(cuda_cfg(make_cfg, crop_csv, "trainer.epochs=1"))
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    saved = torch.load(path, weights_only=True)
    extra = torch.cuda.device_count() + 1 - len(saved["rng"]["cuda"])
    saved["rng"]["cuda"] = list(saved["rng"]["cuda"]) + [saved["rng"]["cuda"][0].clone()] * extra
    checkpoints.save(saved, path)  # as if saved where one more GPU was visible
    resumed = training.run(make_cfg(f"resume={path}", "trainer.epochs=2", "trainer.device=cuda"))
    assert resumed["val/acc"] >= 0.9


@pytest.mark.slow
def test_one_process_nccl_torchrun(crop_csv, tmp_path):
    done = run_python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", TRAIN_PY,
                      f"dataset.csv={crop_csv}", "loader.batch_size=8", "trainer.epochs=2", "trainer.progress=false",
                      "trainer.device=cuda", "hydra.run.dir=run", cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and metrics["val/acc"] >= 0.9
    assert not any(k.startswith("module.") for k in last(tmp_path / "run")["model"])  # DDP-wrapped, saved bare


@pytest.mark.slow
def test_more_processes_than_gpus_is_one_line(crop_csv, tmp_path):
    processes = torch.cuda.device_count() + 1
    done = run_python("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", TRAIN_PY,
                      f"dataset.csv={crop_csv}", "trainer.progress=false", "trainer.device=cuda", cwd=tmp_path,
                      timeout=240)
    assert done.returncode != 0
    assert f"only {torch.cuda.device_count()} GPU(s) are visible" in done.stdout + done.stderr
    assert "invalid device ordinal" not in done.stdout + done.stderr


def test_benchmark_on_cuda_records_the_gpu_and_the_gpu_comparisons(tmp_path):
    report = throughput.main(["--smoke", "--device", "cuda", "--out", str(tmp_path / "bench.json")])
    gpu = report["machine"]["gpu"]
    assert gpu["name"] and gpu["cuda"] and len(gpu["capability"]) == 2
    assert report["machine"]["speed"]["channels_last"] and report["machine"]["speed"]["cudnn_benchmark"]
    b = throughput.GPU_BATCH
    for name in ("fp32", "bf16", "fp32-graphs", "bf16-graphs"):
        assert report["cases"][f"memory/device/train-{name}/{b}"] > 0
    assert {"app_vs_ceiling_512", "app_vs_tutorial_512", "epoch_50k_seconds"} - set(report["targets"]) == {
        "epoch_50k_seconds"}  # smoke times a smaller epoch; the 50,000-sample one is --quick's and full's
    assert report["ratios"]["graphs_vs_eager_bf16"] > 0 and report["ratios"]["epoch_graphs_vs_eager"] > 0


def test_data_larger_than_free_gpu_memory_falls_back_to_the_dataloader():
    """auto falls back to pinned host memory with a notice; a forced device mode fails in one line."""
    images = torch.zeros(40_000, 3, 32, 32, dtype=torch.uint8)  # 117 MiB
    dataset = InMemoryDataset(ArrayStore(images, torch.zeros(len(images), dtype=torch.int64)))
    filler = torch.empty(free_memory(CUDA) - 100 * 2**20, dtype=torch.uint8, device=CUDA)  # leaves ~100 MiB
    try:
        keys = {**throughput.LOADER_DEFAULTS, "batch_size": 512}
        auto = build_loader(dataset, device=CUDA, seed=0, train=True, **{**keys, "mode": "auto"})
        assert isinstance(auto, EpochSeededDataLoader) and auto.pin_memory and "does not fit" in auto.notice
        with pytest.raises(UserError, match="loader.mode=device needs"):
            build_loader(dataset, device=CUDA, seed=0, train=True, **{**keys, "mode": "device"})
    finally:
        del filler
        torch.cuda.empty_cache()  # back to the driver, so mem_get_info sees it free again
    assert isinstance(build_loader(dataset, device=CUDA, seed=0, train=True, **{**keys, "mode": "auto"}),
                      DeviceLoader)


@pytest.mark.parametrize("mode", ["device", "dataloader"])
def test_grey_data_crosses_to_the_gpu_as_one_channel_and_trains_with_cuda_graphs(make_cfg, build_crops, tmp_path,
                                                                                  mode):
    """Grey crops stored once: the GPU copy (device loader) or each pinned batch (DataLoader) holds one
    channel, expanded on the GPU to the batches the CPU gives; a graphed run trains on them."""
    grey_csv = files.write_crop_scenes(tmp_path / "grey", channels=1)
    bundle = build_crops(f"dataset.csv={grey_csv}")
    keys = {**throughput.LOADER_DEFAULTS, "batch_size": 8, "mode": mode}
    on_gpu = build_loader(bundle.train, device=CUDA, seed=0, train=True, **keys)
    on_cpu = build_loader(bundle.train, device=torch.device("cpu"), seed=0, train=True, **keys)
    if mode == "device":
        assert on_gpu.images.device.type == "cuda" and on_gpu.images.shape[1] == 1
    else:
        assert on_gpu.pin_memory and on_gpu.dataset[0][0].shape[0] == 1
    for (images, labels), (expected, expected_labels) in zip(on_gpu, on_cpu, strict=True):
        assert images.device.type == "cuda" and images.shape[1] == 3 and images.stride(1) == 0
        assert torch.equal(images.cpu(), expected) and torch.equal(labels.cpu(), expected_labels)
    metrics = training.run(cuda_cfg(make_cfg, grey_csv, f"loader.mode={mode}", "trainer.cuda_graphs=true",
                                    "augment=dihedral", "augment.cutout=4"))
    assert metrics["val/acc"] >= 0.9
    assert "crops: 64 x (1, 32, 32) uint8" in (tmp_path / "run" / "train.log").read_text()
