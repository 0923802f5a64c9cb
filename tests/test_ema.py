"""trainer.ema: the weights' moving average is what a run validates and saves as `model` (so evaluate.py, export.py
and predict load it), BatchNorm's statistics are averaged with it, a resume continues it bit for bit, and the
CUDA-graph step records its update (the graph tests need a GPU and skip without one)."""

import shutil

import pytest
import torch
from torch import nn

import training
from commands.evaluation import run_evaluation
from commands.onnx_model import run_export
from datasets.base import ArrayStore, InMemoryDataset
from errors import UserError
from models.cnn import TutorialCNN
from tests.helpers import assert_same_state, resume_against_unbroken
from training import checkpoint as checkpoints
from training.ema import WeightAverage
from training.graphs import WARMUP_STEPS, CudaGraphStep
from training.loaders import DeviceLoader
from training.loop import Normalizer
from training.speed import MixedPrecision
from training.step import StepOptions, TrainStep

# 64 crops, 52 train = 7 batches of 8 per epoch; decay 0.9 stays in its warm-up ((1 + n) / (10 + n) < 0.9)
# over these 14 steps, so the average differs from the live weights by a lot.
EMA_RUN = ("loader.batch_size=8", "scheduler=step", "scheduler.step_size=1", "scheduler.gamma=0.5", "trainer.ema=0.9")


def test_the_average_follows_its_formula_and_averages_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    average = WeightAverage(model, decay=0.5)
    expected = {name: value.clone() for name, value in model.state_dict().items()}
    for n in range(12):  # past the warm-up: (1 + n) / (10 + n) reaches 0.5 at n = 8
        model(torch.randn(8, 3, 6, 6))  # training mode: BatchNorm's running statistics and counter move
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter))
        average.update()
        decay = min(0.5, (1 + n) / (10 + n))
        for name, live in model.state_dict().items():
            expected[name] = decay * expected[name] + (1 - decay) * live if live.is_floating_point() else live.clone()
    got = average.model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert got["1.num_batches_tracked"] == 12  # copied, not averaged
    assert not torch.equal(got["1.running_mean"], model.state_dict()["1.running_mean"])  # averaged, not copied
    assert average.updates.item() == 12 and not average.model.training
    assert not any(p.requires_grad for p in average.model.parameters())


def test_a_run_validates_and_saves_the_average(shared_run):
    run = shared_run(*EMA_RUN, "trainer.epochs=2")
    last, best = run.checkpoint("last"), run.checkpoint("best")
    assert last["ema_updates"] == 14 and set(last["training_model"]) == set(last["model"])
    assert any(not torch.equal(last["model"][k], last["training_model"][k]) for k in last["model"])
    assert run.metrics["val/acc"] == last["metrics"]["val/acc"]
    assert best["metrics"]["val/acc"] == run.metrics["val/acc_best"]


def test_the_live_weights_are_those_of_the_same_run_without_the_average(shared_run):
    # benchmarks/recipes.py scores an EMA run's live weights as "the same recipe without EMA", from the same run.
    with_ema = shared_run(*EMA_RUN, "trainer.epochs=2").checkpoint("last")
    without = shared_run(*EMA_RUN[:-1], "trainer.epochs=2").checkpoint("last")
    assert with_ema["training_model"].keys() == without["model"].keys()
    for name, tensor in without["model"].items():
        assert torch.equal(with_ema["training_model"][name], tensor), name


def _scored(make_eval_cfg, checkpoint, run_dir):
    return run_evaluation(make_eval_cfg(f"checkpoint={checkpoint}", run_dir=run_dir))


def test_evaluate_scores_the_average_as_validation_did(shared_run, make_eval_cfg, tmp_path):
    run = shared_run(*EMA_RUN, "trainer.epochs=2")
    last = run.checkpoint("last")
    result = _scored(make_eval_cfg, run.dir / "checkpoints" / "last.pt", tmp_path / "eval")
    assert result["acc"] == last["metrics"]["val/acc"]
    assert result["loss"] == pytest.approx(last["metrics"]["val/loss"], rel=1e-6)
    # The live weights score otherwise: the comparison above can tell the two apart.
    live = {**last, "model": last["training_model"]}
    torch.save(live, tmp_path / "live.pt")
    assert _scored(make_eval_cfg, tmp_path / "live.pt", tmp_path / "eval-live")["loss"] != \
        pytest.approx(last["metrics"]["val/loss"], rel=1e-6)


@pytest.mark.slow
def test_export_writes_the_average(shared_run, make_eval_cfg, tmp_path):
    """An export traces `model`, the average: the ONNX file scores what the run's validation scored."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONFIGS
    run = shared_run(*EMA_RUN, "trainer.epochs=2")
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"checkpoint={run.dir / 'checkpoints' / 'last.pt'}",
                                                       f"run_dir={tmp_path / 'export'}"])
    onnx_path = run_export(cfg)
    result = _scored(make_eval_cfg, onnx_path, tmp_path / "eval")
    assert result["acc"] == run.metrics["val/acc"]
    assert result["loss"] == pytest.approx(run.metrics["val/loss"], rel=1e-4)


def test_a_resumed_run_continues_the_average_bitwise(shared_run, make_cfg, shared_crop_csv, tmp_path):
    resumed, unbroken, _ = resume_against_unbroken(shared_run, make_cfg, shared_crop_csv, tmp_path / "run", EMA_RUN,
                                                   stop_after=1, epochs=2)
    assert resumed["ema_updates"] == unbroken["ema_updates"] == 14
    assert_same_state(resumed, unbroken)  # the average, the live weights and the optimizer, bit for bit


def test_a_checkpoint_without_its_live_weights_is_one_line(shared_run, make_cfg, shared_crop_csv, tmp_path):
    one_epoch = shared_run(*EMA_RUN, "trainer.epochs=1").checkpoint("last")
    del one_epoch["training_model"]
    torch.save(one_epoch, tmp_path / "edited.pt")
    with pytest.raises(UserError, match=r"edited.pt: its config sets trainer.ema but it holds no training_model"):
        training.run(make_cfg(f"dataset.csv={shared_crop_csv}", "trainer.epochs=2",
                              f"resume={tmp_path / 'edited.pt'}", run_dir=tmp_path / "run"))


def test_the_average_keeps_its_tensors_through_updates_and_a_restore(shared_run):
    """A captured CUDA graph reads and writes the tensors it saw at capture: the average's update and a
    resume's load must work in place, never replace them (checked here on the CPU; replayed on a GPU below)."""
    saved = shared_run(*EMA_RUN, "trainer.epochs=1").checkpoint("last")
    model = TutorialCNN(3, 32, 32, 2)
    average = WeightAverage(model, 0.9)
    before = [t.data_ptr() for t in [*average.model.parameters(), *average.model.buffers(), average.updates]]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = TrainStep(model, optimizer, Normalizer([0.5] * 3, [0.5] * 3, torch.device("cpu")), StepOptions(),
                     torch.device("cpu"), average)
    step(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
    assert average.updates.item() == 1
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    loader = DeviceLoader(InMemoryDataset(ArrayStore(images, torch.tensor([0, 1, 0, 1]))), 4, True,
                          torch.device("cpu"), seed=0, train=True)
    state = checkpoints.TrainingState(model, optimizer, None, MixedPrecision("fp32", torch.device("cpu")),
                                      loader, None, {}, {}, ema=average)
    state.restore(saved, "resume=last.pt")
    assert [t.data_ptr() for t in [*average.model.parameters(), *average.model.buffers(), average.updates]] == before
    assert average.updates.item() == saved["ema_updates"]
    for name, value in average.model.state_dict().items():
        assert torch.equal(value, saved["model"][name]), name
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved["training_model"][name]), name


def _graph_batches(sizes):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator).cuda(),
             torch.randint(0, 10, (n,), generator=generator).cuda()) for n in sizes]


@pytest.mark.cuda
def test_a_graphed_step_updates_the_average_as_an_eager_one_does():
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    cuda = torch.device("cuda")
    batches = _graph_batches([16] * (WARMUP_STEPS + 4) + [5] + [16] * 2)  # replays, a short batch, replays
    normalize = Normalizer([0.5] * 3, [0.5] * 3, cuda)
    averages = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = TutorialCNN(3, 32, 32, 10).to(cuda)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        average = WeightAverage(model, 0.99)
        options = StepOptions(MixedPrecision("fp32", cuda))
        step = (CudaGraphStep(model, optimizer, normalize, options, cuda, 16, average) if graphed
                else TrainStep(model, optimizer, normalize, options, cuda, average))
        for images, targets in batches:
            step(images, targets)
        averages.append(average)
    eager, graphed = averages
    assert graphed.updates.item() == eager.updates.item() == len(batches)
    for a, b in zip(eager.model.parameters(), graphed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_replayed_steps_with_an_average_never_wait_for_the_gpu():
    cuda = torch.device("cuda")
    model = TutorialCNN(3, 32, 32, 10).to(cuda)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = CudaGraphStep(model, optimizer, Normalizer([0.5] * 3, [0.5] * 3, cuda),
                         StepOptions(MixedPrecision("bf16", cuda)), cuda, 16, WeightAverage(model, 0.999))
    ((images, targets),) = _graph_batches([16])
    for _ in range(WARMUP_STEPS + 1):
        step(images, targets)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            step(images, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.ema.updates.item() == WARMUP_STEPS + 11


@pytest.mark.cuda
def test_a_cuda_run_with_graphs_and_an_average_resumes_bitwise(make_cfg, crop_csv, tmp_path):
    common = (f"dataset.csv={crop_csv}", "trainer.device=cuda", "trainer.cuda_graphs=true", "trainer.precision=fp32",
              "trainer.deterministic=true", *EMA_RUN)
    training.run(make_cfg(*common, "trainer.epochs=2", run_dir=tmp_path / "unbroken"))
    training.run(make_cfg(*common, "trainer.epochs=1", run_dir=tmp_path / "broken"))
    folder = tmp_path / "broken" / "checkpoints"
    shutil.copy(folder / "last.pt", folder / "epoch1.pt")
    training.run(make_cfg(*common, "trainer.epochs=2", f"resume={folder / 'epoch1.pt'}", run_dir=tmp_path / "x"))
    resumed = torch.load(folder / "last.pt", weights_only=True)
    unbroken = torch.load(tmp_path / "unbroken" / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["ema_updates"] == unbroken["ema_updates"] == 14
    for name, value in unbroken["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
