"""Types for every config: dataclasses registered with Hydra's ConfigStore, used by the YAML files as a base
(`defaults: [crops_schema, _self_]`), so a value of the wrong type or a misspelt key fails at composition,
naming the key, before anything runs.

The schemas hold types, and the accepted range of each value whose validity does not depend on the data
(`lr: float = ranged(above=0)`): `check_ranges` checks them all right after composition, before any data is
decoded, one line per bad key. A new key with a range is one field here. Every value, default and comment
stays in configs/, which users read; a field without a default is MISSING until its YAML sets it. Checks
that need the data or other keys (a crop too small for the model, a missing file) stay in the code that
uses the values.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from errors import UserError


@dataclass(frozen=True)
class Range:
    """The values a key accepts: numbers within the bounds (open bounds refuse the bound itself), or one of
    `words` such as auto. None always passes: it means "off" for the optional keys that take it."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False  # for keys typed Any (num_workers: auto or an int), where the schema cannot say int
    words: tuple = ()
    text: Optional[str] = None  # the range in words, where the bounds alone read badly
    one_of: tuple = ()  # the only values accepted (dataset.channels: 1 or 3; loader.mode: auto, device, ...)
    items: Optional[int] = None  # a list of exactly this many values, each within the range (optim.betas)

    def accepts(self, value: Any) -> bool:
        if self.items is not None:
            return (isinstance(value, (list, tuple, ListConfig)) and len(value) == self.items
                    and all(value_ is not None and dataclasses.replace(self, items=None).accepts(value_)
                            for value_ in value))
        if value is None or value in self.words:
            return True
        if self.one_of:
            return value in self.one_of and not isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):  # NaN fails every comparison; inf is no setting
            return False
        if self.integer and not isinstance(value, int):
            return False
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok

    def describe(self) -> str:
        if self.text is not None:
            return self.text
        if self.items is not None:
            return f"a list of {self.items} numbers, each {dataclasses.replace(self, items=None).describe()}"
        if self.one_of:
            return "one of " + ", ".join(map(str, self.one_of))
        low_text, high_text = _show(self.low), _show(self.high)
        low = None if self.low is None else f"{'greater than' if self.low_open else 'at least'} {low_text}"
        high = None if self.high is None else f"{'below' if self.high_open else 'at most'} {high_text}"
        if low and high:
            if self.low_open == self.high_open:
                return f"between {low_text} and {high_text}{' (exclusive)' if self.low_open else ''}"
            return f"{low} and {high}"
        return " or ".join([*self.words, low or high])


def _show(bound: Optional[float]) -> str:
    """A bound as a user would type it: whole numbers in full (1000000, not 1e+06)."""
    if bound is None:
        return ""
    return str(int(bound)) if float(bound).is_integer() and abs(bound) < 1e15 else f"{bound:g}"


def ranged(*, above: Optional[float] = None, at_least: Optional[float] = None, below: Optional[float] = None,
           at_most: Optional[float] = None, **options: Any) -> Any:
    """A schema field (still without a default) that accepts only the given range."""
    limits = Range(low=above if above is not None else at_least, high=below if below is not None else at_most,
                   low_open=above is not None, high_open=below is not None, **options)
    return dataclasses.field(metadata={"range": limits})


# Bounds shared by several keys. A side of more pixels than this is no CIFAR-style input (PIL itself stops at
# 65,500 for some formats), and its product with the batch and channels overflows what a tensor can index.
SIDE = dict(at_least=1, at_most=65_536)
SEED = dict(at_least=0, at_most=2**32 - 1, text="between 0 and 2**32 - 1")  # numpy's seeding range
FRACTION = dict(at_least=0, at_most=1)
CHANNELS = dict(one_of=(1, 3))  # grey or RGB: what every decoder makes
PIXELS = dict(at_least=1, at_most=2**40)  # max_image_pixels; PIL's own default is 89,478,485


# Field order follows each YAML file, so the composed config prints in that order; the dataset schemas
# aside. typing's List and Optional, not `list[float] | None`: OmegaConf 2.3 reads these annotations at runtime.
#
# The dataset families share most of their keys, so each key is declared once, in the narrowest base that
# every family taking it extends (a new key shared by crops and the folders is one field in ResizedSchema).
# A dataclass lists a base's fields before its own, so the composed config (`--cfg job`, the run's
# config.yaml) shows the shared keys first; the YAML files under configs/dataset/ keep their reading order.


@dataclass
class DatasetSchema:
    """The keys every dataset family takes."""

    _target_: str
    root: str
    cache: str
    cache_dir: Optional[str]
    mean: Any  # auto or a list of floats: datasets/values.py checks it, with a message that says so
    std: Any


@dataclass
class ResizedSchema(DatasetSchema):
    """Families whose items are resized to one input size and split by a seeded draw (crops, the folders)."""

    width: int = ranged(**SIDE)
    height: int = ranged(**SIDE)
    channels: int = ranged(**CHANNELS)
    val_fraction: float = ranged(above=0, below=1)  # even when the data brings its own split
    split_by: str = ranged(one_of=("auto", "file", "region", "row"))
    group_pattern: Optional[str]  # a regular expression: datasets/splits.py compiles it, naming the error
    folds: int = ranged(at_least=2, at_most=1000)
    fold: Optional[int] = ranged(at_least=0)  # and below folds: datasets/splits.py checks it against folds
    allow_outside_root: bool


@dataclass
class ArraySchema(ResizedSchema):
    """Families that read .npy arrays (crops, DatasetFolder): how their values become 0..255."""

    value_range: Any  # per_file, global or [low, high]: checked by datasets/values.py


@dataclass
class CropsSchema(ArraySchema):
    root: Optional[str]  # declared again only to take null (the CSV's folder); it keeps its place
    csv: Optional[str]
    on_bad_rows: str
    level: int = ranged(at_least=0, at_most=64)  # a pyramid level: each halves the sides, 64 is far beyond any


@dataclass
class ImageFolderSchema(ResizedSchema):
    verify: bool


@dataclass
class DatasetFolderSchema(ImageFolderSchema, ArraySchema):
    extensions: List[str]


@dataclass
class Cifar10Schema(DatasetSchema):
    download: bool


@dataclass
class AugmentSchema:
    _target_: str
    _partial_: bool
    pad: int = ranged(at_least=0)  # and below the input's side: build_augment checks that with the input size
    hflip: bool
    vflip: bool
    transpose: bool
    cutout: int = ranged(at_least=0)
    scale: float = ranged(at_least=1, at_most=2)


@dataclass
class ModelSchema:
    _target_: str


@dataclass
class LoaderSchema:
    _target_: str
    _partial_: bool
    mode: str
    batch_size: int = ranged(at_least=1, at_most=2**20)  # per process
    shuffle: bool
    sampler: str  # uniform or balanced: build_loader checks it
    # A process per worker: more than a few hundred is a typo, and each holds prefetch_factor batches.
    num_workers: Any = ranged(at_least=0, at_most=256, integer=True, words=("auto",), text="auto or an integer 0..256")
    pin_memory: Any  # auto or a bool: checked by build_loader
    persistent_workers: bool
    prefetch_factor: int = ranged(at_least=1, at_most=64)


# A learning rate beyond float32's range (3.4e38) overflowed inside torch's optimizer step, a traceback; a huge
# one below it (1e9) is allowed and ends in the one-line NaN-loss error, as a diverging search trial should.
LEARNING_RATE = dict(above=0, at_most=1e30)


@dataclass
class SGDSchema:
    _target_: str
    lr: float = ranged(**LEARNING_RATE)
    momentum: float = ranged(**FRACTION)
    nesterov: bool
    weight_decay: float = ranged(at_least=0)
    decay_norms_and_biases: bool
    clip_grad_norm: Optional[float] = ranged(above=0)


@dataclass
class AdamWSchema:
    _target_: str
    lr: float = ranged(**LEARNING_RATE)
    betas: List[float] = ranged(at_least=0, below=1, items=2)  # the running averages' decays per step
    eps: float = ranged(above=0)
    weight_decay: float = ranged(at_least=0)  # decoupled: each step shrinks weights by lr x weight_decay
    decay_norms_and_biases: bool
    clip_grad_norm: Optional[float] = ranged(above=0)


@dataclass
class StepSchema:
    _target_: str
    _partial_: bool
    interval: str
    step_size: int = ranged(at_least=1)
    gamma: float = ranged(above=0)


@dataclass
class CosineSchema:
    _target_: str
    _partial_: bool
    interval: str
    T_max: int = ranged(at_least=1)
    eta_min: float = ranged(at_least=0)


@dataclass
class WarmupCosineSchema:
    _target_: str
    _partial_: bool
    interval: str
    epochs: int = ranged(at_least=1)
    warmup: float = ranged(at_least=0, below=1)  # a fraction of all steps


@dataclass
class OneCycleSchema:
    _target_: str
    _partial_: bool
    interval: str
    epochs: int = ranged(at_least=1)
    max_lr: float = ranged(above=0)
    pct_start: float = ranged(above=0, below=1)
    anneal_strategy: str = ranged(one_of=("cos", "linear"))
    div_factor: float = ranged(above=0)  # the start rate is max_lr / div_factor
    final_div_factor: float = ranged(above=0)  # the end rate is the start rate / final_div_factor
    cycle_momentum: bool
    base_momentum: float = ranged(**FRACTION)
    max_momentum: float = ranged(**FRACTION)


@dataclass
class EarlyStopSchema:
    patience: Optional[int] = ranged(at_least=1)  # epochs without improvement; None: off
    metric: str = ranged(one_of=("val/acc", "val/loss", "val/f1_macro"))
    mode: str = ranged(one_of=("auto", "max", "min"))
    min_delta: float = ranged(at_least=0)  # in the metric's units


@dataclass
class TrainerSchema:
    epochs: int = ranged(at_least=1, at_most=1_000_000)
    device: str
    seed: int = ranged(**SEED)
    label_smoothing: float = ranged(at_least=0, below=1)
    log_every: int = ranged(at_least=1)
    warmup_steps: int = ranged(at_least=0)
    progress: bool
    precision: str
    channels_last: Any  # auto, true or false: checked by training/speed.py
    compile: Any  # likewise
    cuda_graphs: Any  # likewise
    deterministic: bool
    # At most a week: timedelta overflows near 1e12 minutes. Above 0: distributed.timeout says so in its words.
    dist_timeout_minutes: float = ranged(at_most=10_080)
    checkpoint_every: Optional[int] = ranged(at_least=1)
    stop_signals: List[str]  # names checked by training/stop.py
    ema: Optional[float] = ranged(above=0, below=1)  # the weights' average's decay per step; None: off
    early_stop: EarlyStopSchema


@dataclass
class TrainSchema:
    run_dir: str
    resume: Optional[str]
    max_image_pixels: int = ranged(**PIXELS)


@dataclass
class EvaluateSchema:
    checkpoint: str
    device: str
    predict: List[str]
    tta: str = ranged(one_of=("none", "hflip", "dihedral"))
    tta_scales: Any  # a list of zoom factors: checked by commands/tta.py, with a message naming the range
    tta_force: bool
    max_image_pixels: int = ranged(**PIXELS)
    run_dir: str


@dataclass
class PredictSchema:
    checkpoint: str
    inputs: List[str]
    window: Any  # null, N or [height, width] in source pixels: checked by commands/windows.py
    stride: Any
    tta: str  # checked by commands/tta.py, with a message naming the choices
    tta_scales: Any  # a list of zoom factors: checked by commands/tta.py
    tta_force: bool
    batch_size: int = ranged(at_least=1, at_most=65_536)
    device: str
    max_image_pixels: int = ranged(**PIXELS)
    run_dir: str


@dataclass
class ExportSchema:
    checkpoint: str
    output: Optional[str]
    run_dir: str


@dataclass
class PreviewSchema:
    sources: int = ranged(at_least=0, at_most=10_000)  # source files drawn, one PNG each
    per_class: int = ranged(at_least=1, at_most=1_000)
    max_side: int = ranged(at_least=1, at_most=16_384)  # pixels of each drawn source
    seed: int = ranged(**SEED)
    run_dir: str


GROUPS = {
    "dataset": {"crops_schema": CropsSchema, "imagefolder_schema": ImageFolderSchema,
                "datasetfolder_schema": DatasetFolderSchema, "cifar10_schema": Cifar10Schema},
    "augment": {"default_schema": AugmentSchema},
    "model": {"tutorial_cnn_schema": ModelSchema, "resnet18_schema": ModelSchema, "fastnet_schema": ModelSchema},
    "loader": {"default_schema": LoaderSchema},
    "optim": {"sgd_schema": SGDSchema, "adamw_schema": AdamWSchema},
    "scheduler": {"step_schema": StepSchema, "cosine_schema": CosineSchema,
                  "warmup_cosine_schema": WarmupCosineSchema, "onecycle_schema": OneCycleSchema},
    "trainer": {"default_schema": TrainerSchema},
}
PRIMARY = {"train_schema": TrainSchema, "evaluate_schema": EvaluateSchema, "export_schema": ExportSchema,
           "preview_schema": PreviewSchema, "predict_schema": PredictSchema}


def _open(schema: type) -> Any:
    """A top-level schema that takes keys it does not declare. The groups (dataset, model, ...) are merged
    in after it, and an optional group left out (scheduler: null) must stay absent, not appear as
    `scheduler: null`, so they cannot be declared fields. Hydra closes the composed root afterwards, so a
    misspelt top-level key still fails."""
    node = OmegaConf.structured(schema)
    OmegaConf.set_struct(node, False)
    return node


def stored_name(group: str, name: str) -> str:
    """Where a group's schema is stored: configs/<group>/*.yaml extend it as /<stored name>@_here_."""
    return f"{group}_{name}"


def register() -> None:
    """Store every schema with Hydra's ConfigStore; call it before composing (every entry point, tests).
    Storing again replaces the same entries, so calling it twice is harmless."""
    store = ConfigStore.instance()
    for group, schemas in GROUPS.items():
        for name, schema in schemas.items():
            # Stored beside the primary configs, not in the group: the group's choices (`--help`, `dataset=`)
            # list only what a user can train with. Each YAML extends it as /<group>_<name>@_here_.
            store.store(name=stored_name(group, name), node=schema)
    for name, schema in PRIMARY.items():
        store.store(name=name, node=_open(schema))


def range_problems(node: DictConfig, prefix: str = "") -> list[str]:
    """One line per value outside its schema's range, in `node` and the groups below it."""
    problems = []
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        for field in dataclasses.fields(schema):
            limits = field.metadata.get("range")
            if limits is None or field.name not in node or OmegaConf.is_missing(node, field.name):
                continue
            if OmegaConf.is_interpolation(node, field.name):  # max_lr: ${optim.lr} is reported at optim.lr
                continue
            value = OmegaConf.select(node, field.name)
            if not limits.accepts(value):
                problems.append(f"{prefix}{field.name} must be {limits.describe()}, got {value!r}")
    for key, child in node.items_ex(resolve=False):  # unresolved: run_dir's ${hydra:...} needs a Hydra run
        if isinstance(child, DictConfig):
            problems += range_problems(child, f"{prefix}{key}.")
    return problems


def check_ranges(cfg: DictConfig) -> None:
    """Every ranged value of a composed config (train.yaml or evaluate.yaml), before anything is built; a
    config without schemas (one saved in a checkpoint) has nothing to check."""
    problems = range_problems(cfg)
    if problems:
        raise UserError("\n".join(problems))
