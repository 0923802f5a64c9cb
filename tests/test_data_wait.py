"""train/data_wait: a run starved by per-item decoding says so once in its log; a cached run does not."""

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

import training
from datasets.crop_csv import write_crops
from tests import files
from training.logger import starvation_advice

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


# Batch 2 starves a per-item loader (~20 ms a decode against a ~1 ms step); a cached run at batch 8 is not
# starved. (At batch 2 even slicing on the device can take 20% of a step this small: see the test below.)
@pytest.mark.parametrize("cache, batch, warned", [("none", 2, True), ("memory", 8, False)])
def test_data_wait_warning(make_cfg, slow_csv, tmp_path, cache, batch, warned):
    run_dir = tmp_path / cache
    cfg = make_cfg(f"dataset.csv={slow_csv}", f"dataset.cache={cache}", "loader.mode=auto",
                   f"loader.batch_size={batch}", "loader.num_workers=0", "trainer.log_every=2", run_dir=run_dir)
    metrics = training.run(cfg)
    log = (run_dir / "train.log").read_text()
    assert log.count(STARVED) == (1 if warned else 0), log
    if warned:
        assert metrics["train/data_wait"] > 0.2
        assert "dataset.cache=memory" in log  # the warning names the fix


def test_the_advice_fits_the_loader(make_cfg, build_crops, crop_csv):
    """Waiting on a device loader cannot be helped by caching: only bigger steps help."""
    memory = build_crops(f"dataset.csv={crop_csv}")
    make_loader = instantiate(make_cfg().loader)
    on_device = make_loader(memory.train, device=torch.device("cpu"), seed=0, train=True, mode="device")
    per_item = make_loader(memory.train, device=torch.device("cpu"), seed=0, train=True, mode="dataloader")
    assert "raise loader.batch_size" in starvation_advice(on_device)
    assert "dataset.cache=memory" in starvation_advice(per_item)


def test_one_starved_window_is_noise_two_in_a_row_warn(caplog):
    """A single window can wait on one preemption of a busy machine; starvation that persists is the loader."""
    from training.logger import RunLogger
    from training.loop import Window

    logger = RunLogger(None, None, loader=None, progress=False)
    def window(step, wait):
        return Window(step=step, loss=1.0, throughput=100.0, data_wait=wait)
    with caplog.at_level("WARNING", logger="training.logger"):
        for step, wait in enumerate([0.5, 0.1, 0.6, 0.05], start=1):  # starved windows, never two in a row
            logger.window(window(step, wait))
        assert STARVED not in caplog.text
        logger.window(window(5, 0.3))
        logger.window(window(6, 0.4))
        assert caplog.text.count(STARVED) == 1 and "(step 6)" in caplog.text
        logger.window(window(7, 0.9))
        logger.window(window(8, 0.9))
        assert caplog.text.count(STARVED) == 1  # once per run
