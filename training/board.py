"""What TensorBoard shows besides scalars: a confusion-matrix image, a grid of training inputs, the
highest-loss validation items, a class-count table, and the hparams view. Pure rendering plus one helper that writes hparams into the run's own events file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from torchvision.utils import make_grid

CELL = 28  # pixels per confusion-matrix cell: room for a 3-digit count in the default font
LABEL_CHARS = 16  # class names longer than this are cut in the row labels
TILE = 96  # minimum width in pixels of one item in the mistakes grid: room for a "true -> predicted" caption
LINE = 13  # pixels per caption line in the default font
CAPTION = 2 * LINE  # caption under each item: the true class, then "-> predicted"
GAP = 2  # pixels between items


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the config as the dotted keys a user types as overrides."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


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
    return make_grid(images, nrow=int(np.ceil(np.sqrt(len(images)))), padding=2, pad_value=1.0)


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
            while font.getlength(text) > tile_w and len(text) > 1:
                text = text[:-1]
            draw.text((x, y + height * scale + line * LINE + LINE // 2), text, font=font, anchor="lm", fill=colour)
    return np.asarray(grid)


def class_count_table(classes: Sequence[str], counts: Mapping[str, Sequence[int]]) -> str:
    """A markdown table: one row per class, one column of item counts per split, and the totals."""
    splits = list(counts)
    lines = ["| class | " + " | ".join(splits) + " |", "| --- |" + " ---: |" * len(splits)]
    for i, name in enumerate(classes):
        name = name.replace("|", "\\|")  # a | in a class name would end the cell
        lines.append(f"| {name} | " + " | ".join(str(counts[split][i]) for split in splits) + " |")
    lines.append("| **all** | " + " | ".join(str(sum(counts[split])) for split in splits) + " |")
    return "\n".join(lines)


def hparam_value(value):
    """TensorBoard's hparams take numbers, strings and booleans; lists and None become their text."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def write_hparams(writer: SummaryWriter, config: Mapping, metrics: Mapping[str, float]) -> None:
    """The hparams view, written into the run's own events file: SummaryWriter.add_hparams would open a
    timestamped subfolder, which TensorBoard lists as a second run. Metric values come from the scalars of
    the same tags already in this file."""
    values = {key: hparam_value(value) for key, value in flatten(config).items()}
    file_writer = writer._get_file_writer()
    for summary in hparams(values, dict(metrics)):
        file_writer.add_summary(summary)
