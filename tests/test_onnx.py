"""export.py and evaluate.py on .onnx files: the ONNX model answers as the checkpoint does, on real files."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import training
from errors import UserError
from tests import composing, files
from tests.conftest import CONFIGS
from training.build import build_dataset, build_model
from commands.evaluation import run_evaluation
from commands.prediction import run_prediction
from training.loop import Normalizer
from commands.onnx_model import run_export


# onnx and onnxruntime are imported in the tests that use them: at the top, each xdist worker would pay ~0.6 s of
# CPU importing onnx while collecting, whether or not it runs one of these tests.


def _compose(name: str, *overrides: str):
    return composing.compose(CONFIGS, name, overrides)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A two-epoch crop run and its best.pt exported once for the module (an export takes seconds)."""
    root = tmp_path_factory.mktemp("onnx")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        csv = files.write_crop_scenes(root / "crops")
        cfg = _compose("train", f"dataset.csv={csv}", f"run_dir={root / 'run'}", "trainer.device=cpu",
                       "trainer.progress=false", "trainer.epochs=2", "loader.batch_size=8")
        training.run(cfg)
        checkpoint = root / "run" / "checkpoints" / "best.pt"
        onnx_path = run_export(_compose("export", f"checkpoint={checkpoint}", f"run_dir={root / 'export'}"))
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "csv": csv, "checkpoint": checkpoint, "onnx": onnx_path}


def test_export_writes_model_onnx_in_its_run_dir(exported):
    assert exported["onnx"] == exported["root"] / "export" / "model.onnx" and exported["onnx"].is_file()
    assert not list(exported["onnx"].parent.glob(".*tmp*"))  # the temp file was renamed, not left beside it


def test_onnx_model_takes_uint8_of_any_batch_and_carries_the_run(exported):
    import onnxruntime as ort

    checkpoint = torch.load(exported["checkpoint"], weights_only=True)
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    (given,) = session.get_inputs()
    assert given.type == "tensor(uint8)" and given.shape[1:] == [3, 32, 32] and isinstance(given.shape[0], str)
    metadata = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
    assert metadata["classes"] == checkpoint["classes"] == ["bright", "dark"]
    assert metadata["input_shape"] == [3, 32, 32]
    assert metadata["normalization"] == checkpoint["normalization"]
    assert metadata["config"] == checkpoint["config"]
    assert metadata["choices"]["dataset"] == "crops" and metadata["choices"]["model"] == "tutorial_cnn"

    # Real crops as the data set yields them, a batch size the export never saw.
    bundle = build_dataset(_compose("train", f"dataset.csv={exported['csv']}").dataset, seed=0)
    images = bundle.train.store.images[:5]
    (logits,) = session.run(None, {given.name: images.numpy()})
    model = build_model(checkpoint["config"]["model"], (3, 32, 32), 2, torch.device("cpu"))
    model.load_state_dict(checkpoint["model"])
    with torch.no_grad():
        expected = model.eval()(Normalizer([0.5], [0.5], torch.device("cpu"))(images))
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5)


def test_evaluate_scores_the_onnx_model_as_the_checkpoint(exported, make_eval_cfg, tmp_path):
    from_pt = run_evaluation(make_eval_cfg(f"checkpoint={exported['checkpoint']}", run_dir=tmp_path / "pt"))
    from_onnx = run_evaluation(make_eval_cfg(f"checkpoint={exported['onnx']}", run_dir=tmp_path / "onnx"))
    # split_by=auto holds out one of the four scenes whole: its 16 crops.
    assert from_onnx["confusion"] == from_pt["confusion"] and sum(map(sum, from_pt["confusion"])) == 16
    assert from_onnx["acc"] == from_pt["acc"] and from_onnx["per_class_acc"] == from_pt["per_class_acc"]
    assert from_onnx["loss"] == pytest.approx(from_pt["loss"], abs=1e-5)
    assert json.loads((tmp_path / "onnx" / "eval.json").read_text())["checkpoint"] == str(exported["onnx"])


def test_onnx_and_checkpoint_predict_the_same_on_real_files(exported, make_eval_cfg, tmp_path):
    scene = np.asarray(Image.open(exported["csv"].parent / "scene1.png"))
    paths = []
    for i, (y, x) in enumerate([(0, 0), (0, 16), (16, 32), (48, 48)]):  # both classes (bright on odd i + n)
        crop = scene[y:y + 16, x:x + 16]
        paths.append(files.write_png(tmp_path / f"crop{i}.png", crop))
        paths.append(files.write_npy(tmp_path / f"crop{i}.npy", crop))
    paths.append(exported["csv"].parent / "scene2.png")  # a whole scene, resized to 32x32
    predict = f"predict=[{','.join(map(str, paths))}]"
    from_pt = run_evaluation(make_eval_cfg(f"checkpoint={exported['checkpoint']}", predict, run_dir=tmp_path / "pt"))
    from_onnx = run_evaluation(make_eval_cfg(f"checkpoint={exported['onnx']}", predict, run_dir=tmp_path / "onnx"))
    assert {p["class"] for p in from_pt["predictions"]} == {"bright", "dark"}
    for a, b in zip(from_pt["predictions"], from_onnx["predictions"], strict=True):
        assert a["file"] == b["file"] and a["class"] == b["class"]
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)



def test_predict_maps_an_image_with_the_onnx_model_as_with_the_checkpoint(exported, tmp_path):
    """The ONNX file carries the run's box size: predict.py slides the same windows and gets the same map."""
    scene = exported["csv"].parent / "scene3.png"
    results = [run_prediction(_compose("predict", f"checkpoint={exported[kind]}", f"inputs=[{scene}]", "device=cpu",
                                       f"run_dir={tmp_path / kind}"))
               for kind in ("checkpoint", "onnx")]
    assert results[0]["inputs"][0]["window"] == results[1]["inputs"][0]["window"] == [16, 16]
    pt, onnx_probabilities = (np.load(tmp_path / kind / "scene3.png" / "probabilities.npy").astype(np.float32)
                              for kind in ("checkpoint", "onnx"))
    assert pt.shape == (2, 7, 7)  # 64 px, window 16, the default stride 8
    assert np.allclose(pt, onnx_probabilities, atol=2e-3)  # float16 files: ~1e-3 apart at most

def test_export_refuses_a_checkpoint_that_is_not_ours(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(UserError, match=r"foreign.pt is not a checkpoint of this trainer"):
        run_export(_compose("export", f"checkpoint={foreign}", f"run_dir={tmp_path / 'export'}"))
    assert not (tmp_path / "export" / "model.onnx").exists()


def test_export_never_overwrites_a_file(exported, tmp_path):
    taken = tmp_path / "taken.onnx"
    taken.write_bytes(b"the user's file")
    cfg = _compose("export", f"checkpoint={exported['checkpoint']}", f"output={taken}", f"run_dir={tmp_path / 'e'}")
    with pytest.raises(UserError, match="already exists"):
        run_export(cfg)
    assert taken.read_bytes() == b"the user's file"


def test_evaluate_refuses_onnx_files_that_are_not_ours(exported, make_eval_cfg, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    with pytest.raises(UserError, match=r"garbage.onnx is not an ONNX model onnxruntime can read") as error:
        run_evaluation(make_eval_cfg(f"checkpoint={garbage}"))
    assert "\n" not in str(error.value)

    import onnx

    plain = onnx.load(str(exported["onnx"]))
    del plain.metadata_props[:]  # a valid ONNX model from elsewhere: no classes, no config
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(UserError, match=r"plain.onnx is not an ONNX model exported by this trainer"):
        run_evaluation(make_eval_cfg(f"checkpoint={tmp_path / 'plain.onnx'}"))


def _with_metadata(exported, path: Path, edit) -> Path:
    import onnx

    model = onnx.load(str(exported["onnx"]))
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    edit(props)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {k: json.dumps(v) for k, v in props.items()})
    onnx.save(model, str(path))
    return path


def test_metadata_never_chooses_what_code_runs(exported, make_eval_cfg, tmp_path):
    """The data is rebuilt from the shipped dataset group: metadata naming another `_target_` is refused before
    anything is built (the victim folder survives), and so is a choice this trainer does not ship."""
    def hostile_target(props):
        props["config"]["dataset"]["_target_"] = "shutil.rmtree"
        props["config"]["dataset"]["_args_"] = [str(tmp_path / "victim")]

    (tmp_path / "victim").mkdir()
    path = _with_metadata(exported, tmp_path / "target.onnx", hostile_target)
    with pytest.raises(UserError, match=r"sets dataset._target_='shutil.rmtree' .* may not choose what code runs"):
        run_evaluation(make_eval_cfg(f"checkpoint={path}", run_dir=tmp_path / "e1"))
    assert (tmp_path / "victim").is_dir()

    path = _with_metadata(exported, tmp_path / "choice.onnx", lambda props: props["choices"].update(dataset="evil"))
    with pytest.raises(UserError, match=r"records dataset='evil', which this trainer does not ship"):
        run_evaluation(make_eval_cfg(f"checkpoint={path}", run_dir=tmp_path / "e2"))
