"""tests/composing.py's kept compositions give what Hydra's compose gives: the same config (values, node types,
flags) and the same error, whichever kinds of override a call mixes."""

import hydra
import pytest
from hydra import initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf

from tests import composing
from tests.conftest import CONFIGS


def _hydra(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return hydra.compose(config_name=config_name, overrides=overrides)


def _nodes(cfg, path: str = "") -> list[tuple]:
    """Every node of `cfg` with its type, flags and (for leaves) raw value, interpolations unresolved."""
    rows = [(path, type(cfg).__name__, OmegaConf.is_struct(cfg), OmegaConf.is_readonly(cfg),
             OmegaConf.get_type(cfg) if isinstance(cfg, DictConfig) else None)]
    for key in (cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg))):
        node = cfg._get_node(key)
        if isinstance(node, (DictConfig, ListConfig)):
            rows += _nodes(node, f"{path}.{key}")
        else:
            rows.append((f"{path}.{key}", type(node).__name__, repr(node._value())))
    return rows


CASES = {
    "defaults": ("train", []),
    "values": ("train", ["trainer.epochs=2", "dataset.csv=/data/crops.csv", "run_dir=${oc.env:HOME}/run",
                         "loader.batch_size=8"]),
    "groups_then_values": ("train", ["dataset=cifar10", "model=resnet18", "dataset.root=/data", "optim.lr=0.01"]),
    "value_before_its_group": ("train", ["dataset.root=/data", "dataset=imagefolder"]),
    "experiment_augment_added_key_and_list": ("train", ["experiment=fast", "augment=standard", "augment.pad=2",
                                                        "+extra.note=hello", "dataset.std=[0.5,0.5,0.5]"]),
    "deleted_group": ("train", ["~augment", "trainer.epochs=2"]),
    "evaluate": ("evaluate", ["checkpoint=/runs/a/last.pt", "predict=[/a.png,/b.png]", "device=cpu"]),
    "predict": ("predict", ["checkpoint=/runs/a/last.pt", "inputs=[/scene.png]"]),
    "export": ("export", ["checkpoint=/runs/a/last.pt"]),
    "preview": ("preview", ["dataset.csv=/data/crops.csv"]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_kept_composition_equals_hydras(case):
    config_name, overrides = CASES[case]
    want = _hydra(config_name, overrides)
    for _ in range(2):  # the first call composes and keeps the group choices, the second copies them
        got = composing.compose(CONFIGS, config_name, overrides)
        assert OmegaConf.to_yaml(got) == OmegaConf.to_yaml(want)
        assert _nodes(got) == _nodes(want)


def test_a_changed_config_leaves_the_kept_one_as_it_was():
    first = composing.compose(CONFIGS, "train", ["trainer.epochs=2"])
    first.trainer.epochs = 7
    first.dataset.width = 99
    again = composing.compose(CONFIGS, "train", ["trainer.epochs=2"])
    assert (again.trainer.epochs, again.dataset.width) == (2, _hydra("train", []).dataset.width)


REFUSED = {
    "wrong_type": ("train", ["trainer.epochs=1.5"]),
    "unknown_key": ("train", ["trainer.epoch=1"]),
    "added_key_that_exists": ("train", ["+trainer.epochs=3"]),
    "deleted_schema_key": ("train", ["~dataset.mean"]),
    "unknown_choice": ("train", ["dataset=nowhere", "trainer.epochs=2"]),
    "force_added_group": ("train", ["++dataset=cifar10"]),
    "sweep": ("train", ["trainer.epochs=1,2"]),
    "unparsable": ("train", ["trainer.epochs=[1"]),
}


@pytest.mark.parametrize("case", REFUSED, ids=list(REFUSED))
def test_a_refused_override_raises_hydras_error(case):
    config_name, overrides = REFUSED[case]
    with pytest.raises(Exception) as want:
        _hydra(config_name, overrides)
    with pytest.raises(type(want.value)) as got:
        composing.compose(CONFIGS, config_name, overrides)
    assert str(got.value) == str(want.value)
    assert str(got.value.__cause__) == str(want.value.__cause__)
