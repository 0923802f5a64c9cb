"""Everything built from the config: device, data, loaders, model, optimizer and scheduler.

All `instantiate` calls live here, so training and evaluation build the same things the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from datasets.base import DataBundle, check_class_coverage
from errors import UserError
from training.augment import Augment


def _instantiate(node: DictConfig, **runtime):
    """hydra's instantiate, letting a UserError raised by the target reach the user as itself (Hydra wraps
    it in a multi-line InstantiationException otherwise)."""
    try:
        return instantiate(node, **runtime)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def import_data_code(dataset_cfg: DictConfig) -> None:
    """Import the code that builds `dataset_cfg` (its `_target_`, found as instantiate finds it), so that a
    clock started after this times the data: torchvision's import, ~1 s of CPU, was most of what a small folder
    dataset's `data/prep_seconds` reported."""
    get_object(dataset_cfg._target_)


def require_keys(cfg: DictConfig) -> None:
    """Keys left as ??? (dataset.root for folders, checkpoint for evaluate.py) as one line, not a traceback."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{', '.join(missing)} must be set: add {' '.join(f'{k}=...' for k in missing)} to the command")


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """auto: CUDA when available, else CPU. Asking for CUDA without it fails here, before any work.
    `key` is the config key that named the device, for messages."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{key}={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{key}={name} but CUDA is not available here: use {key}=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{key}={name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise UserError(f"{key}={name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


@dataclass
class Data:
    bundle: DataBundle
    train_loader: object  # DeviceLoader or EpochSeededDataLoader; None when built for scoring only
    val_loader: object


def build_dataset(dataset_cfg: DictConfig, seed: int, fixed: dict | None = None) -> DataBundle:
    """The train and validation sets the config describes; `seed` draws a seeded split as training does.
    `fixed`: dataset keys that replace the config's (saved_mapping)."""
    return _instantiate(dataset_cfg, seed=seed, **(fixed or {}))


def saved_mapping(checkpoint: dict, dataset_cfg: DictConfig) -> dict:
    """The value mapping and normalisation a checkpoint's model learnt with, as dataset keys that replace
    the config's (`global`, `auto`) when its data is built again: a resumed run, evaluate.py and predict= see
    values exactly as training did, whatever data they now read, without scanning or counting again."""
    fixed = {"mean": list(checkpoint["normalization"]["mean"]), "std": list(checkpoint["normalization"]["std"])}
    value_range = checkpoint.get("value_range")  # absent from checkpoints made before it was saved
    if "value_range" in dataset_cfg and value_range is not None:
        fixed["value_range"] = value_range if isinstance(value_range, str) else list(value_range)
    # The rule split_by=auto chose for the run's data (file or region), so the same data splits the same way
    # whatever auto would choose now; absent from checkpoints made before split_by (they split by row).
    split = checkpoint.get("split")
    if "split_by" in dataset_cfg and split is not None and split["by"] in ("file", "region", "row"):
        fixed["split_by"] = split["by"]
        if split["by"] == "region":  # the blocks validation took: 1 a file before the checkpoint said
            fixed["region_val_blocks"] = split.get("val_blocks", 1)
    return fixed


def check_same_split(checkpoint: dict, bundle: DataBundle, source: str) -> None:
    """The validation items a checkpoint's run held out are the ones its data gives now (by their digest)."""
    saved, now = checkpoint.get("split"), bundle.split
    if saved is None or now is None or saved["val_digest"] == now["val_digest"]:
        return
    raise UserError(f"{source} validated on {saved['val']} items split by {saved['by']}, but its data now splits "
                    f"into {now['val']} other ones ({now['by']}): the CSV or files changed since; restore them, "
                    "or train a new run")


def build_data(dataset_cfg: DictConfig, loader_cfg: DictConfig, seed: int, device: torch.device, rank: int = 0,
               world_size: int = 1, train: bool = True, fixed: dict | None = None) -> Data:
    """The data and its loaders; under DDP each rank's loaders yield that rank's shard. `train=False` (scoring
    only) builds no training loader, so the training split is never copied to the device. `fixed`: dataset
    keys that replace the config's (saved_mapping)."""
    bundle = build_dataset(dataset_cfg, seed, fixed)
    check_class_coverage(bundle)
    make_loader = _instantiate(loader_cfg)  # a partial: the data set, device and seed are known only here
    return Data(
        bundle=bundle,
        train_loader=make_loader(bundle.train, device=device, seed=seed, train=True, rank=rank,
                                 world_size=world_size) if train else None,
        val_loader=make_loader(bundle.val, device=device, seed=seed, train=False, rank=rank, world_size=world_size),
    )


def build_augment(augment_cfg: DictConfig | None, input_shape: tuple[int, int, int],
                  mean: tuple[float, ...] = (0.0,)) -> Augment:
    """The training batches' augmentation for inputs of `input_shape` (C, H, W), checked to apply to them;
    `mean` (0..1) is the colour cutout fills with. No augment group (`~augment` on the command line): none."""
    if augment_cfg is None:
        return Augment()
    return _instantiate(augment_cfg)(mean=mean, input_shape=input_shape)


def build_model(model_cfg: DictConfig, input_shape: tuple[int, int, int], num_classes: int,
                device: torch.device) -> nn.Module:
    channels, height, width = input_shape
    return _instantiate(model_cfg, in_channels=channels, height=height, width=width,
                       num_classes=num_classes).to(device)


# Keys of the optim group that are the trainer's, not the constructor's.
TRAINER_OPTIM_KEYS = ("clip_grad_norm", "decay_norms_and_biases")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The model's parameters in two groups: weights that decay, and the 1-D parameters that do not (biases,
    BatchNorm's scale and shift). Decay pulls a weight matrix towards small norms, a useful prior; pulling a
    BatchNorm scale or a bias towards zero only fights the normalisation (timm and torchvision's references
    exempt them the same way)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in parameters if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0}]


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool) -> None:
    """Adam and AdamW keep their step count on the host unless `capturable`, which a CUDA-graph capture requires
    (trainer.cuda_graphs); a loaded optimizer state brings the setting it was saved with, so it is set again
    after a resume, the step counts moved to where that setting keeps them."""
    for group in optimizer.param_groups:
        if "capturable" not in group:  # SGD has no host state to keep
            continue
        group["capturable"] = capturable
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(parameter.device if capturable else "cpu")


def build_optimizer(optim_cfg: DictConfig, scheduler_cfg: DictConfig | None, model: nn.Module,
                    steps_per_epoch: int, capturable: bool = False):
    """The optimizer, its learning-rate scheduler (None for a constant rate) and whether that scheduler steps
    after every optimizer step (scheduler.interval=step; else once per epoch). optim.clip_grad_norm belongs
    to the training step, optim.decay_norms_and_biases chooses the parameter groups and scheduler.interval is
    the runner's: none goes to a constructor. `capturable`: the steps are captured as CUDA graphs."""
    constructor_args = OmegaConf.masked_copy(optim_cfg, [k for k in optim_cfg if k not in TRAINER_OPTIM_KEYS])
    if optim_cfg.get("nesterov") and not optim_cfg.get("momentum"):  # torch's ValueError, wrapped by Hydra
        raise UserError("optim.nesterov=true needs optim.momentum above 0 (Nesterov momentum is a kind of momentum): "
                        "set optim.momentum=0.9, or optim.nesterov=false")
    # Absent from configs saved before the key existed: those decayed every parameter.
    params = (model.parameters() if optim_cfg.get("decay_norms_and_biases", True)
              else parameter_groups(model, optim_cfg.weight_decay))
    # A partial, called here: Hydra would wrap the parameter groups (dicts of tensors) in its own containers;
    # `all` hands lists (optim.betas) to torch as plain lists, as a checkpoint's state must hold them.
    optimizer = _instantiate(constructor_args, _partial_=True, _convert_="all")(params)
    set_capturable(optimizer, capturable)
    if scheduler_cfg is None:
        return optimizer, None, False
    per_step = scheduler_cfg.get("interval") == "step"  # absent in older checkpoints' configs: per epoch
    # Resolved first: its ${trainer.epochs} and ${optim.lr} point outside the group.
    constructor_args = OmegaConf.to_container(scheduler_cfg, resolve=True)
    constructor_args.pop("interval", None)
    make_scheduler = _instantiate(OmegaConf.create(constructor_args))
    runtime = {"steps_per_epoch": steps_per_epoch} if per_step else {}  # per-step schedules span epochs x steps
    try:
        scheduler = make_scheduler(optimizer, **runtime)
    except ZeroDivisionError:  # OneCycleLR, when pct_start x its steps is exactly one step of rise
        total = constructor_args.get("epochs", 0) * steps_per_epoch
        raise UserError(f"scheduler.pct_start={constructor_args.get('pct_start')} of {total} steps is a rise of "
                        "exactly one step, which OneCycleLR cannot schedule (it divides by zero): choose another "
                        "scheduler.pct_start") from None
    return optimizer, scheduler, per_step
