"""The config schema (training/schema.py): wrong types and misspelt keys fail at composition, naming the key,
and the schema changes nothing else in the composed config."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from torch import nn

import training
from errors import UserError
from tests.conftest import CONFIGS
from tests.test_train import train_py
from training import schema
from training.build import build_optimizer
from training.loaders import build_loader


def compose_without_schema(config_name: str, overrides: list[str]):
    """The config as it composed before the schema: each schema's name stands for an empty config."""
    store = ConfigStore.instance()
    for group, names in schema.GROUPS.items():
        for name in names:
            store.store(name=schema.stored_name(group, name), node={})
    for name in schema.PRIMARY:
        store.store(name=name, node={})
    try:
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)
    finally:
        schema.register()


def composition_error(make, *overrides: str) -> str:
    """Hydra's message for a config that does not compose, with the OmegaConf error it wraps (what train.py
    prints)."""
    with pytest.raises(ConfigCompositionException) as error:
        make(*overrides)
    return f"{error.value}\n{error.value.__cause__}"


@pytest.mark.parametrize(
    "config_name, overrides",
    [
        ("train", []),
        ("train", ["experiment=tutorial"]),
        ("train", ["dataset=imagefolder", "dataset.root=x"]),
        ("train", ["dataset=datasetfolder", "dataset.root=x"]),
        ("train", ["scheduler=cosine"]),
        ("train", ["scheduler=step"]),
        ("evaluate", []),
        ("evaluate", ["dataset=imagefolder", "dataset.root=x"]),
    ],
    ids=lambda value: value if isinstance(value, str) else " ".join(value) or "defaults",
)
def test_schema_changes_nothing_in_the_composed_config(config_name, overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        typed = compose(config_name=config_name, overrides=overrides)
    assert OmegaConf.to_yaml(typed) == OmegaConf.to_yaml(compose_without_schema(config_name, overrides))


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("dataset.width=abc", "dataset.width", "Integer"),
        ("trainer.epochs=1.5", "trainer.epochs", "Integer"),
        ("loader.shuffle=maybe", "loader.shuffle", "not a valid bool"),
        ("dataset.val_fraction=half", "dataset.val_fraction", "Float"),  # mean/std: auto or numbers, test_values.py
        ("optim.lr=fast", "optim.lr", "Float"),
        ("resume=[a.pt]", "resume", "to string"),
    ],
)
def test_wrong_type_fails_at_composition_naming_key_and_type(make_cfg, override, key, expected):
    message = composition_error(make_cfg, override)
    assert f"full_key: {key}\n" in message and expected in message


def test_wrong_type_fails_in_evaluate_config(make_eval_cfg):
    message = composition_error(make_eval_cfg, "dataset=imagefolder", "dataset.root=x", "dataset.verify=sometimes")
    assert "full_key: dataset.verify\n" in message and "not a valid bool" in message


@pytest.mark.parametrize("override", ["dataset.widht=40", "trainer.epoch=2", "epochs=2", "+dataset.width=40"])
def test_unknown_or_doubled_key_fails_at_composition(make_cfg, override):
    message = composition_error(make_cfg, override)
    assert override.lstrip("+").split("=")[0].split(".")[-1] in message


def test_added_key_reaches_the_constructor(make_cfg):
    """`+key=value` still adds what a constructor takes and the config does not list."""
    cfg = make_cfg("+optim.dampening=0.5")
    optimizer, _, _ = build_optimizer(cfg.optim, None, nn.Linear(2, 2), steps_per_epoch=1)
    assert optimizer.param_groups[0]["dampening"] == 0.5


def test_num_workers_keeps_its_own_check(make_cfg):
    """num_workers takes auto or an int, which a schema cannot say: the loader's check still speaks."""
    cfg = make_cfg("loader.num_workers=many")
    keys = {key: value for key, value in OmegaConf.to_container(cfg.loader).items() if not key.startswith("_")}
    with pytest.raises(UserError, match="^loader.num_workers must be auto or an integer >= 0, got 'many'$"):
        build_loader([0], device=torch.device("cpu"), seed=0, train=True, **{**keys, "mode": "dataloader"})


@pytest.mark.slow
def test_train_py_wrong_type_fails_before_anything_runs(tmp_path):
    result = train_py("dataset.width=abc", cwd=tmp_path)
    assert result.returncode == 1
    assert "full_key: dataset.width" in result.stderr and "could not be converted to Integer" in result.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("override, error", [
    ("trainer.epochs=0", "trainer.epochs must be between 1 and 1000000, got 0"),
    ("trainer.device=cuda", "trainer.device=cuda but CUDA is not available here: use trainer.device=cpu or auto"),
])
def test_range_checks_stay_one_line(make_cfg, crop_csv, override, error):
    """Values of the right type that the code refuses: the config composes, and training.run raises the
    UserError that train.py prints as one line without a traceback (as before the schema; a program showing
    that path: test_train.py's test_train_py_user_error_is_one_line), not a composition error."""
    if "cuda" in override and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = make_cfg(f"dataset.csv={crop_csv}", override)
    with pytest.raises(UserError) as refused:
        training.run(cfg)
    assert str(refused.value) == error
