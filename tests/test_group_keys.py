"""A dataset key the chosen dataset does not take, though another choice does, is one line before Hydra composes
(training/group_keys.py); keys no choice has stay Hydra's to report."""

import re

import pytest

from errors import UserError
from tests.helpers import TRAIN_PY, run_python
from training import group_keys


def cifar_split(key: str) -> str:
    return (f"dataset.{key} is not a key of dataset=cifar10: CIFAR10's validation set is its test split, so there "
            f"is nothing to split or fold; remove dataset.{key}, or use it with dataset=crops, datasetfolder or "
            "imagefolder")


def whole(message: str) -> str:
    return f"^{re.escape(message)}$"


@pytest.mark.parametrize("key, value", [("fold", "1"), ("folds", "3"), ("split_by", "file"),
                                        ("group_pattern", "'^[^_]+'"), ("val_fraction", "0.3")])
def test_split_keys_with_cifar10_are_one_line_saying_why(key, value):
    with pytest.raises(UserError, match=whole(cifar_split(key))):
        group_keys.check(["dataset=cifar10", f"dataset.{key}={value}"])


def test_the_dataset_an_experiment_chooses_counts_unless_the_command_chooses_another():
    with pytest.raises(UserError, match=whole(cifar_split("fold"))):
        group_keys.check(["experiment=tutorial", "-m", "dataset.fold=0,1,2"])  # tutorial sets dataset=cifar10
    group_keys.check(["experiment=tutorial", "dataset=crops", "dataset.fold=1"])
    group_keys.check(["dataset.fold=1", "dataset.level=2"])  # train.yaml's default: crops


def test_a_sweep_over_datasets_is_refused_when_one_of_them_lacks_the_key():
    with pytest.raises(UserError, match=whole(cifar_split("fold"))):
        group_keys.check(["-m", "dataset=crops,cifar10", "dataset.fold=0,1"])


def test_a_key_of_one_choice_only_names_it():
    message = "dataset.level is not a key of dataset=imagefolder; remove dataset.level, or use it with dataset=crops"
    with pytest.raises(UserError, match=whole(message)):
        group_keys.check(["dataset=imagefolder", "dataset.level=1"])


def test_misspelt_keys_and_unparsable_arguments_are_left_to_hydra():
    group_keys.check(["dataset=cifar10", "dataset.widht=3"])  # no choice has it: Hydra names it
    group_keys.check(["dataset=cifar10", "dataset.fold=[1"])  # Hydra reports the syntax
    group_keys.check(["dataset=cifar10", "~dataset.fold"])


def test_preview_and_evaluate_read_their_own_defaults():
    with pytest.raises(UserError, match=whole(cifar_split("folds"))):
        group_keys.check(["dataset=cifar10", "dataset.folds=2"], "preview")
    group_keys.check(["checkpoint=x.pt", "dataset.fold=1"], "evaluate")  # dataset: null, the checkpoint's data


@pytest.mark.slow
def test_train_py_prints_the_line_and_exits_1_before_hydra_writes_anything(tmp_path):
    result = run_python(TRAIN_PY, "dataset=cifar10", "dataset.fold=1", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == ["Error: " + cifar_split("fold")]
    assert not (tmp_path / "outputs").exists()
