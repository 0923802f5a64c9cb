"""predict.py's work: a model trained on crops, slid over whole images, gives a class map per image.

Per input, in a folder of the run dir named after it:
  classmap.png       the most probable class of each window, one colour per class (commands/palette.py, the
                     colours preview.py draws boxes in), with a legend of the classes' shares;
  overlay.png        that map blended on the source, downscaled to at most OVERLAY_SIDE pixels a side;
  probabilities.npy  float16 (classes, rows, cols): the softmax probabilities of every window (averaged over
                     the test-time augmentation's views);
and one predictions.json in the run dir for all inputs: the grid geometry (window, stride, origin, rows,
cols in source pixels), each class's share of the windows, the time taken.

Windows come from commands/windows.py (placement, reading by region in a background thread, batches);
the model, its normalisation and precision from commands/evaluation.py, as evaluate.py scores.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from commands import tta, windows
from commands.evaluation import Classifier, load_classifier
from commands.palette import colours, scale_for, with_legend
from datasets import guards
from datasets.base import decode_problem, limit_image_pixels
from datasets.regions import open_regions
from datasets.tiff import TileCache, TiledTiff
from datasets.transforms import DECODE_ERRORS, to_channels
from datasets.values import Scale
from errors import UserError
from progress import progress_bar
from training import run_folder, untrusted
from training.build import require_keys, resolve_device
from training.logger import run_log
from training.schema import check_ranges

log = logging.getLogger(__name__)

OVERLAY_SIDE = 2048  # pixels: the longest side of overlay.png at most (larger sources are averaged down)
# pixels: classmap.png's longest side, and what small sources grow to in overlay.png by whole factors (a grid
# of more windows than this keeps one pixel per window)
DRAWN_SIDE = 1024
TRACK_HEIGHT = 48  # pixels: a strip-form run's class track is drawn this tall
SOURCE_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: what training converts to the model's channels


def open_input(path: Path, channels: int, scale: Scale | None):
    """The region reader of one input (datasets/regions.py: a tiled TIFF tile by tile, a .npy memory-mapped,
    other images decoded once, grey kept as one channel), or one line when it is missing, does not decode, or
    has a channel count training could not turn into the model's."""
    guards.require_file(path, "inputs")
    try:
        reader = open_regions(path, scale=scale, channels=channels, keep_grey=True)
    except DECODE_ERRORS as e:
        raise UserError(f"inputs: cannot read {path} as an image or .npy array ({decode_problem(e)})") from None
    if reader.channels not in SOURCE_CHANNELS:
        raise UserError(f"inputs: {path} has {reader.channels} channels, the model takes {channels} (grey, RGB and "
                        "RGBA sources are converted as training converts them): give a grey or colour image")
    return reader


def block_reader(reader) -> Callable[[int, int, int, int], np.ndarray]:
    """reader.read, keeping a tiled TIFF's decoded tiles: neighbouring blocks share the tiles along their edges,
    which are then decoded once (the most recent tiles are kept: a row of 256-pixel tiles across a
    20,000-pixel grey image is 5 MB)."""
    if isinstance(reader, TiledTiff):
        return partial(reader.read, tiles=TileCache(windows.BLOCK_BYTES // 2))
    return reader.read


def run_prediction(cfg: DictConfig) -> dict:
    """Map every input of cfg.inputs; returns what predictions.json holds."""
    check_ranges(cfg)
    require_keys(cfg)
    limit_image_pixels(cfg.max_image_pixels)
    if not cfg.inputs:
        raise UserError("inputs=[] names no file: give inputs=[image.png,...] (images or .npy arrays)")
    run_dir = Path(cfg.run_dir)
    run_folder.create(run_dir)
    with run_log(run_dir):
        device = resolve_device(cfg.device, "device")
        classifier = load_classifier(cfg.checkpoint, device)
        described = classifier.checkpoint
        window, stride, strip = windows.windows_for(described.get("box_size"), cfg.window, cfg.stride, cfg.checkpoint)
        tta.check(cfg.tta, dict(classifier.saved.get("augment") or {}), tuple(described["input_shape"]),
                  cfg.tta_force, scales=cfg.tta_scales)
        result = {"checkpoint": str(cfg.checkpoint), "classes": described["classes"], "tta": cfg.tta,
                  "tta_scales": list(cfg.tta_scales),
                  "strip": strip, "inputs": []}
        names: set[str] = set()
        for path in map(Path, cfg.inputs):
            folder = run_dir / _unique(path.name, names)
            result["inputs"].append(predict_file(classifier, path, folder, window, stride, cfg, device))
        run_folder.write_text(run_dir / "predictions.json",
                              json.dumps(untrusted.finite_or_none(result), indent=1, allow_nan=False))
        log.info("wrote %s", run_dir / "predictions.json")
        return result


def _unique(name: str, taken: set[str]) -> str:
    """The output folder for an input: its file name, numbered when two inputs share one."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    taken.add(candidate)
    return candidate


def _scale(described: dict) -> Scale | None:
    """How .npy values become 0..255: the run's [low, high], or None to map each file by its own range
    (per_file), as training mapped each source file."""
    value_range = described.get("value_range")
    return Scale(*value_range) if isinstance(value_range, (list, tuple)) else None


def predict_file(classifier: Classifier, path: Path, folder: Path, window: tuple, stride: tuple, cfg: DictConfig,
                 device: torch.device) -> dict:
    """One input: its probabilities over the window grid, and its three files in `folder`."""
    described = classifier.checkpoint
    channels = described["input_shape"][0]
    classes = described["classes"]
    reader = open_input(path, channels, _scale(described))
    g = windows.grid(reader.shape, window, stride, path)
    started = time.perf_counter()
    probabilities = grid_probabilities(classifier, reader, g, cfg.batch_size, cfg.tta, device, f"{path}",
                                       list(cfg.tta_scales))
    seconds = time.perf_counter() - started
    classmap = probabilities.argmax(0)
    counts = np.bincount(classmap.reshape(-1), minlength=len(classes))
    fractions = {name: float(n / len(g)) for name, n in zip(classes, counts)}
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "probabilities.npy", probabilities.astype(np.float16))
    title = f"{path.name}: {g.cols}x{g.rows} windows of {g.window[1]}x{g.window[0]} px, stride {g.stride[1]}x{g.stride[0]}"
    legend = [(colour, f"{name} {fraction:.1%}") for colour, (name, fraction) in zip(colours(len(classes)),
                                                                                    fractions.items())]
    with_legend(draw_classmap(classmap, g, len(classes), strip=window[0] is None), title, legend).save(
        folder / "classmap.png")
    with_legend(draw_overlay(reader, classmap, g, len(classes)), title, legend).save(folder / "overlay.png")
    log.info("%s: %d windows in %.2f s (%.0f/s); %s; wrote %s", path, len(g), seconds, len(g) / max(seconds, 1e-9),
             ", ".join(f"{name} {f:.1%}" for name, f in fractions.items()), folder)
    return {"file": str(path), "folder": str(folder), "size": list(reader.shape), **g.as_dict(),
            "windows": len(g), "seconds": seconds, "fractions": fractions}


@torch.no_grad()
def grid_probabilities(classifier: Classifier, reader, g: windows.Grid, batch_size: int, mode: str,
                       device: torch.device, what: str, scales: Sequence[float] = (1.0,)) -> np.ndarray:
    """float32 (classes, rows, cols): each window's class probabilities, batches read in the background and
    kept on the device until the end (no wait for the device per batch)."""
    channels = classifier.checkpoint["input_shape"][0]
    n_classes = len(classifier.checkpoint["classes"])
    out = torch.empty((n_classes, len(g)), dtype=torch.float32, device=device)
    pin = device.type == "cuda"
    batches = windows.batches(reader, g, tuple(classifier.checkpoint["input_shape"]), batch_size, block_reader(reader))
    with progress_bar(total=len(g), desc=Path(what).name, unit="window") as bar:
        for index, images in windows.in_background(batches):
            images = (images.pin_memory() if pin else images).to(device, non_blocking=pin)
            images = images.expand(-1, channels, -1, -1)  # a grey source held once: repeated as a view
            index = torch.from_numpy(index).to(device, non_blocking=pin)
            out[:, index] = tta.probabilities(classifier.logits, images, mode, scales).T
            bar.update(len(index))
    result = out.cpu()
    # Once per input, not per batch: a check per batch would wait for the device every time.
    untrusted.check_outputs(result.T, n_classes, "checkpoint", f" for the windows of {what}")
    return result.view(n_classes, g.rows, g.cols).numpy()


def _palette(n: int) -> np.ndarray:
    return np.array(colours(n), dtype=np.uint8)


def draw_classmap(classmap: np.ndarray, g: windows.Grid, n_classes: int, strip: bool) -> Image.Image:
    """One colour per window, each window drawn as its stride (the part of the image it stands for), scaled to
    DRAWN_SIDE on the longest side (every window keeps at least one pixel); a class track (one grid row, a
    strip-form run) is TRACK_HEIGHT tall."""
    rgb = _palette(n_classes)[classmap]
    height, width = g.rows * g.stride[0], g.cols * g.stride[1]
    if strip:
        height = width  # the track's length sets the scale; its height is fixed below
    factor = scale_for(height, width, DRAWN_SIDE)
    size = (max(g.cols, round(width * factor)), TRACK_HEIGHT if strip else max(g.rows, round(height * factor)))
    return Image.fromarray(rgb).resize(size, Image.NEAREST)


def thumbnail(reader, factor: int) -> np.ndarray:
    """uint8 (h, w, 3): the source averaged over factor x factor pixels (the last row and column of blocks over
    the pixels they have), read band by band of at most BLOCK_BYTES / 4 (the band is held read and padded), so
    a large image is never held whole."""
    height, width = reader.shape
    band = max(1, windows.BLOCK_BYTES // max(1, 4 * width * reader.channels * factor)) * factor
    read = block_reader(reader)
    cols = -(-width // factor)
    per_col = np.minimum(factor, width - np.arange(cols) * factor)  # pixels per block, across
    parts = []
    for top in range(0, height, band):
        region = reader.to_uint8(read(top, min(top + band, height), 0, width))
        region = region if region.shape[2] in (1, 3) else to_channels(region, 3)  # RGBA: alpha dropped
        rows = -(-region.shape[0] // factor)
        padded = np.zeros((rows * factor, cols * factor, region.shape[2]), dtype=np.uint8)
        padded[:region.shape[0], :width] = region
        # Sums in uint32 (numpy casts as it reduces: no wide copy of the band), then means over real pixels.
        sums = padded.reshape(rows, factor, cols, factor, -1).sum(axis=(1, 3), dtype=np.uint32)
        per_row = np.minimum(factor, region.shape[0] - np.arange(rows) * factor)
        parts.append(np.rint(sums / np.multiply.outer(per_row, per_col)[:, :, None]).astype(np.uint8))
    image = np.concatenate(parts)
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def _cells(size: int, scale: float, origin: int, window: int, stride: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """For each thumbnail pixel along one axis: the grid index whose stride-wide centre part holds the pixel's
    centre (the first and last windows also claim their outer edges), and whether any window covers it."""
    centre = (np.arange(size) + 0.5) * scale
    index = np.clip(np.floor((centre - origin - (window - stride) / 2) / stride), 0, count - 1).astype(np.int64)
    covered = (centre >= origin) & (centre < origin + (count - 1) * stride + window)
    return index, covered


def draw_overlay(reader, classmap: np.ndarray, g: windows.Grid, n_classes: int) -> Image.Image:
    """The source at most OVERLAY_SIDE a side, in grey (a colourful source would hide the class colours), each
    pixel tinted with the class of the window centred nearest it, with black lines where the class changes;
    pixels no window covers (the thin margins the centred grid leaves) stay untinted."""
    shrink = max(1, math.ceil(max(reader.shape) / OVERLAY_SIDE))
    source = thumbnail(reader, shrink)
    grow = max(1, int(scale_for(*source.shape[:2], DRAWN_SIDE)))  # small sources: whole factors, sharp pixels
    source = source.repeat(grow, axis=0).repeat(grow, axis=1)
    rows, row_covered = _cells(source.shape[0], shrink / grow, g.origin[0], g.window[0], g.stride[0], g.rows)
    cols, col_covered = _cells(source.shape[1], shrink / grow, g.origin[1], g.window[1], g.stride[1], g.cols)
    # Small integer types throughout: at 2048 x 2048 a float32 RGB copy is 48 MB, and there would be several.
    classes = classmap.astype(np.int16)[rows[:, None], cols[None, :]]
    tint = _palette(n_classes)[classes]
    grey = to_channels(source, 1)  # luma, as training turns colour into grey
    # Half class colour, half source in grey (rounded): both stay readable.
    blended = ((grey.astype(np.uint16) + tint + 1) // 2).astype(np.uint8)
    covered = row_covered[:, None] & col_covered[None, :]
    blended[~covered] = source[~covered]
    edges = np.zeros(classes.shape, dtype=bool)  # a pixel whose right or lower neighbour is of another class
    edges[:, :-1] |= classes[:, 1:] != classes[:, :-1]
    edges[:-1, :] |= classes[1:, :] != classes[:-1, :]
    blended[edges & covered] = 0
    return Image.fromarray(blended)
