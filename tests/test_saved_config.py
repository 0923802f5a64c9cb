"""A checkpoint's config is data from someone else: resume= and evaluate.py rebuild it from the shipped config
groups, and nothing stored in it chooses what code runs."""

import pytest
import torch

import training
from errors import UserError
from commands.evaluation import run_evaluation

CHOICES = {"dataset": "crops", "augment": "none", "model": "tutorial_cnn", "loader": "default", "optim": "sgd",
           "scheduler": "step", "trainer": "default"}


@pytest.fixture
def last_pt(shared_run, tmp_path):
    """A real checkpoint of a one-epoch crop run with a step schedule and an added optimizer key: trained once
    per session, copied into tmp_path for the test to tamper with."""
    run = shared_run("loader.batch_size=16", "scheduler=step", "+optim.dampening=0.25")
    return run.copy(tmp_path / "run") / "checkpoints" / "last.pt"


def tampered(path, edit) -> None:
    checkpoint = torch.load(path, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, path)


def refused_everywhere(make_cfg, make_eval_cfg, path, match: str) -> None:
    with pytest.raises(UserError, match=match):
        training.run(make_cfg(f"resume={path}", "trainer.epochs=2"))
    with pytest.raises(UserError, match=match):
        run_evaluation(make_eval_cfg(f"checkpoint={path}"))


def test_checkpoints_record_their_config_choices(last_pt):
    assert torch.load(last_pt, weights_only=True)["choices"] == CHOICES


@pytest.mark.parametrize("recorded", [True, False], ids=["with-choices", "older-without-choices"])
def test_a_config_naming_a_function_is_refused_and_never_runs(make_cfg, make_eval_cfg, last_pt, tmp_path, recorded):
    """The issue's attack: Hydra would call shutil.copy(SRC, DST) while building the scheduler (resume) or
    the loader (evaluate.py)."""
    source, copied = tmp_path / "secret.txt", tmp_path / "stolen.txt"
    source.write_text("secret")
    attack = {"_target_": "shutil.copy", "_args_": [str(source), str(copied)]}

    def edit(checkpoint):
        checkpoint["config"]["scheduler"] = dict(attack)
        checkpoint["config"]["loader"] = dict(attack)
        if not recorded:
            del checkpoint["choices"]

    tampered(last_pt, edit)
    match = (r"sets loader._target_='shutil.copy' but loader=default ships .*may not choose what code runs"
             if recorded else "config's loader is none of the shipped choices")
    refused_everywhere(make_cfg, make_eval_cfg, last_pt, match)
    assert not copied.exists()


def test_an_unknown_choice_is_refused_in_one_line(make_cfg, make_eval_cfg, last_pt):
    tampered(last_pt, lambda c: c["choices"].update(model="../../evil"))
    refused_everywhere(make_cfg, make_eval_cfg, last_pt,
                       r"records model='../../evil', which this trainer does not ship \(choices: fastnet, resnet18, tutorial_cnn\)")


@pytest.mark.parametrize("key, value, match", [
    ("trainer.seed", "abc", r"config's trainer.seed='abc' does not fit the schema"),
    ("dataset.width", {"_target_": "os.system"}, r"config's dataset.width holds a dict, not a plain value"),
])
def test_a_stored_value_of_the_wrong_type_is_refused(make_cfg, make_eval_cfg, last_pt, key, value, match):
    group, name = key.split(".")
    tampered(last_pt, lambda c: c["config"][group].update({name: value}))
    refused_everywhere(make_cfg, make_eval_cfg, last_pt, match)


def test_a_checkpoint_without_choices_resumes_with_its_values(make_cfg, make_eval_cfg, last_pt):
    """Checkpoints saved before `choices` existed: looked up from their (shipped) targets. Values the run
    changed, including a key it added with +, come back; the wiring comes from configs/."""
    tampered(last_pt, lambda c: c.pop("choices"))
    training.run(make_cfg(f"resume={last_pt}", "trainer.epochs=2"))
    resumed = torch.load(last_pt, weights_only=True)
    assert resumed["epoch"] == 2 and resumed["choices"] == CHOICES
    assert resumed["optimizer"]["param_groups"][0]["dampening"] == 0.25
    assert resumed["config"]["loader"]["batch_size"] == 16
    assert run_evaluation(make_eval_cfg(f"checkpoint={last_pt}"))["epoch"] == 2


def test_classes_that_do_not_match_the_weights_are_one_line(make_eval_cfg, last_pt):
    tampered(last_pt, lambda c: c.update(classes=[*c["classes"], "extra"]))
    with pytest.raises(UserError, match=r"its weights do not fit the model for its 3 classes and input \(3, 32, 32\)") \
            as error:
        run_evaluation(make_eval_cfg(f"checkpoint={last_pt}", "predict=[]"))
    assert "\n" not in str(error.value)


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_a_pickle_checkpoint_is_refused_in_one_line(make_eval_cfg, tmp_path):
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="holds pickled Python objects") as error:
        run_evaluation(make_eval_cfg(f"checkpoint={tmp_path / 'evil.pt'}"))
    assert "\n" not in str(error.value)


def test_an_interpolation_in_a_stored_value_is_refused_and_never_resolved(make_cfg, make_eval_cfg, last_pt, tmp_path):
    """OmegaConf resolves ${...} when the node is read: oc.create could build a node naming its own _target_,
    so a plain-looking string could still run code (here: copy a file) while the model is built."""
    source, copied = tmp_path / "secret.txt", tmp_path / "stolen.txt"
    source.write_text("secret")
    payload = "${oc.create:'{_target_: shutil.copyfile, _args_: [" + f"{source}, {copied}" + "]}'}"
    tampered(last_pt, lambda c: c["config"]["model"].update(evil=payload))
    refused_everywhere(make_cfg, make_eval_cfg, last_pt, r"its config's model.evil holds an interpolation")
    assert not copied.exists()


@pytest.mark.parametrize("hflip", [True, False])
def test_a_checkpoint_from_before_the_augment_group_resumes_as_its_flip_setting(make_cfg, make_eval_cfg, last_pt,
                                                                                 hflip):
    """Checkpoints saved before augment existed hold dataset.hflip, which the datasets no longer take."""
    def older(checkpoint):
        checkpoint["config"]["dataset"]["hflip"] = hflip
        del checkpoint["config"]["augment"]
        checkpoint.pop("choices")

    tampered(last_pt, older)
    training.run(make_cfg(f"resume={last_pt}", "trainer.epochs=2"))
    resumed = torch.load(last_pt, weights_only=True)
    assert resumed["choices"]["augment"] == ("hflip" if hflip else "none")
    assert resumed["config"]["augment"]["hflip"] is hflip and "hflip" not in resumed["config"]["dataset"]
    assert run_evaluation(make_eval_cfg(f"checkpoint={last_pt}"))["epoch"] == 2
