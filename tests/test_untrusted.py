"""Crafted checkpoints and ONNX models, written by the tests as an attacker or a careless user would: every
field refused in one line before anything is allocated from it, and never a silently wrong result."""

import json
import os
import pickle
import resource
import zipfile
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from errors import UserError
from tests import files
from tests.helpers import returns_within
from training import checkpoint as checkpoints
from training import saved_config, untrusted
from training.build import build_model
from commands.evaluation import run_evaluation
from commands.onnx_model import FORMAT, INPUT, OUTPUT

CLASSES = ["bright", "dark"]


@pytest.fixture
def make_checkpoint(make_cfg, crop_csv, tmp_path):
    """write(name, **fields): a checkpoint as a run saves one (untrained weights: scoring need not be good),
    with `fields` replacing its own; `edit(checkpoint)` may change it further."""
    cfg = make_cfg(f"dataset.csv={crop_csv}", "dataset.cache=memory")
    config = OmegaConf.to_container(cfg, resolve=True)
    model = build_model(cfg.model, (3, 32, 32), len(CLASSES), torch.device("cpu"))

    def write(name: str, edit=None, **fields) -> Path:
        checkpoint = {"format": checkpoints.FORMAT, "epoch": 1, "batches_done": 0, "step": 8,
                      "model": model.state_dict(), "optimizer": {}, "scheduler": None, "scaler": {}, "rng": {},
                      "loader": {}, "classes": list(CLASSES), "input_shape": [3, 32, 32], "channels": 3,
                      "normalization": {"mean": [0.5], "std": [0.5]}, "value_range": [0.0, 255.0],
                      "metrics": {}, "config": config, "choices": saved_config.choices(cfg)} | fields
        if edit is not None:
            edit(checkpoint)
        torch.save(checkpoint, tmp_path / name)
        return tmp_path / name

    return write


@pytest.fixture
def image(tmp_path):
    return files.write_png(tmp_path / "item.png", np.full((32, 32, 3), 200, dtype=np.uint8))


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and len(message) < 600, message
    return message


def test_a_checkpoint_as_a_run_writes_it_predicts(make_checkpoint, make_eval_cfg, image):
    result = run_evaluation(make_eval_cfg(f"checkpoint={make_checkpoint('ok.pt')}", f"predict=[{image}]"))
    assert result["predictions"][0]["class"] in CLASSES and 0 < result["predictions"][0]["probability"] <= 1


def _deep(levels: int):
    value = []
    for _ in range(levels):
        value = [value]
    return value


CRAFTED = {
    "std_zero": ({"normalization": {"mean": [0.5], "std": [0.0]}}, "std"),
    "std_nan": ({"normalization": {"mean": [0.5], "std": [float("nan")]}}, "std"),
    "mean_inf": ({"normalization": {"mean": [float("inf")], "std": [0.5]}}, "mean"),
    "normalization_text": ({"normalization": "0.5"}, "normalization"),
    "std_per_channel_mismatch": ({"normalization": {"mean": [0.5], "std": [0.5, 0.5]}}, "std"),
    "classes_string": ({"classes": "bright,dark"}, "classes"),
    "classes_repeated": ({"classes": ["bright", "bright"]}, "repeat"),
    "classes_empty": ({"classes": []}, "classes"),
    "classes_too_many": ({"classes": [f"c{i}" for i in range(1_001)]}, "1,001 classes"),
    "class_with_newline": ({"classes": ["bright", "da\nrk"]}, "line break"),
    "channels_huge": ({"input_shape": [10**9, 32, 32], "channels": 10**9}, "input_shape"),
    "input_shape_text": ({"input_shape": "3x32x32"}, "input_shape"),
    "input_shape_negative": ({"input_shape": [3, -32, 32]}, "input_shape"),
    "input_shape_huge": ({"input_shape": [3, 100_000, 100_000]}, "input_shape"),
    "channels_disagree": ({"channels": 1}, "channels"),
    "value_range_flat": ({"value_range": [1.0, 1.0]}, "value_range"),
    "value_range_text": ({"value_range": "everything"}, "value_range"),
    "epoch_negative": ({"epoch": -1}, "epoch"),
    "split_val_blocks_huge": ({"split": {"by": "region", "val": 4, "val_digest": "0" * 16, "val_blocks": 10**12}},
                              "val_blocks"),
    "config_deep": ({"config": {"dataset": _deep(400)}}, "config is nested"),
}


@pytest.mark.parametrize("case", CRAFTED, ids=list(CRAFTED))
def test_a_crafted_checkpoint_field_is_one_line_naming_it(make_checkpoint, make_eval_cfg, image, case):
    fields, named = CRAFTED[case]
    path = make_checkpoint(f"{case}.pt", **fields)
    with pytest.raises(UserError) as error:
        run_evaluation(make_eval_cfg(f"checkpoint={path}", f"predict=[{image}]"))
    message = _one_line(error)
    assert f"checkpoint={path}" in message and named in message
    assert not (Path(make_eval_cfg(f"checkpoint={path}").run_dir) / "predictions.json").exists()


def test_nan_weights_are_refused_not_turned_into_nan_probabilities(make_checkpoint, make_eval_cfg, image):
    def poison(checkpoint):
        checkpoint["model"] = dict(checkpoint["model"])
        checkpoint["model"]["fc3.bias"] = torch.full_like(checkpoint["model"]["fc3.bias"], float("nan"))

    path = make_checkpoint("nan.pt", poison)
    with pytest.raises(UserError, match=r"fc3.bias holds NaN") as error:
        run_evaluation(make_eval_cfg(f"checkpoint={path}", f"predict=[{image}]"))
    _one_line(error)


def test_a_deflated_archive_is_refused_before_torch_expands_it(make_checkpoint, tmp_path):
    """torch.save writes stored entries; an archive whose entries expand far beyond its size is refused from its
    zip directory, before torch.load reads (and allocates) any of it."""
    plain = make_checkpoint("plain.pt")
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
        target.writestr(f"{source.namelist()[0].split('/')[0]}/data/999", bytes(64 << 20))  # 64 MiB of zeros
    assert bomb.stat().st_size < 2 << 20
    with pytest.raises(UserError, match=r"expands from .* MiB to 6\d\.\d MiB .* refused unread") as error:
        checkpoints.load(bomb, "checkpoint")
    _one_line(error)


@pytest.mark.parametrize(("content", "said"), [
    (b"\x89PNG\r\n\x1a\n" + bytes(32), "a PNG image"),
    (b"epoch,loss\n1,0.5\n", "not a file torch.save wrote"),
    (b"", "an empty file"),
])
def test_a_file_that_is_no_checkpoint_says_what_it_is(tmp_path, content, said):
    path = tmp_path / "not.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=rf"is not a checkpoint \({said}\)") as error:
        checkpoints.load(path, "checkpoint")
    assert "pickled" not in _one_line(error)


def test_a_real_pickle_of_objects_is_still_called_one(tmp_path):
    path = tmp_path / "objects.pt"
    path.write_bytes(pickle.dumps(Namespace(a=1), protocol=2))
    with pytest.raises(UserError, match=r"pickled Python objects"):
        checkpoints.load(path, "checkpoint")


def _blocking_kinds(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    return {"FIFO": fifo, "folder": folder, "device": Path("/dev/null")}


def test_a_fifo_folder_or_device_as_checkpoint_or_predict_is_named_not_opened(make_checkpoint, make_eval_cfg,
                                                                              tmp_path):
    ok = make_checkpoint("ok.pt")
    for kind, path in _blocking_kinds(tmp_path).items():
        for overrides in ([f"checkpoint={path}"], [f"checkpoint={path.with_suffix('.onnx')}"],
                          [f"checkpoint={ok}", f"predict=[{path}]"]):
            if "onnx" in overrides[0] and kind != "device":
                target = Path(overrides[0].split("=", 1)[1])
                if not target.exists():
                    os.mkfifo(target) if kind == "FIFO" else target.mkdir()
            elif "onnx" in overrides[0]:
                continue
            with pytest.raises(UserError) as error:
                returns_within(10, lambda: run_evaluation(make_eval_cfg(*overrides)))
            assert kind in _one_line(error) and "not found" not in str(error.value), (kind, overrides)


# ---- ONNX models whose metadata or graph lies --------------------------------------------------------------


def _onnx(path: Path, metadata: dict, outputs: int | str = 2, input_shape=(3, 32, 32), fail: bool = False) -> Path:
    """A real ONNX model of the trainer's signature, written with onnx.helper: uint8 (N, C, H, W) -> logits
    (N, outputs), each logit a weighted mean of the channels. `outputs` as a name: the graph declares a symbolic
    count and gives one logit per channel (a count ONNX Runtime cannot know before running it); `fail` adds a
    Reshape that fails at run time."""
    import onnx  # here: onnx costs each xdist worker that collects this file ~0.6 s of CPU to import
    from onnx import TensorProto, helper

    channels = input_shape[0]
    nodes = [helper.make_node("Cast", [INPUT], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0)]
    if isinstance(outputs, int):
        initializers = [helper.make_tensor("w", TensorProto.FLOAT, [channels, outputs],
                                           np.linspace(-1, 1, channels * outputs).tolist())]
        nodes.append(helper.make_node("MatMul", ["m", "w"], ["y" if fail else OUTPUT]))
    else:
        initializers = [helper.make_tensor(name, TensorProto.INT64, [1], [value])
                        for name, value in (("one", 1), ("two", 2), ("minus", -1))]
        nodes += [helper.make_node("Shape", [INPUT], ["s"]), helper.make_node("Slice", ["s", "one", "two"], ["c"]),
                  helper.make_node("Concat", ["minus", "c"], ["shape"], axis=0),
                  helper.make_node("Reshape", ["m", "shape"], [OUTPUT])]
    if fail:
        initializers.append(helper.make_tensor("bad_shape", TensorProto.INT64, [2], [7, 5]))
        nodes.append(helper.make_node("Reshape", ["y", "bad_shape"], [OUTPUT]))
    graph = helper.make_graph(
        nodes, "crafted",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["batch", *input_shape])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", outputs])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {key: json.dumps(value) if not isinstance(value, bytes) else value.decode()
                                   for key, value in metadata.items()})
    onnx.save(model, str(path))
    return path


@pytest.fixture
def onnx_metadata(make_cfg, crop_csv):
    cfg = make_cfg(f"dataset.csv={crop_csv}", "dataset.cache=memory")
    return {"format": FORMAT, "classes": list(CLASSES), "input_shape": [3, 32, 32],
            "normalization": {"mean": [0.5], "std": [0.5]}, "value_range": [0.0, 255.0], "epoch": 1, "metrics": {},
            "config": OmegaConf.to_container(cfg, resolve=True), "choices": saved_config.choices(cfg)}


def test_a_crafted_onnx_model_of_the_right_shape_predicts(onnx_metadata, make_eval_cfg, image, tmp_path):
    path = _onnx(tmp_path / "ok.onnx", onnx_metadata)
    result = run_evaluation(make_eval_cfg(f"checkpoint={path}", f"predict=[{image}]"))
    assert result["predictions"][0]["class"] in CLASSES


ONNX_CRAFTED = {
    "more_outputs_than_classes": (dict(outputs=3), {}, "does not match its metadata"),
    "fewer_outputs_than_classes": (dict(outputs=1), {}, "does not match its metadata"),
    "symbolic_outputs_of_another_count": (dict(outputs="classes"), {}, "outputs of shape (1, 3)"),
    "input_shape_huge": ({}, {"input_shape": [3, 100_000, 100_000]}, "input_shape"),
    "input_shape_of_another_graph": (dict(input_shape=(3, 16, 16)), {}, "does not match its metadata"),
    "classes_empty": ({}, {"classes": []}, "classes"),
    "classes_mapping": ({}, {"classes": {"0": "bright", "1": "dark"}}, "classes"),
    "value_range_flat": ({}, {"value_range": [1, 1]}, "value_range"),
    "std_zero": ({}, {"normalization": {"mean": [0.5], "std": [0]}}, "std"),
    "fails_while_running": (dict(fail=True), {}, "the model failed on a batch"),
}


@pytest.mark.parametrize("case", ONNX_CRAFTED, ids=list(ONNX_CRAFTED))
def test_a_crafted_onnx_model_is_one_line_never_a_wrong_answer(onnx_metadata, make_eval_cfg, image, tmp_path, case):
    graph, fields, named = ONNX_CRAFTED[case]
    path = _onnx(tmp_path / f"{case}.onnx", onnx_metadata | fields, **graph)
    with pytest.raises(UserError) as error:
        run_evaluation(make_eval_cfg(f"checkpoint={path}", f"predict=[{image}]"))
    assert named in _one_line(error)


def test_deeply_nested_onnx_metadata_is_one_line(onnx_metadata, make_eval_cfg, image, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000  # JSON the decoder cannot hold on the stack
    path = _onnx(tmp_path / "deep.onnx", onnx_metadata | {"config": deep.encode()})
    with pytest.raises(UserError, match="metadata is not valid JSON") as error:
        run_evaluation(make_eval_cfg(f"checkpoint={path}", f"predict=[{image}]"))
    _one_line(error)


def test_the_files_config_never_chooses_where_to_write_or_what_to_download(make_cfg, crop_csv, tmp_path):
    cfg = make_cfg(f"dataset.csv={crop_csv}", f"dataset.cache_dir={tmp_path / 'elsewhere'}")
    assert untrusted.reading_only(cfg.dataset).cache_dir is None
    cifar = make_cfg("dataset=cifar10", "dataset.download=true")
    assert untrusted.reading_only(cifar.dataset).download is False
    assert cfg.dataset.cache_dir == str(tmp_path / "elsewhere")  # the stored config itself is left as it was


def test_a_cifar_checkpoint_scored_without_dataset_does_not_download(make_cfg, make_checkpoint, make_eval_cfg,
                                                                     tmp_path):
    cifar = make_cfg("dataset=cifar10", f"dataset.root={tmp_path / 'nowhere'}", "dataset.download=true")
    model = build_model(cifar.model, (3, 32, 32), len(files.CIFAR_CLASSES), torch.device("cpu"))
    path = make_checkpoint("cifar.pt", config=OmegaConf.to_container(cifar, resolve=True), model=model.state_dict(),
                           choices=saved_config.choices(cifar), classes=files.CIFAR_CLASSES)
    with pytest.raises(UserError, match="CIFAR10 at .*nowhere.*download=true to fetch it") as error:
        run_evaluation(make_eval_cfg(f"checkpoint={path}"))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "nowhere").exists()


def test_non_finite_results_are_written_as_null_in_strict_json():
    text = json.dumps(untrusted.finite_or_none({"loss": float("nan"), "f1": {"a": float("inf"), "b": 0.5}}),
                      allow_nan=False)
    assert json.loads(text) == {"loss": None, "f1": {"a": None, "b": 0.5}}


def test_predict_of_an_npy_over_max_image_pixels_is_refused_before_reading(make_checkpoint, make_eval_cfg, tmp_path):
    """A 10,000 x 10,000 array (100 M pixels, over the default 89,478,485) would be read whole and mapped
    through float64 (800 MB): refused from its header, as an image of that size is."""
    big = files.write_sparse_npy(tmp_path / "big.npy", (10_000, 10_000), np.uint8)
    cfg = make_eval_cfg(f"checkpoint={make_checkpoint('ok.pt')}", f"predict=[{big}]")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with pytest.raises(UserError, match=r"predict: cannot read .*big.npy .*more than max_image_pixels=89478485"):
        run_evaluation(cfg)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 5_000  # the 100 MB of values (24k pages) were never touched
