"""Types for every config: dataclasses registered with Hydra's ConfigStore, used by the YAML files as a base
(`defaults: [crops_schema, _self_]`), so a value of the wrong type or a misspelt key fails at composition,
naming the key, before anything runs.

The schemas hold types only: every value, default and comment stays in configs/, which users read.
A field without a default is MISSING until its YAML sets it. Range checks (width >= 16, batch size > 0, ...)
stay in the code that uses the values, which says what to do about them.
"""

from dataclasses import dataclass
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

# Field order follows each YAML file, so the composed config prints in the order it always did.
# typing's List and Optional, not `list[float] | None`: OmegaConf 2.3 reads these annotations at runtime.


@dataclass
class CropsSchema:
    _target_: str
    csv: Optional[str]
    root: Optional[str]
    width: int
    height: int
    channels: int
    cache: str
    cache_dir: Optional[str]
    val_fraction: float
    mean: List[float]
    std: List[float]
    on_bad_rows: str
    allow_outside_root: bool
    hflip: bool


@dataclass
class ImageFolderSchema:
    _target_: str
    root: str
    width: int
    height: int
    channels: int
    cache: str
    val_fraction: float
    mean: List[float]
    std: List[float]
    verify: bool
    allow_outside_root: bool
    hflip: bool


@dataclass
class DatasetFolderSchema:
    _target_: str
    root: str
    extensions: List[str]
    width: int
    height: int
    channels: int
    cache: str
    val_fraction: float
    mean: List[float]
    std: List[float]
    verify: bool
    allow_outside_root: bool
    hflip: bool


@dataclass
class Cifar10Schema:
    _target_: str
    root: str
    download: bool
    mean: List[float]
    std: List[float]
    hflip: bool


@dataclass
class ModelSchema:
    _target_: str


@dataclass
class LoaderSchema:
    _target_: str
    _partial_: bool
    mode: str
    batch_size: int
    shuffle: bool
    num_workers: Any  # auto or an int: build_loader checks it, with a message that says so
    pin_memory: Any  # auto or a bool: checked by build_loader
    persistent_workers: bool
    prefetch_factor: int


@dataclass
class SGDSchema:
    _target_: str
    lr: float
    momentum: float
    clip_grad_norm: Optional[float]


@dataclass
class StepSchema:
    _target_: str
    _partial_: bool
    step_size: int
    gamma: float


@dataclass
class CosineSchema:
    _target_: str
    _partial_: bool
    T_max: int
    eta_min: float


@dataclass
class TrainerSchema:
    epochs: int
    device: str
    seed: int
    log_every: int
    warmup_steps: int
    progress: bool
    precision: str
    channels_last: Any  # auto, true or false: checked by training/speed.py
    compile: Any  # likewise
    deterministic: bool
    checkpoint_every: Optional[int]


@dataclass
class TrainSchema:
    run_dir: str
    resume: Optional[str]
    max_image_pixels: int


@dataclass
class EvaluateSchema:
    checkpoint: str
    device: str
    predict: List[str]
    max_image_pixels: int
    run_dir: str


GROUPS = {
    "dataset": {"crops_schema": CropsSchema, "imagefolder_schema": ImageFolderSchema,
                "datasetfolder_schema": DatasetFolderSchema, "cifar10_schema": Cifar10Schema},
    "model": {"tutorial_cnn_schema": ModelSchema},
    "loader": {"default_schema": LoaderSchema},
    "optim": {"sgd_schema": SGDSchema},
    "scheduler": {"step_schema": StepSchema, "cosine_schema": CosineSchema},
    "trainer": {"default_schema": TrainerSchema},
}
PRIMARY = {"train_schema": TrainSchema, "evaluate_schema": EvaluateSchema}


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
    """Store every schema with Hydra's ConfigStore; call it before composing (train.py, evaluate.py, tests).
    Storing again replaces the same entries, so calling it twice is harmless."""
    store = ConfigStore.instance()
    for group, schemas in GROUPS.items():
        for name, schema in schemas.items():
            # Stored beside the primary configs, not in the group: the group's choices (`--help`, `dataset=`)
            # list only what a user can train with. Each YAML extends it as /<group>_<name>@_here_.
            store.store(name=stored_name(group, name), node=schema)
    for name, schema in PRIMARY.items():
        store.store(name=name, node=_open(schema))
