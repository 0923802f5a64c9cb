"""Write the checkpoints in this folder with the trainer as it is, so later versions can prove they still
resume and evaluate them (tests/test_old_checkpoints.py).

Run from the repository root: python tests/data/checkpoints-v1/write.py
Each case trains one epoch of the tutorial CNN on tiny data written here (kept beside its checkpoint, named by
paths relative to this folder), saves checkpoints/last.pt as <case>.pt and records the run's metrics and
evaluate.py's result, and those of a resume to two epochs, in expected.json. Momentum 0 keeps the optimizer state out of the files (~70-300 kB).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from torchvision import datasets as tv  # noqa: E402

import training  # noqa: E402
from tests import files  # noqa: E402
from training import schema  # noqa: E402
from commands.evaluation import run_evaluation  # noqa: E402

CONFIGS = str(HERE.parent.parent.parent / "configs")
TINY = ["trainer.device=cpu", "trainer.progress=false", "trainer.epochs=1", "trainer.log_every=2",
        "trainer.warmup_steps=1", "optim.momentum=0", "loader.batch_size=8"]


def write_data() -> None:
    """The data of every case, under this folder; deterministic (seeded)."""
    rng = np.random.default_rng(22)
    files.write_crop_scenes(Path("crops_rgb"))
    # Float arrays (value_range=global maps them) cut by a crop CSV, on a disk cache.
    lines = ["path,x0,y0,x1,y1,label"]
    for n in range(3):
        array = rng.normal(0.0, 1.0, size=(32, 32)).astype(np.float32)
        for i in range(4):
            y, x = divmod(i, 2)
            if (i + n) % 2:
                array[y * 16:y * 16 + 16, x * 16:x * 16 + 16] += 3.0
            lines.append(f"a{n}.npy,{x * 16},{y * 16},{x * 16 + 16},{y * 16 + 16},{'hl'[(i + n) % 2]}")
        files.write_npy(Path("crops_npy") / f"a{n}.npy", array)
    Path("crops_npy/crops.csv").write_text("\n".join(lines) + "\n")
    # Grey PNGs seen as 3 channels (stored once), split by val_fraction.
    for cls, level in (("dark", 40), ("light", 200)):
        for i in range(6):
            image = np.clip(rng.normal(level, 30, size=(20, 18)), 0, 255).astype(np.uint8)
            files.write_png(Path("imagefolder_grey") / cls / f"{i}.png", image)
    # int16 arrays with train/ and val/ folders.
    for split, n in (("train", 5), ("val", 2)):
        for cls, level in (("x", -500), ("y", 500)):
            for i in range(n):
                array = (rng.normal(level, 300, size=(16, 16))).astype(np.int16)
                files.write_npy(Path("datasetfolder_npy") / split / cls / f"{i}.npy", array)
    files.write_cifar10(Path("cifar10"), per_batch=4, test_size=8, seed=22)


CASES = {
    "crops_rgb": ["dataset=crops", "dataset.csv=crops_rgb/crops.csv", "dataset.width=16", "dataset.height=16",
                  "dataset.mean=auto", "dataset.std=auto", "dataset.cache=memory"],
    "crops_npy": ["dataset=crops", "dataset.csv=crops_npy/crops.csv", "dataset.width=16", "dataset.height=16",
                  "dataset.channels=1", "dataset.cache=disk", "dataset.cache_dir=cache", "dataset.value_range=global",
                  "dataset.val_fraction=0.25"],
    "imagefolder_grey": ["dataset=imagefolder", "dataset.root=imagefolder_grey", "dataset.width=16",
                         "dataset.height=16", "dataset.mean=auto", "dataset.std=auto", "dataset.val_fraction=0.34"],
    "datasetfolder_npy": ["dataset=datasetfolder", "dataset.root=datasetfolder_npy", "dataset.width=16",
                          "dataset.height=16", "dataset.channels=1", "dataset.cache=none",
                          "dataset.value_range=global", "loader.mode=dataloader", "loader.num_workers=0"],
    "cifar10": ["dataset=cifar10", "dataset.root=cifar10", "dataset.download=false", "dataset.mean=auto",
                "dataset.std=[0.25]"],
}


def trust_cifar_files(root: Path) -> None:
    """torchvision checks CIFAR-10's files against the published MD5s; these tiny ones have their own."""
    folder = root / "cifar-10-batches-py"
    tv.CIFAR10.train_list = [[f"data_batch_{i}", files.md5(folder / f"data_batch_{i}")] for i in range(1, 6)]
    tv.CIFAR10.test_list = [["test_batch", files.md5(folder / "test_batch")]]
    tv.CIFAR10.meta = {**tv.CIFAR10.meta, "md5": files.md5(folder / "batches.meta")}


def main() -> None:
    schema.register()
    torch.set_num_threads(1)  # as the tests run: equal thread counts give equal float sums
    os.chdir(HERE)
    write_data()
    trust_cifar_files(Path("cifar10"))
    expected = {}
    for case, overrides in CASES.items():
        run_dir = HERE / "runs" / case
        shutil.rmtree(run_dir, ignore_errors=True)
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"run_dir={run_dir}", *TINY, *overrides])
            metrics = training.run(cfg)
            shutil.copy(run_dir / "checkpoints" / "last.pt", HERE / f"{case}.pt")
            evaluation = compose(config_name="evaluate", overrides=[f"run_dir={HERE / 'runs' / (case + '-eval')}",
                                                                    "device=cpu", f"checkpoint={case}.pt"])
            result = run_evaluation(evaluation)
            resume = compose(config_name="train", overrides=[f"run_dir={HERE / 'runs' / (case + '-resumed')}", *TINY,
                                                             f"resume={case}.pt", "trainer.epochs=2"])
            resumed = training.run(resume)
        expected[case] = {"overrides": overrides, "val/acc": metrics["val/acc"], "val/loss": metrics["val/loss"],
                          "eval": {"acc": result["acc"], "loss": result["loss"], "confusion": result["confusion"]},
                          "resumed": {"val/acc": resumed["val/acc"], "val/loss": resumed["val/loss"]}}
    shutil.rmtree(HERE / "runs")
    shutil.rmtree(HERE / "cache", ignore_errors=True)
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
