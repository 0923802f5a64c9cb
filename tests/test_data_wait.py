"""train/data_wait: a run starved by per-item decoding says so once in its log; a cached run does not."""

import numpy as np
import pytest

import training
from datasets.crop_csv import write_crops
from tests import files

STARVED = "training waited on data"


@pytest.fixture
def slow_csv(tmp_path):
    """32 small crops of two 1024x1024 noise PNGs: each item decodes ~3 MB (~20 ms), the step takes ~1 ms."""
    rng = np.random.default_rng(2)
    root = tmp_path / "slow"
    rows = []
    for n in range(2):
        files.write_png(root / f"big{n}.png", files.random_image(rng, 1024, 1024))
        rows += [{"path": f"big{n}.png", "x0": 32 * i, "y0": 0, "x1": 32 * i + 32, "y1": 32, "label": i % 2}
                 for i in range(16)]
    return write_crops(root / "crops.csv", rows)


@pytest.mark.parametrize("cache, warned", [("none", True), ("memory", False)])
def test_data_wait_warning(make_cfg, slow_csv, tmp_path, cache, warned):
    run_dir = tmp_path / cache
    cfg = make_cfg(f"dataset.csv={slow_csv}", f"dataset.cache={cache}", "loader.mode=auto", "loader.batch_size=2",
                   "loader.num_workers=0", "trainer.log_every=4", run_dir=run_dir)
    metrics = training.run(cfg)
    log = (run_dir / "train.log").read_text()
    assert log.count(STARVED) == (1 if warned else 0), log
    if warned:
        assert metrics["train/data_wait"] > 0.2
        assert "dataset.cache=memory" in log  # the warning names the fix
