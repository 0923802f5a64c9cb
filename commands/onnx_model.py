"""The ONNX form of a trained model: written by export.py, scored and used for predictions by evaluate.py.

The exported graph takes what the data sets yield, a uint8 batch (N, C, H, W) in 0..255 with any N, and
normalises it inside ((x / 255 - mean) / std, as training did), so a deployment needs no preprocessing
code beyond decoding and resizing. The model's metadata (`metadata_props`, JSON strings) carries what
evaluate.py needs to score it as it would the checkpoint: classes, input shape, normalisation, the run's
config and the config group each part of it came from.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from datasets import guards
from errors import UserError
from training import checkpoint as checkpoints
from training import run_folder, saved_config, untrusted
from training.build import build_model, require_keys
from training.logger import run_log
from training.loop import Normalizer

log = logging.getLogger(__name__)

SUFFIX = ".onnx"
FORMAT = "cnn-trainer onnx 1"  # metadata `format`; bump when the keys below change meaning
METADATA = ("format", "classes", "input_shape", "normalization", "value_range", "epoch", "config", "choices")
INPUT, OUTPUT = "images", "logits"
# ONNX Runtime computes in float32 with its own kernels: logits agree with torch's to ~1e-6 here; a larger
# gap means a wrong graph, not rounding.
TOLERANCE = 1e-4
# The exporter's graph passes log each step at INFO, which entry points show: a dozen lines about its internals.
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir")


@contextmanager
def _quiet(names: tuple[str, ...]):
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def is_onnx(path: str | Path) -> bool:
    return str(path).lower().endswith(SUFFIX)


class UInt8Input(nn.Module):
    """The trained model behind training's normalisation: uint8 (N, C, H, W) -> logits (N, classes)."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        normalize = Normalizer(mean, std, torch.device("cpu"))  # the same scale and shift as training's
        self.register_buffer("scale", normalize.scale)
        self.register_buffer("shift", normalize.shift)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.float() * self.scale - self.shift)


def run_export(cfg: DictConfig) -> Path:
    """export.py's work: the checkpoint as an ONNX model at cfg.output (default: model.onnx in the run dir)."""
    require_keys(cfg)
    run_dir = Path(cfg.run_dir)
    output = Path(cfg.output) if cfg.output is not None else run_dir / f"model{SUFFIX}"
    if not is_onnx(output):
        raise UserError(f"output={output} must end in {SUFFIX}: evaluate.py tells an ONNX model by it")
    if output.exists():
        raise UserError(f"output={output} already exists: export never overwrites a file; choose another output")
    run_folder.require_writable(output.parent, "output")  # before minutes of tracing, not after
    run_folder.create(run_dir)
    with run_log(run_dir):
        checkpoint = checkpoints.load(cfg.checkpoint, "checkpoint")
        export(checkpoint, output, f"checkpoint={cfg.checkpoint}")
        log.info("wrote %s (classes %s, input uint8 (N, %d, %d, %d))", output, checkpoint["classes"],
                 *checkpoint["input_shape"])
    return output


def export(checkpoint: dict, output: Path, source: str) -> None:
    """Trace the checkpoint's model with torch's ONNX exporter, record the metadata, check the file with ONNX
    Runtime against the model, and only then move it to `output` (a failed export leaves nothing behind)."""
    if importlib.util.find_spec("onnxscript") is None:  # torch's exporter needs it: one line, not deep in torch
        raise UserError("export needs onnxscript and onnxruntime: pip install -r requirements.txt")
    stored = checkpoint["config"]
    choices = checkpoint.get("choices") or saved_config.choices(OmegaConf.create(stored))
    # The model is built from the shipped model group, never from the checkpoint's own _target_.
    saved = saved_config.rebuild(stored, choices, source)
    shape = tuple(checkpoint["input_shape"])
    model = build_model(saved.model, shape, len(checkpoint["classes"]), torch.device("cpu"))
    checkpoints.load_weights(model, checkpoint, source)
    wrapped = UInt8Input(model, **checkpoint["normalization"]).eval()
    example = torch.randint(0, 256, (2, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    # torch.export specialises sizes 0 and 1, so the example batch has 2 items and the batch Dim starts at 1.
    with _quiet(EXPORTER_LOGGERS):
        program = torch.onnx.export(wrapped, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)
    metadata = {
        "format": FORMAT,
        "classes": checkpoint["classes"],
        "input_shape": list(shape),  # (C, H, W) of one uint8 item
        "normalization": checkpoint["normalization"],  # applied inside the graph
        # How .npy values became the uint8 input (per_file or [low, high]): applied before the graph, as
        # evaluate.py and predict= do for a .onnx file.
        "value_range": checkpoint.get("value_range"),
        "epoch": checkpoint["epoch"],
        "box_size": checkpoint.get("box_size"),  # predict.py's default window (absent from older files)
        "metrics": checkpoint["metrics"],
        "config": stored,  # the run's resolved config
        "choices": choices,  # the shipped config group of each part, which evaluate.py rebuilds the data from
    }
    program.model.metadata_props.update({key: json.dumps(value) for key, value in metadata.items()})
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    _remove_stale_temps(output)
    try:
        program.save(str(tmp))
        _check(tmp, wrapped, shape)
        # A hard link fails where `output` exists: of two exports to one output, the second is refused instead
        # of replacing the first while both report success.
        os.link(tmp, output)
    except FileExistsError:
        raise UserError(f"output={output} was written by another export meanwhile: export never overwrites a "
                        "file; choose another output") from None
    except OSError as e:  # a full disk, a folder made read-only since the check
        raise UserError(f"output={output} cannot be written ({e.strerror or e}); nothing was left there: free "
                        "space or choose another output") from None
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_temps(output: Path) -> None:
    """The temp files a killed export of `output` left (SIGKILL runs no cleanup): those whose process is gone."""
    for stale in output.parent.glob(f".{output.name}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@torch.no_grad()
def _check(path: Path, wrapped: nn.Module, shape: tuple[int, ...]) -> None:
    """A batch of 3 (not the traced 2: the batch size must be free) through ONNX Runtime and torch."""
    images = torch.randint(0, 256, (3, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    got = OnnxClassifier(_session(path, torch.device("cpu")))(images)
    expected = wrapped(images)
    if not torch.allclose(got, expected, atol=TOLERANCE, rtol=TOLERANCE):
        raise RuntimeError(f"the exported model's logits differ from the checkpoint's by up to "
                           f"{(got - expected).abs().max():.2e}: the export is wrong")


def _session(path: Path, device: torch.device):
    """An ONNX Runtime session on the device (its CUDA provider where installed) with torch's thread count."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("ONNX models need onnxruntime: pip install -r requirements.txt") from None
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError(f"device={device} but this onnxruntime has no CUDA provider: use device=cpu, "
                            "or install onnxruntime-gpu")
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # share the cores as torch does (tests use 1)
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are not the user's
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own unexported types (InvalidProtobuf, Fail, ...)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"checkpoint: {path} is not an ONNX model onnxruntime can read ({reason}); "
                        "export one with python export.py checkpoint=PATH") from None


class OnnxClassifier(nn.Module):
    """An ONNX Runtime session used where a torch model is: uint8 images (on any device) -> float logits
    on the same device. It has no parameters; `eval()` and `train()` change nothing."""

    def __init__(self, session, classes: int | None = None, source: str = "checkpoint"):
        super().__init__()
        self.session, self.classes, self.source = session, classes, source

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(images.to("cpu", torch.uint8).numpy())
        try:
            (logits,) = self.session.run([OUTPUT], {INPUT: batch})
        except Exception as e:  # onnxruntime raises its own unexported types (Fail, RuntimeException, ...)
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise UserError(f"{self.source}: the model failed on a batch of shape {tuple(batch.shape)} ({reason}); "
                            "export it again from its checkpoint") from None
        logits = torch.from_numpy(np.asarray(logits))
        if self.classes is not None:  # a file from elsewhere: its output must be one finite score per class
            untrusted.check_outputs(logits, self.classes, self.source)
        return logits.to(images.device)


def as_is(images: torch.Tensor) -> torch.Tensor:
    """The normaliser an ONNX model is scored with: its graph normalises the uint8 batch itself."""
    return images


def load(path: str | Path, device: torch.device) -> tuple[OnnxClassifier, dict, DictConfig]:
    """The model, its description in a checkpoint's keys (classes, input_shape, normalization, epoch), and the
    run's config rebuilt from the shipped config groups (a file's config never chooses what code runs)."""
    path = guards.require_file(path, "checkpoint", "ONNX model")
    session = _session(path, device)
    stored = session.get_modelmeta().custom_metadata_map
    if stored.get("format") != json.dumps(FORMAT) or set(METADATA) - set(stored):
        raise UserError(f"checkpoint: {path} is not an ONNX model exported by this trainer (format {FORMAT!r}): "
                        "export one with python export.py checkpoint=PATH")
    try:
        metadata = {key: json.loads(stored[key]) for key in METADATA}
        # Optional: models exported before predict.py existed lack it (predict.py then needs window=).
        metadata["box_size"] = json.loads(stored.get("box_size", "null"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; a 10,000-deep list recurses
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"checkpoint: {path}: its metadata is not valid JSON ({reason}); export it again") from None
    source = f"checkpoint={path}"
    untrusted.check_description(metadata, source)
    _check_signature(session, metadata, source)
    saved = saved_config.rebuild(metadata["config"], metadata["choices"], source)
    return OnnxClassifier(session, len(metadata["classes"]), source), metadata, saved


def _check_signature(session, metadata: dict, source: str) -> None:
    """The graph's input and output as export() writes them: uint8 (N, C, H, W) of the metadata's input_shape in,
    (N, classes) out. Sizes the graph leaves symbolic are checked on every batch (OnnxClassifier)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    expected_in = ["batch", *metadata["input_shape"]]
    expected_out = ["batch", len(metadata["classes"])]
    problems = []
    if len(inputs) != 1 or inputs[0].name != INPUT or inputs[0].type != "tensor(uint8)":
        problems.append(f"one uint8 input named {INPUT!r}")
    elif not _fits(inputs[0].shape, expected_in):
        problems.append(f"input {inputs[0].shape} for its input_shape {metadata['input_shape']}")
    if not any(o.name == OUTPUT for o in outputs):
        problems.append(f"an output named {OUTPUT!r}")
    elif not _fits(next(o for o in outputs if o.name == OUTPUT).shape, expected_out):
        shape = next(o for o in outputs if o.name == OUTPUT).shape
        problems.append(f"output {shape} for its {len(metadata['classes'])} classes")
    if problems:
        raise UserError(f"{source}: the graph does not match its metadata (expected {'; '.join(problems)}): each "
                        "output would be labelled wrongly; export the model again")


def _fits(shape: list, expected: list) -> bool:
    """A graph shape matches where its sizes are fixed; symbolic ones (strings, None) match anything."""
    return len(shape) == len(expected) and all(not isinstance(n, int) or not isinstance(e, int) or n == e
                                               for n, e in zip(shape, expected))
