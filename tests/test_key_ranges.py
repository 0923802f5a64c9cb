"""Every numeric key of the training config, fuzzed with seeded random values: a bad value is a one-line
UserError naming its key (or Hydra's own one-line type error at composition), never a traceback and never a
silently useless run."""

import math
import random
import re

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

import training
from datasets import values
from errors import UserError
from training.build import build_augment, build_model, build_optimizer
from training.schema import check_ranges

# Each scheduler brings its own keys; standard augmentation sets pad. Between them every numeric key of every
# group a training config composes from.
CHOICES = [(), ("scheduler=onecycle",), ("scheduler=step",), ("scheduler=cosine",), ("scheduler=warmup_cosine",),
           ("augment=standard",), ("optim=adamw",)]
# What a careless user or a bad sweep types: zero, signs, fractions where counts go, the float specials,
# values at and beyond any sane size.
POOL = [0, 1, -1, 2, 3, 0.5, -0.5, 1e-9, 1.5, 7, 100, 1e9, 10**12, 10**30, 1e308, math.nan, math.inf, -math.inf]
VALUES_PER_KEY = 5  # besides NaN: ~40 keys x 6 values stay within a few seconds
# Keys whose accepted large values mean long work, not a crash: the in-process runs below keep them small.
WORK = {"trainer.epochs", "scheduler.epochs", "scheduler.T_max", "scheduler.step_size", "loader.batch_size",
        "trainer.log_every", "trainer.warmup_steps", "trainer.checkpoint_every", "loader.num_workers",
        "loader.prefetch_factor", "max_image_pixels", "dataset.width", "dataset.height", "augment.pad",
        "augment.cutout", "trainer.dist_timeout_minutes"}


# Numeric keys whose default is a word or null (auto, off): numbers still reach them from the command line.
NUMERIC_WHEN_SET = ("loader.num_workers", "trainer.checkpoint_every", "optim.clip_grad_norm", "trainer.ema",
                    "trainer.early_stop.patience")


def numeric_keys(cfg) -> list[str]:
    """Dotted keys of every int or float leaf (bools excluded; a list of numbers counts as one key), the
    interpolated ones (max_lr: ${optim.lr}) and NUMERIC_WHEN_SET: what train.py --cfg job shows as numbers."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    keys = []

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, list):
                keys.extend(f"{prefix}{key}" for item in value[:1] if isinstance(item, (int, float)))
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                keys.append(f"{prefix}{key}")
            elif isinstance(value, str) and value.startswith("${") and key != "run_dir":
                keys.append(f"{prefix}{key}")

    walk(plain, "")
    return keys + [key for key in NUMERIC_WHEN_SET if OmegaConf.select(cfg, key, default="absent") != "absent"]


def _set(cfg, key: str, value):
    """cfg with key=value as the command line would give it (a list key gets a one-item list); None where the
    schema refuses the type, as Hydra would at composition (one line, exit 1)."""
    cfg = cfg.copy()
    current = OmegaConf.select(cfg, key)
    try:
        OmegaConf.update(cfg, key, [value] if isinstance(current, (list, tuple)) or OmegaConf.is_list(current)
                         else value, merge=False)
    except ValidationError:
        return None
    return cfg


def _preflight(cfg, key: str, model, steps_per_epoch: int) -> None:
    """What the runner builds from the numbers before the first batch, without data: the model and augmentation
    for the configured input (when the key shapes them), the optimizer and its schedule for an epoch length."""
    check_ranges(cfg)
    if key.startswith(("dataset.", "augment.")):
        shape = (cfg.dataset.channels, cfg.dataset.height, cfg.dataset.width)
        model = build_model(cfg.model, shape, 2, torch.device("cpu"))
        build_augment(cfg.get("augment"), shape)
        for statistic in ("mean", "std"):
            values.parse_statistic(OmegaConf.to_container(cfg.dataset)[statistic], f"dataset.{statistic}")
    build_optimizer(cfg.optim, cfg.get("scheduler"), model, steps_per_epoch)


def _one_line_naming(error: UserError, key: str) -> None:
    """One line naming the key, or the other key of a pair that does not fit together (trainer.epochs=4 with one
    step an epoch makes scheduler.pct_start=0.25 a one-step rise: the message names pct_start)."""
    message = str(error)
    assert "\n" not in message, (key, message)
    assert key.split(".")[-1] in message or re.search(r"\b[a-z_]+\.[a-z_]+=", message), (key, message)


def test_every_numeric_key_has_a_range_or_takes_any_value(make_cfg):
    """Seeded fuzz over every numeric key of every group choice, each with VALUES_PER_KEY values of POOL: check_ranges
    refuses it in one line naming the key, or everything built from it before training accepts it (or refuses it
    in one line naming a key)."""
    rng = random.Random(21)
    seen = set()
    for choices in CHOICES:
        base = make_cfg(*choices)
        model = build_model(base.model, (3, 32, 32), 2, torch.device("cpu"))
        for key in numeric_keys(base):
            if key in seen:  # a key every choice shares is fuzzed once
                continue
            seen.add(key)
            for value in [math.nan, *rng.sample(POOL, VALUES_PER_KEY)]:
                cfg = _set(base, key, value)
                if cfg is None:
                    continue
                try:
                    _preflight(cfg, key, model, steps_per_epoch=rng.choice([2, 3, 7, 100]))
                except UserError as e:
                    _one_line_naming(e, key)
    assert {"optim.lr", "optim.clip_grad_norm", "scheduler.pct_start", "scheduler.div_factor", "scheduler.gamma",
            "scheduler.T_max", "scheduler.warmup", "dataset.mean", "dataset.std", "trainer.dist_timeout_minutes",
            "loader.num_workers", "loader.prefetch_factor", "augment.pad", "trainer.checkpoint_every", "trainer.ema",
            "optim.betas", "optim.eps", "trainer.early_stop.patience", "trainer.early_stop.min_delta"} <= seen


@pytest.mark.parametrize(("override", "key"), [
    ("scheduler.div_factor=0", "div_factor"), ("scheduler.final_div_factor=0", "final_div_factor"),
    ("scheduler.anneal_strategy=cubic", "anneal_strategy"), ("scheduler.base_momentum=1.5", "base_momentum"),
    ("scheduler.max_momentum=-0.1", "max_momentum"), ("optim.lr=inf", "lr"), ("optim.lr=nan", "lr"),
    ("trainer.dist_timeout_minutes=1e300", "dist_timeout_minutes"), ("dataset.channels=2", "channels"),
    ("loader.num_workers=100000", "num_workers"), ("dataset.width=100000000", "width"),
])
def test_a_value_outside_its_range_is_refused_before_any_data_is_read(make_cfg, override, key):
    cfg = make_cfg("scheduler=onecycle", override)
    with pytest.raises(UserError) as error:
        check_ranges(cfg)
    _one_line_naming(error.value, key)


@pytest.mark.parametrize(("override", "said"), [
    ("dataset.mean=[nan]", "NaN or infinity"), ("dataset.std=[0]", "at least 1e-06"),
    ("dataset.std=[inf]", "NaN or infinity"), ("dataset.std=[-1]", "at least 1e-06"),
])
def test_mean_and_std_must_be_finite_and_std_positive(build_crops, override, said):
    with pytest.raises(UserError, match=rf"dataset\.(mean|std)=.*{said}") as error:
        build_crops(override)
    assert "\n" not in str(error.value)


def test_onecycle_whose_rise_is_one_step_long_is_one_line(make_cfg):
    """pct_start x total steps == 1 made OneCycleLR divide by zero when built."""
    cfg = make_cfg("scheduler=onecycle", "scheduler.pct_start=0.25", "trainer.epochs=1")
    model = build_model(cfg.model, (3, 32, 32), 2, torch.device("cpu"))
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with pytest.raises(UserError, match=r"scheduler.pct_start=0.25 .* 4 steps") as error:
        build_optimizer(resolved.optim, resolved.scheduler, model, steps_per_epoch=4)
    assert "\n" not in str(error.value)


def test_nesterov_without_momentum_is_one_line(make_cfg):
    cfg = make_cfg("optim.nesterov=true", "optim.momentum=0")
    model = build_model(cfg.model, (3, 32, 32), 2, torch.device("cpu"))
    with pytest.raises(UserError, match=r"optim.nesterov=true needs optim.momentum above 0"):
        build_optimizer(cfg.optim, None, model, steps_per_epoch=4)


def test_preview_seed_is_ranged(make_preview_cfg):
    from commands.preview import run_preview

    with pytest.raises(UserError, match=r"seed must be between 0 and 2\*\*32 - 1, got -1"):
        run_preview(make_preview_cfg("seed=-1"))


@pytest.mark.slow
def test_fuzzed_values_train_or_stop_in_one_line(make_cfg, crop_csv, tmp_path):
    """Whole in-process runs on the small crop set for a seeded sample of (key, value) pairs: each trains, or
    stops with a one-line UserError; nothing else escapes."""
    rng = random.Random(2121)
    keys = sorted({key for choices in CHOICES for key in numeric_keys(make_cfg(*choices))} - {"trainer.seed"})
    for trial in range(24):
        choices = rng.choice(CHOICES)
        key, value = rng.choice(keys), rng.choice(POOL)
        if key in WORK and isinstance(value, (int, float)) and math.isfinite(value) and abs(value) > 8:
            value = rng.choice([0, -1, 0.5, math.nan])  # accepted large values only mean a long run
        overrides = [*choices, f"dataset.csv={crop_csv}", "loader.batch_size=16", "trainer.epochs=2"]
        base = make_cfg(*overrides, run_dir=tmp_path / f"run{trial}")
        if key not in numeric_keys(base):
            continue
        cfg = _set(base, key, value)
        if cfg is None:
            continue
        try:
            training.run(cfg)
        except UserError as e:  # a NaN loss (optim.lr=1e9) names the keys that cause one: still one line
            _one_line_naming(e, key)
