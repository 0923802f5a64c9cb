"""evaluate.py tta=none|hflip|dihedral: softmax probabilities averaged over each item's views (commands/tta.py,
shared with predict.py), scored as evaluation scores logits; refused where the run did not train with those
flips unless tta_force=true."""

import json

import pytest
import torch
from PIL import Image

from commands.evaluation import Averaged, run_evaluation
from errors import UserError
from models.cnn import TutorialCNN

# The same overrides as test_checkpoints' one-epoch run: trained once per session (per worker) for both.
PLAIN = ("loader.batch_size=8", "scheduler=step", "scheduler.step_size=1", "scheduler.gamma=0.5", "trainer.epochs=1")
DIHEDRAL = ("loader.batch_size=8", "augment=dihedral", "trainer.epochs=2")


def test_averaged_is_the_log_of_the_mean_softmax_over_the_eight_orientations():
    torch.manual_seed(0)
    model = TutorialCNN(3, 32, 32, 4).eval()
    images = torch.randn(5, 3, 32, 32)
    views = [x for x in (images, images.transpose(-2, -1))
             for x in (x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2))]  # transpose x both flips: the 8 symmetries
    with torch.no_grad():
        expected = torch.stack([torch.softmax(model(v), dim=1) for v in views]).mean(0)
        torch.testing.assert_close(Averaged(model, "dihedral")(images).exp(), expected, rtol=1e-5, atol=1e-6)
        mirrored = (torch.softmax(model(images), 1) + torch.softmax(model(images.flip(-1)), 1)) / 2
        torch.testing.assert_close(Averaged(model, "hflip")(images).exp(), mirrored, rtol=1e-5, atol=1e-6)


def _evaluate(make_eval_cfg, run, tmp_path, name, *overrides):
    result = run_evaluation(make_eval_cfg(f"checkpoint={run.dir / 'checkpoints' / 'last.pt'}", *overrides,
                                          run_dir=tmp_path / name))
    assert json.loads((tmp_path / name / "eval.json").read_text())["tta"] == result["tta"]
    return result


def test_evaluate_averages_over_the_views_the_run_trained_with(shared_run, make_eval_cfg, tmp_path):
    run = shared_run(*DIHEDRAL)
    plain = _evaluate(make_eval_cfg, run, tmp_path, "none")
    assert plain["tta"] == "none" and plain["acc"] == run.metrics["val/acc"]
    for mode in ("hflip", "dihedral"):
        averaged = _evaluate(make_eval_cfg, run, tmp_path, mode, f"tta={mode}")
        assert averaged["tta"] == mode and 0 <= averaged["acc"] <= 1
        assert averaged["loss"] != pytest.approx(plain["loss"], rel=1e-6)  # the average was scored, not one view
        assert sum(map(sum, averaged["confusion"])) == sum(map(sum, plain["confusion"]))
    log = (tmp_path / "dihedral" / "train.log").read_text()  # evaluate.py's Hydra names it evaluate.log
    assert "tta=dihedral tta_scales=[1.0]: softmax probabilities averaged over 8 views of each item" in log


def test_a_tta_the_run_did_not_train_with_is_one_line_unless_forced(shared_run, make_eval_cfg, tmp_path):
    run = shared_run(*PLAIN)
    with pytest.raises(UserError, match=r"^tta=hflip: the run trained without augment.hflip, so the model never "
                                        r"saw those orientations .* use tta=none, or tta_force=true") as error:
        _evaluate(make_eval_cfg, run, tmp_path, "refused", "tta=hflip")
    assert "\n" not in str(error.value)
    assert _evaluate(make_eval_cfg, run, tmp_path, "forced", "tta=hflip", "tta_force=true")["tta"] == "hflip"


def test_tta_scales_average_zoomed_views_and_need_the_runs_zooms_unless_forced(shared_run, make_eval_cfg, tmp_path):
    run = shared_run(*DIHEDRAL)  # trained without augment.scale
    with pytest.raises(UserError, match=r"^tta_scales: the run trained without zooms \(augment.scale=1\), "
                                        r"so 0.8 .* tta_force=true"):
        _evaluate(make_eval_cfg, run, tmp_path, "refused", "tta=dihedral", "tta_scales=[1.0,0.8]")
    with pytest.raises(UserError, match=r"^tta_scales=0.8 must be a list of zoom factors"):  # a factor, not a list
        _evaluate(make_eval_cfg, run, tmp_path, "not_a_list", "tta=dihedral", "tta_scales=0.8")
    dihedral = _evaluate(make_eval_cfg, run, tmp_path, "dihedral", "tta=dihedral")
    zoomed = _evaluate(make_eval_cfg, run, tmp_path, "zoomed", "tta=dihedral", "tta_scales=[1.0,0.8]", "tta_force=true")
    assert zoomed["tta_scales"] == [1.0, 0.8] and dihedral["tta_scales"] == [1.0]
    assert zoomed["loss"] != pytest.approx(dihedral["loss"], rel=1e-6)
    assert json.loads((tmp_path / "zoomed" / "eval.json").read_text())["tta_scales"] == [1.0, 0.8]
    log = (tmp_path / "zoomed" / "train.log").read_text()
    assert "tta=dihedral tta_scales=[1.0, 0.8]: softmax probabilities averaged over 16 views of each item" in log


def test_an_unknown_tta_is_one_line(make_eval_cfg, tmp_path):
    from training.schema import check_ranges

    with pytest.raises(UserError, match=r"^tta must be one of none, hflip, dihedral, got 'flip'$"):
        check_ranges(make_eval_cfg(f"checkpoint={tmp_path / 'x.pt'}", "tta=flip"))


def test_predict_files_with_tta_give_averaged_probabilities(shared_run, make_eval_cfg, tmp_path):
    run = shared_run(*DIHEDRAL)
    image = tmp_path / "item.png"
    Image.new("RGB", (32, 32), (250, 250, 250)).save(image)
    result = run_evaluation(make_eval_cfg(f"checkpoint={run.dir / 'checkpoints' / 'last.pt'}", f"predict=[{image}]",
                                          "tta=dihedral", run_dir=tmp_path / "predict"))
    (prediction,) = result["predictions"]
    assert result["tta"] == "dihedral" and 0.5 <= prediction["probability"] <= 1
