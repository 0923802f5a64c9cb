"""The custom-scalars layout and the markdown run summary, read back as TensorBoard serves them (its own
multiplexer and plugins), across a resumed run and a second run in the same logdir."""

import json
from pathlib import Path

import torch
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin
from tensorboard.plugins.text.text_plugin import TextPlugin

import training
from models.cnn import TutorialCNN
from training.logger import SUMMARY_TAG


def served(logdir: Path):
    """TensorBoard's custom-scalar and text plugins over `logdir`, as `tensorboard --logdir` would load it."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    tb = base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer,
                               data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(logdir)))
    return CustomScalarsPlugin(tb), TextPlugin(tb)


def test_layout_and_summary_once_per_run_also_after_resume(make_cfg, shared_run, shared_crop_csv, crop_csv, tmp_path):
    logs = tmp_path / "outputs"
    first = shared_run("loader.batch_size=8").copy(logs / "first")
    training.run(make_cfg(f"resume={first / 'checkpoints' / 'last.pt'}", "trainer.epochs=2",
                          run_dir=tmp_path / "elsewhere"))
    training.run(make_cfg(f"dataset.csv={crop_csv}", "loader.batch_size=16", "scheduler=cosine",
                          run_dir=logs / "second"))
    layouts, texts = served(logs)

    layout = json.loads(layouts.layout_impl(context.RequestContext(), ""))
    charts = {category["title"]: {chart["title"]: chart["multiline"]["tag"] for chart in category["chart"]}
              for category in layout["category"]}
    assert list(charts) == ["loss", "accuracy", "speed", "schedule"]
    # Two runs, one of them resumed: every chart once, as each run wrote the same layout.
    assert sum(len(category["chart"]) for category in layout["category"]) == 6
    assert charts["loss"] == {"train and validation loss": ["train/loss$", "val/loss$"]}
    assert charts["accuracy"]["validation accuracy"] == ["val/acc$", "val/acc_best$", "val/f1_macro$"]
    assert charts["accuracy"]["per-class validation accuracy"] == ["val/acc_class/"]
    assert charts["speed"] == {"throughput (samples/s)": ["train/throughput$"],
                               "waiting on data (fraction of time)": ["train/data_wait$"]}
    assert charts["schedule"] == {"learning rate": ["train/lr$"]}

    def summaries(run: str) -> list[dict]:
        return texts.text_impl(context.RequestContext(), run, f"{SUMMARY_TAG}/text_summary", "", False)

    (resumed,) = summaries("first")  # the first attempt's summary was purged with the resume
    assert resumed["step"] == 15  # one past the last step: 7 batches of 8 per epoch, 2 epochs
    text = resumed["text"]
    parameters = sum(p.numel() for p in TutorialCNN(in_channels=3, height=32, width=32, num_classes=2).parameters())
    for line in ["| family | crops |", f"| source | `{shared_crop_csv}` |", "| train | 52 items: bright 26, dark 26 |",
                 "| val | 12 items: bright 6, dark 6 |", "| input (C, H, W) | (3, 32, 32) |", "| cache | memory |",
                 "| name | TutorialCNN |", f"| parameters | {parameters:,} |", "| schedule | constant |",
                 "| batch size | 8 per process, 8 in all |", "| epochs | 2 |", "| device | cpu |",
                 "| processes | 1 |", "| outcome | finished |",
                 f"| best.pt | `{first / 'checkpoints' / 'best.pt'}` |"]:
        assert line in text, line
    assert "| optimiser | SGD (lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.0, decay_norms_and_biases=True, clip_grad_norm=null) |" in text
    assert "| val/acc_best |" in text and "| prepared in |" in text
    (second,) = summaries("second")
    assert "| schedule | CosineAnnealingLR (interval=epoch, T_max=1, eta_min=0.0) |" in second["text"]


def test_the_input_grid_lays_items_out_as_torchvisions_make_grid():
    from torchvision.utils import make_grid  # the reference; the product draws its own so runs skip this import

    from training.board import tile_grid

    generator = torch.Generator().manual_seed(0)
    for n, channels, columns in [(1, 1, 1), (1, 3, 1), (2, 3, 2), (5, 1, 3), (7, 3, 3), (16, 3, 4), (3, 3, 8)]:
        images = torch.rand(n, channels, 5, 7, generator=generator)
        expected = make_grid(images, nrow=columns, padding=2, pad_value=1.0)
        got = tile_grid(images, columns=columns, padding=2, pad_value=1.0)
        assert got.shape == expected.shape and torch.equal(got, expected), (n, channels, columns)
