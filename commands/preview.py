"""preview.py's work: what training would use, shown before any training.

- sources/<file>.png: each source file of a crop CSV with every good row drawn on it, one colour per class
  (boxes as outlines, strip rows as translucent column bands) and a legend;
- classes.png: up to `per_class` items per class exactly as the model receives them (cut, resized and
  converted to the configured channels by the data set's own code; before normalisation);
- the class counts per split and every bad CSV row, as train.py reports them.

The data set is built by training's own code with per-item decoding (`dataset.cache=none`: nothing is
decoded beyond what is drawn, no disk cache is written) and, for crop CSVs, `on_bad_rows=skip`, so the bad
rows are listed and the good ones still drawn.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes, make_grid

from commands.palette import LINE, colours, font, scale_for, with_legend
from datasets.base import DataBundle, labels_of
from datasets.crop_csv import Crop
from datasets.crops import LazyCrops
from datasets.regions import FileSource
from datasets.transforms import DECODE_ERRORS
from errors import UserError
from training import run_folder
from training.build import build_dataset, require_keys
from training.schema import check_ranges

log = logging.getLogger(__name__)

TILE = 64  # pixels: classes.png enlarges smaller crops by whole factors (nearest) to at least this side
SPLITS = ("train", "val")


def run_preview(cfg: DictConfig) -> dict:
    """Write sources/*.png and classes.png into cfg.run_dir; returns the classes, counts per split, the bad
    rows and the files written."""
    check_ranges(cfg)  # sources, per_class, max_side, seed (training/schema.py)
    require_keys(cfg)
    run_dir = Path(cfg.run_dir)
    run_folder.create(run_dir)
    bundle = build_dataset(_per_item(cfg.dataset), cfg.seed)
    splits = {"train": bundle.train, "val": bundle.val}
    counts = {name: torch.bincount(labels_of(split), minlength=len(bundle.classes)).tolist()
              for name, split in splits.items()}
    sources = []
    if isinstance(bundle.train, LazyCrops):
        crops = sorted([*bundle.train.crops, *bundle.val.crops], key=lambda crop: crop.line)
        labels = {name: i for i, name in enumerate(bundle.classes)}
        sources = draw_sources(crops, labels, run_dir / "sources", cfg.sources, cfg.max_side)
    grid = class_grid(bundle, splits, cfg.per_class)
    Image.fromarray(grid).save(run_dir / "classes.png")
    return {"classes": bundle.classes, "counts": counts, "problems": bundle.skipped, "sources": sources,
            "classes_png": run_dir / "classes.png"}


def _per_item(dataset_cfg: DictConfig) -> DictConfig:
    node = dataset_cfg.copy()
    if "cache" in node:
        node.cache = "none"
    if "on_bad_rows" in node:
        node.on_bad_rows = "skip"
    return node


def report(result: dict, csv: str | None) -> str:
    """The bad rows (each line as train.py lists it) and a table of items per class and split."""
    lines = []
    if result["problems"]:
        lines.append(f"{len(result['problems'])} bad row(s) in {csv or 'the CSV'} (train.py stops on them unless "
                     "dataset.on_bad_rows=skip, which leaves them out); the pictures show the good rows:")
        lines += [f"  {problem}" for problem in result["problems"]]
    classes, counts = result["classes"], result["counts"]
    width = max(len(name) for name in [*classes, "class", "all"])
    lines.append(f"{'class':<{width}} {'train':>7} {'val':>7} {'total':>7}")
    rows = [(name, counts["train"][i], counts["val"][i]) for i, name in enumerate(classes)]
    rows.append(("all", sum(counts["train"]), sum(counts["val"])))
    lines += [f"{name:<{width}} {train:>7} {val:>7} {train + val:>7}" for name, train, val in rows]
    return "\n".join(lines)


def _source_name(path: Path, base: str) -> str:
    """sources/ file name: the path under the sources' common folder, folders joined by '__', plus .png."""
    name = Path(os.path.relpath(path, base)).as_posix().replace("/", "__")
    return name if name.lower().endswith(".png") else f"{name}.png"


def draw_sources(crops: list[Crop], labels: dict[str, int], folder: Path, limit: int, max_side: int) -> list[Path]:
    """The first `limit` files of the CSV (in row order), each with all its rows drawn and a legend."""
    by_file: dict[Path, list[Crop]] = defaultdict(list)
    for crop in crops:
        by_file[crop.path].append(crop)
    chosen = list(by_file)[:limit]
    if not chosen:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    base = os.path.commonpath([str(path.parent) for path in by_file])
    palette = colours(len(labels))
    written = []
    for path in chosen:
        image = draw_file(path, by_file[path], labels, palette, max_side)
        out = folder / _source_name(path, base)
        image.save(out)
        written.append(out)
    log.info("drew %d of %d source file(s) in %s", len(written), len(by_file), folder)
    return written


def draw_file(path: Path, crops: list[Crop], labels: dict[str, int], palette: list, max_side: int) -> Image.Image:
    """One source as the data set reads it (a .npy scaled to 0..255 as training scales it), boxes drawn."""
    try:
        source = FileSource(path, 3)
        height, width = source.shape
        factor = scale_for(height, width, max_side)
        # A tiled TIFF comes from a low pyramid level or a strided read, never decoded whole at full resolution.
        image = source.overview(max(round(height * factor), round(width * factor)))
    except DECODE_ERRORS as e:
        raise UserError(f"{path}: cannot be decoded ({e}); replace it or remove its rows") from None
    size = [max(1, round(height * factor)), max(1, round(width * factor))]
    interpolation = TF.InterpolationMode.BILINEAR if factor < 1 else TF.InterpolationMode.NEAREST
    image = TF.resize(image, size, interpolation=interpolation, antialias=factor < 1)
    boxes = [c for c in crops if c.y1 is not None]
    strips = [c for c in crops if c.y1 is None]
    line = max(3, round(max(size) / 300))  # pixels: visible on busy photos at any size
    if strips:  # translucent bands over the full height: several strips may overlap
        image = draw_bounding_boxes(image, _pixels(strips, factor, height), colors=[palette[labels[c.label]] for c in strips],
                                    fill=True, width=line)
    if boxes:
        image = draw_bounding_boxes(image, _pixels(boxes, factor, height), colors=[palette[labels[c.label]] for c in boxes],
                                    width=line)
    per_class = defaultdict(int)
    for crop in crops:
        per_class[crop.label] += 1
    title = f"{path.name}: {width}x{height} (width x height), {len(crops)} row(s)"
    if factor != 1:
        title += f", shown at {factor:.3g}x"
    entries = [(palette[labels[name]], f"{name} ({per_class[name]})") for name in sorted(per_class, key=labels.get)]
    return with_legend(Image.fromarray(image.permute(1, 2, 0).numpy()), title, entries)


def _pixels(crops: list[Crop], factor: float, height: int) -> torch.Tensor:
    """Half-open regions [x0, x1) x [y0, y1) as the inclusive corner pixels draw_bounding_boxes expects,
    in the scaled picture's pixels."""
    regions = torch.tensor([[c.x0, c.y0, c.x1, height if c.y1 is None else c.y1] for c in crops],
                           dtype=torch.float64) * factor
    regions[:, 2:] = torch.maximum(regions[:, 2:] - 1, regions[:, :2])
    return regions


def class_grid(bundle: DataBundle, splits: dict[str, Dataset], per_class: int) -> np.ndarray:
    """uint8 (H, W, 3): one row per class of up to per_class items, spread evenly over its items (training
    split first), labelled with the class name and its number of items."""
    members: dict[int, list[tuple[Dataset, int]]] = defaultdict(list)
    for split in splits.values():
        for index, label in enumerate(labels_of(split).tolist()):
            members[label].append((split, index))
    channels, height, width = bundle.input_shape
    zoom = max(1, -(-TILE // max(height, width)))  # whole factor: the model's pixels stay visible as squares
    blank = torch.full((3, height * zoom, width * zoom), 255, dtype=torch.uint8)
    columns = min(per_class, max(len(items) for items in members.values()))
    tiles = []
    for label in range(len(bundle.classes)):
        items = members[label]
        picks = [items[round(i * (len(items) - 1) / max(columns - 1, 1))] for i in range(min(columns, len(items)))]
        for split, index in picks:
            image, _ = split[index]
            image = image.expand(3, -1, -1) if channels == 1 else image
            tiles.append(image.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2))
        tiles += [blank] * (columns - len(picks))
    grid = make_grid(tiles, nrow=columns, padding=2, pad_value=255)
    text_font = font()
    names = [f"{name} ({len(members[i])})" for i, name in enumerate(bundle.classes)]
    left = 12 + max(int(text_font.getlength(text)) for text in names)
    caption = f"{channels}x{height}x{width} items as the model receives them (before normalisation), shown at {zoom}x"
    canvas = Image.new("RGB", (max(left + grid.shape[2], 16 + int(text_font.getlength(caption))), grid.shape[1] + LINE + 4),
                       "white")
    canvas.paste(Image.fromarray(grid.permute(1, 2, 0).numpy()), (left, LINE + 4))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 4), caption, fill="black", font=text_font)
    row = height * zoom + 2
    for i, text in enumerate(names):
        draw.text((8, LINE + 4 + 2 + i * row + row // 2), text, fill="black", font=text_font, anchor="lm")
    return np.asarray(canvas)
