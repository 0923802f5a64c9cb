"""evaluate.py: scoring a checkpoint reproduces the training run's numbers; predictions use training's pipeline."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import training
from datasets.crops import build
from errors import UserError
from training.build import build_model
from commands.evaluation import run_evaluation
from training.loop import Normalizer



@pytest.fixture
def trained(shared_run):
    """A two-epoch crop run (batch 8), shared by the session (read only; its crops are crop_csv's, written
    elsewhere); returns its run dir and metrics."""
    run = shared_run("loader.batch_size=8", "trainer.epochs=2")
    return run.dir, run.metrics


def test_best_checkpoint_scores_the_runs_best_accuracy(trained, make_eval_cfg, tmp_path):
    run_dir, metrics = trained
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    result = run_evaluation(make_eval_cfg(f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}"))
    assert result["acc"] == metrics["val/acc_best"]
    assert result["loss"] == best["metrics"]["val/loss"]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == result
    confusion = np.array(result["confusion"])
    assert confusion.shape == (2, 2) and confusion.sum() == 12  # 20% of each class's 32 crops held out
    for i, name in enumerate(["bright", "dark"]):
        assert result["per_class_acc"][name] == confusion[i, i] / confusion[i].sum()
        precision, recall = confusion[i, i] / confusion[:, i].sum(), confusion[i, i] / confusion[i].sum()
        assert (result["precision"][name], result["recall"][name]) == (precision, recall)
        assert result["f1"][name] == pytest.approx(2 * precision * recall / (precision + recall))
    assert result["f1_macro"] == pytest.approx(sum(result["f1"].values()) / 2)


def test_other_data_with_other_classes_is_a_user_error(trained, make_eval_cfg, crop_csv, tmp_path):
    run_dir, _ = trained
    renamed = crop_csv.with_name("renamed.csv")
    renamed.write_text(crop_csv.read_text().replace("bright", "light"))
    cfg = make_eval_cfg(f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}", "dataset=crops",
                        f"dataset.csv={renamed}", f"dataset.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(UserError, match=r"trained on \['bright', 'dark'\]"):
        run_evaluation(cfg)


def test_predict_uses_the_training_preprocessing(trained, make_eval_cfg, crop_csv, tmp_path):
    """A file holding exactly one crop's pixels gets the probability the model gives that crop in training."""
    run_dir, _ = trained
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    scene = np.asarray(Image.open(crop_csv.parent / "scene0.png"))
    crop = scene[16:32, 0:16]  # line 5 of the CSV: a 16x16 box, resized to 32x32 like every training item
    Image.fromarray(crop).save(tmp_path / "crop.png")
    np.save(tmp_path / "crop.npy", crop)

    result = run_evaluation(make_eval_cfg(f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}",
                                          f"predict=[{tmp_path / 'crop.png'},{tmp_path / 'crop.npy'}]"))

    bundle = build(csv=str(crop_csv), root=None, width=32, height=32, channels=3, cache="memory",
                   cache_dir=str(tmp_path / "cache"), val_fraction=0.2, mean=[0.5], std=[0.5], seed=0)
    item = bundle.train.store.images[4]  # row order of the CSV
    model = build_model(checkpoint["config"]["model"], (3, 32, 32), 2, torch.device("cpu"))
    model.load_state_dict(checkpoint["model"])
    with torch.no_grad():
        probabilities = torch.softmax(model.eval()(Normalizer([0.5], [0.5], "cpu")(item[None])), 1)[0]
    expected = checkpoint["classes"][int(probabilities.argmax())]
    for prediction in result["predictions"]:
        assert prediction["class"] == expected
        assert prediction["probability"] == pytest.approx(float(probabilities.max()), abs=1e-6)


@pytest.mark.slow
def test_evaluate_py_prints_a_table(evaluate_py_run):
    result = evaluate_py_run
    metrics = json.loads((result.cwd / "run" / "metrics.json").read_text())  # the run it scored
    assert result.returncode == 0, result.stderr
    assert f"{metrics['val/acc_best']:.1%}" in result.stdout
    assert "0 bright" in result.stdout and "1 dark" in result.stdout
    assert "precision" in result.stdout and "macro-F1" in result.stdout
    assert result.run_dir is not None  # one folder under outputs/eval/
    assert json.loads((result.run_dir / "eval.json").read_text())["acc"] == metrics["val/acc_best"]


def test_predict_of_a_missing_file_is_a_user_error(trained, make_eval_cfg, tmp_path):
    run_dir, _ = trained
    cfg = make_eval_cfg(f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}", f"predict=[{tmp_path / 'nowhere.png'}]")
    with pytest.raises(UserError, match="predict: file not found"):
        run_evaluation(cfg)


def test_scores_in_the_precision_the_run_trained_in(make_cfg, make_eval_cfg, crop_csv, tmp_path):
    """A bf16 run validated under bf16 autocast; scoring its checkpoint in fp32 would give another loss."""
    metrics = training.run(make_cfg(f"dataset.csv={crop_csv}", "loader.batch_size=8", "trainer.precision=bf16"))
    result = run_evaluation(make_eval_cfg(f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}"))
    assert (result["acc"], result["loss"]) == (metrics["val/acc"], metrics["val/loss"])
    assert "precision bf16" in (tmp_path / "eval" / "train.log").read_text()
