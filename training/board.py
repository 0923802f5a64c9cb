"""What TensorBoard shows besides scalars: a confusion-matrix image, a grid of training inputs, the
highest-loss validation items, a class-count table, and the hparams view of the keys users tune. Pure
rendering plus one helper that writes hparams into the run's own events file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
from omegaconf import OmegaConf
import torch
from PIL import Image, ImageDraw, ImageFont
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

CELL = 28  # pixels per confusion-matrix cell: room for a 3-digit count in the default font
LABEL_CHARS = 16  # class names longer than this are cut in the row labels
TILE = 96  # minimum width in pixels of one item in the mistakes grid: room for a "true -> predicted" caption
LINE = 13  # pixels per caption line in the default font
CAPTION = 2 * LINE  # caption under each item: the true class, then "-> predicted"
GAP = 2  # pixels between items


def confusion_image(confusion: torch.Tensor, classes: Sequence[str]) -> np.ndarray:
    """uint8 (H, W, 3): rows are true classes, columns predictions; each cell's shade is its share of the
    row (so small classes show as clearly as big ones) and its text the count."""
    counts = confusion.numpy().astype(np.int64)
    n = len(classes)
    font = ImageFont.load_default()
    labels = [f"{i} {name[:LABEL_CHARS]}" for i, name in enumerate(classes)]
    left = 8 + max(int(font.getlength(text)) for text in labels)
    top = CELL
    image = Image.new("RGB", (left + n * CELL + 1, top + n * CELL + 1), "white")
    draw = ImageDraw.Draw(image)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=np.float64), where=rows > 0)
    for i in range(n):
        draw.text((4, top + i * CELL + CELL // 2), labels[i], fill="black", font=font, anchor="lm")
        draw.text((left + i * CELL + CELL // 2, top // 2), str(i), fill="black", font=font, anchor="mm")
        for j in range(n):
            x, y = left + j * CELL, top + i * CELL
            shade = int(255 * (1.0 - share[i, j]))
            draw.rectangle([x, y, x + CELL, y + CELL], fill=(shade, shade, 255), outline="grey")
            draw.text((x + CELL // 2, y + CELL // 2), str(counts[i, j]), font=font, anchor="mm",
                      fill="white" if share[i, j] > 0.5 else "black")
    return np.asarray(image)


def input_grid(normalized: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The batch the model saw (N, C, H, W), de-normalised back to [0, 1] for display: (3, H', W')."""
    mean_ = torch.tensor(list(mean), device=normalized.device).view(1, -1, 1, 1)
    std_ = torch.tensor(list(std), device=normalized.device).view(1, -1, 1, 1)
    images = (normalized * std_ + mean_).clamp(0.0, 1.0).cpu()
    return tile_grid(images, columns=int(np.ceil(np.sqrt(len(images)))), padding=2, pad_value=1.0)


def tile_grid(images: torch.Tensor, columns: int, padding: int, pad_value: float) -> torch.Tensor:
    """(N, C, H, W) -> (3, H', W'): the items row by row, `columns` to a row, `padding` pixels of `pad_value`
    around each; grey repeats to RGB, and one item comes back alone, unpadded. The layout of torchvision's
    make_grid (tests/test_dashboards.py checks it pixel for pixel), drawn here because importing torchvision loads
    torch._dynamo: ~1.2 CPU-s at the start of evaluate.py and predict.py, which import this module.
    """
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, channels, height, width = images.shape
    if n == 1:
        return images[0].clone()
    columns = min(columns, n)
    rows = -(-n // columns)
    step_y, step_x = height + padding, width + padding
    grid = images.new_full((channels, rows * step_y + padding, columns * step_x + padding), pad_value)
    for k in range(n):
        y, x = divmod(k, columns)
        grid[:, y * step_y + padding:(y + 1) * step_y, x * step_x + padding:(x + 1) * step_x] = images[k]
    return grid


def mistakes_image(images: torch.Tensor, targets: Sequence[int], predicted: Sequence[int],
                   classes: Sequence[str]) -> np.ndarray:
    """uint8 (H, W, 3): each item as the loader gave it (uint8, before normalisation: what the model saw,
    de-normalised), enlarged by a whole factor to at least TILE pixels wide, captioned with its true class
    and "-> predicted" (red when wrong; names cut to the tile's width), in a near-square grid in the given
    order."""
    k, channels, height, width = images.shape
    scale = max(1, -(-TILE // width))
    tile_w, tile_h = width * scale, height * scale + CAPTION
    columns = int(np.ceil(np.sqrt(k)))
    rows = -(-k // columns)
    grid = Image.new("RGB", (columns * (tile_w + GAP) + GAP, rows * (tile_h + GAP) + GAP), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    pixels = images.cpu().expand(-1, 3, -1, -1) if channels == 1 else images.cpu()
    for i in range(k):
        x, y = GAP + (i % columns) * (tile_w + GAP), GAP + (i // columns) * (tile_h + GAP)
        item = Image.fromarray(pixels[i].permute(1, 2, 0).numpy()).resize((tile_w, height * scale), Image.NEAREST)
        grid.paste(item, (x, y))
        colour = "black" if targets[i] == predicted[i] else "red"
        for line, text in enumerate((classes[targets[i]], f"-> {classes[predicted[i]]}")):
            text = fit_text(text, font, tile_w)
            draw.text((x, y + height * scale + line * LINE + LINE // 2), text, font=font, anchor="lm", fill=colour)
    return np.asarray(grid)


def fit_text(text: str, font, width: int) -> str:
    """The longest prefix of `text` (at least one character) drawn within `width` pixels. Every character is at
    least a pixel wide, so at most `width` characters can fit; the cut is then found by bisection, ~7 lengths
    measured where cutting one character at a time measured the whole label per character (quadratic: 6 s for
    a 3,000-character label)."""
    text = text[:max(1, width)]
    low, high = 1, len(text)  # the answer lies in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        if font.getlength(text[:middle]) <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low]


def class_count_table(classes: Sequence[str], counts: Mapping[str, Sequence[int]]) -> str:
    """A markdown table: one row per class, one column of item counts per split, and the totals."""
    splits = list(counts)
    lines = ["| class | " + " | ".join(splits) + " |", "| --- |" + " ---: |" * len(splits)]
    for i, name in enumerate(classes):
        name = name.replace("|", "\\|")  # a | in a class name would end the cell
        lines.append(f"| {name} | " + " | ".join(str(counts[split][i]) for split in splits) + " |")
    lines.append("| **all** | " + " | ".join(str(sum(counts[split])) for split in splits) + " |")
    return "\n".join(lines)


# The keys a user compares across runs, as typed on the command line; a group's name ("model", "optim")
# shows what it builds (TutorialCNN, SGD). Keys the config lacks are left out, except those with a value
# here for that case (no scheduler: a constant rate). A new tuned key is one entry. TensorBoard (2.21) lists
# the keys whose values differ between the runs first, then the rest by name; older versions keep this order.
TUNED: dict[str, str | None] = {
    "optim.lr": None,
    "loader.batch_size": None,
    "trainer.epochs": None,
    "model": None,
    "optim": None,
    "optim.momentum": None,
    "optim.nesterov": None,
    "optim.weight_decay": None,
    "optim.clip_grad_norm": None,
    "scheduler": "constant",
    "trainer.label_smoothing": None,
    "augment.pad": None,
    "augment.hflip": None,
    "augment.vflip": None,
    "augment.transpose": None,
    "augment.cutout": None,
    "dataset": None,
    "dataset.csv": None,
    "dataset.root": None,
    "dataset.width": None,
    "dataset.height": None,
    "dataset.channels": None,
    "dataset.cache": None,
    "dataset.val_fraction": None,
    "loader.mode": None,
    "loader.sampler": None,
    "trainer.precision": None,
    "trainer.seed": None,
}
_ABSENT = object()


def target_name(target: str) -> str:
    """What a `_target_` builds, in a word: datasets.crops.build -> crops, datasets.folders.build_imagefolder
    -> imagefolder, torch.optim.SGD -> SGD."""
    module, _, name = target.rpartition(".")
    return module.rpartition(".")[2] if name == "build" else name.removeprefix("build_")


def hparam_value(value):
    """TensorBoard's hparams take numbers, strings and booleans: a group shows the name of what it builds,
    None and lists the way they are typed as overrides (null, [0.5, 0.5])."""
    if isinstance(value, Mapping):
        return target_name(value["_target_"]) if "_target_" in value else None
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(hparam_value(v)) for v in value) + "]"
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def tuned_hparams(config: Mapping) -> dict:
    """TUNED's keys that this run's resolved config has, in TUNED's order, as hparams values."""
    tree, values = OmegaConf.create(dict(config)), {}
    for key, when_absent in TUNED.items():
        value = OmegaConf.select(tree, key, default=_ABSENT)
        shown = when_absent if value is _ABSENT else hparam_value(value)
        if shown is not None:
            values[key] = shown
    return values


def write_hparams(writer: SummaryWriter, config: Mapping, metrics: Mapping[str, float], failed: bool = False) -> None:
    """The hparams view, written into the run's own events file: SummaryWriter.add_hparams would open a
    timestamped subfolder, which TensorBoard lists as a second run. Metric values come from the scalars of
    the same tags already in this file. A failed run (an error, a NaN loss) ends its session with status
    Failure, so a search's failed trials stay in the HPARAMS table beside the others (its Status filter)."""
    file_writer = writer._get_file_writer()
    experiment, start, end = hparams(tuned_hparams(config), dict(metrics))
    if failed:  # torch writes STATUS_SUCCESS; the same summary with the status changed
        plugin_data = end.value[0].metadata.plugin_data
        content = plugin_data_pb2.HParamsPluginData.FromString(plugin_data.content)
        content.session_end_info.status = api_pb2.STATUS_FAILURE
        plugin_data.content = content.SerializeToString()
    for summary in (experiment, start, end):
        file_writer.add_summary(summary)


def _only(*tags: str) -> list[str]:
    """The custom-scalar plugin matches each entry as a regular expression from a tag's start: anchor it,
    or val/acc would also draw val/acc_best and every val/acc_class/<class>."""
    return [f"{re.escape(tag)}$" for tag in tags]


# CUSTOM SCALARS: what a user looks at first, side by side. Every run writes the same layout, so runs
# compared in one dashboard merge into the same charts; per-class accuracy is a pattern, whatever the classes.
# A tag a run does not log (val/f1_macro before it exists) just draws no line. Throughput (thousands of
# samples/s) and data wait (a fraction) get a chart each: on one axis the wait would be a flat line at zero.
LAYOUT = {
    "loss": {"train and validation loss": ["Multiline", _only("train/loss", "val/loss")]},
    "accuracy": {
        "validation accuracy": ["Multiline", _only("val/acc", "val/acc_best", "val/f1_macro")],
        "per-class validation accuracy": ["Multiline", ["val/acc_class/"]],
    },
    "speed": {
        "throughput (samples/s)": ["Multiline", _only("train/throughput")],
        "waiting on data (fraction of time)": ["Multiline", _only("train/data_wait")],
    },
    "schedule": {"learning rate": ["Multiline", _only("train/lr")]},
}


def summary_markdown(title: str, sections: Mapping[str, Mapping[str, str]]) -> str:
    """A run's summary for TensorBoard's TEXT tab: a heading, then a two-column table per section."""
    lines = [f"## {title}"]
    for section, rows in sections.items():
        lines += ["", f"### {section}", "", "| | |", "| --- | --- |"]
        lines += [f"| {key} | {str(value).replace('|', '/')} |" for key, value in rows.items()]
    return "\n".join(lines)
