"""Real photographs, offline: crop CSVs cut from the photos scikit-image ships, for measuring what a
validation split reports against accuracy on parts of the photos the model never saw.

    python -m benchmarks.real_photos OUT_DIR [--seed 0] [--boxes-per-half 200] [--colour]

Why these photos: a random row split over crops of a few large images is the case that leaks (neighbouring,
overlapping boxes of one photo land on both sides), and generated textures do not show it as real photos
do. scikit-image's wheel bundles ten distinct photographs under `skimage/data/` (eight colour, two grey),
so no network beyond pip is needed: the wheel is fetched once with `pip download scikit-image==0.26.0
--no-deps` into a cache folder and the images are read from the zip (or from an installed scikit-image of
any version, which holds the same files).

Ten classes, one photo per class (the class is the photo's name). Boxes are random squares with sides in
`box_range` pixels, wholly inside their region. Two CSVs over the same photos:
- `held_out.csv`: `boxes_per_half` training boxes from each photo's left half and as many validation
  boxes from its right half (a `split` column), so no validation pixel was ever trained on;
- `whole.csv`: `whole_boxes` boxes per photo (default `2 * boxes_per_half`) over the whole photo and no
  `split` column, the user's default case, where the trainer chooses the split.
`grey=True` (default) stores the photos as grey PNGs, so a class cannot be told by colour alone.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from datasets.crop_csv import write_crops
from errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SKIMAGE_VERSION = "0.26.0"
DEFAULT_WHEEL_CACHE = ROOT / ".cache" / "skimage-wheel"
# file in skimage/data/ -> class name; the ten distinct photographs (motorcycle_right is the same scene as
# motorcycle_left, and color.png / chessboard / phantom are drawn, not photographed)
PHOTOS = {
    "astronaut.png": "astronaut", "chelsea.png": "chelsea", "coffee.png": "coffee", "rocket.jpg": "rocket",
    "motorcycle_left.png": "motorcycle", "hubble_deep_field.jpg": "hubble", "ihc.png": "ihc",
    "retina.jpg": "retina", "camera.png": "camera", "coins.png": "coins",
}

# Three grey 512 x 512 photographs of textures the same wheel ships (benchmarks/predict_speed.py's mosaic).
TEXTURES = ("brick.png", "grass.png", "gravel.png")


@dataclass(frozen=True)
class PhotoCrops:
    """What `make_photo_crops` wrote: the photo folder (the CSVs' root) and the two CSVs."""
    root: Path
    held_out_csv: Path
    whole_csv: Path
    classes: tuple[str, ...]


def _photo_bytes_from_installed(names=PHOTOS) -> dict[str, bytes] | None:
    """The photos from an installed scikit-image, or None when it is not installed (never imported: only its
    data folder is read)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not all((data / name).is_file() for name in names):
        return None
    return {name: (data / name).read_bytes() for name in names}


def _photo_bytes_from_wheel(wheel_cache: Path, names=PHOTOS) -> dict[str, bytes]:
    """The photos read from scikit-image's wheel, downloaded with pip into `wheel_cache` on first use."""
    wheels = sorted(wheel_cache.glob(f"scikit_image-{SKIMAGE_VERSION}-*.whl"))
    if not wheels:
        wheel_cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", f"scikit-image=={SKIMAGE_VERSION}", "--no-deps",
             "--only-binary=:all:", "-d", str(wheel_cache)], capture_output=True, text=True)
        wheels = sorted(wheel_cache.glob(f"scikit_image-{SKIMAGE_VERSION}-*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(
                f"real photos: could not fetch scikit-image {SKIMAGE_VERSION}'s wheel with pip ({last}); "
                f"install scikit-image, or put its wheel (scikit_image-{SKIMAGE_VERSION}-*.whl) in {wheel_cache}")
    try:
        with zipfile.ZipFile(wheels[-1]) as wheel:
            return {name: wheel.read(f"skimage/data/{name}") for name in names}
    except (zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"real photos: {wheels[-1]} is not a scikit-image wheel with its photos ({e}); "
                        "delete it and run again to download it afresh") from None


def photo_bytes(wheel_cache: str | Path = DEFAULT_WHEEL_CACHE, names=PHOTOS) -> dict[str, bytes]:
    """The encoded bytes of the files `names` of skimage/data/ (default: the ten photos) by file name: from an
    installed scikit-image, else from its wheel."""
    return _photo_bytes_from_installed(names) or _photo_bytes_from_wheel(Path(wheel_cache), names)


def _boxes(rng: np.random.Generator, count: int, x_lo: int, x_hi: int, height: int,
           box_range: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """`count` random squares with sides in `box_range` (inclusive) inside columns [x_lo, x_hi), all rows."""
    largest = min(box_range[1], x_hi - x_lo, height)
    if largest < box_range[0]:
        raise ValueError(f"a region of {x_hi - x_lo}x{height} px holds no box of {box_range[0]} px")
    boxes = []
    for side in rng.integers(box_range[0], largest + 1, size=count):
        x0 = int(rng.integers(x_lo, x_hi - side + 1))
        y0 = int(rng.integers(0, height - side + 1))
        boxes.append((x0, y0, x0 + int(side), y0 + int(side)))
    return boxes


def make_photo_crops(out_dir: str | Path, seed: int = 0, boxes_per_half: int = 200, grey: bool = True,
                     box_range: tuple[int, int] = (16, 64), wheel_cache: str | Path = DEFAULT_WHEEL_CACHE,
                     whole_boxes: int | None = None) -> PhotoCrops:
    """Write the ten photos as PNGs into `out_dir` and the two crop CSVs over them (module docstring).

    Args:
        out_dir: folder for `<class>.png`, `held_out.csv` and `whole.csv` (created; the CSVs' root).
        seed: seeds every box; the same seed writes the same CSVs.
        boxes_per_half: boxes per photo half in `held_out.csv`; `whole.csv` has twice as many per photo.
        grey: store the photos as grey (luma) PNGs; False keeps colour (the two grey photos stay grey).
        box_range: smallest and largest box side in pixels, inclusive.
        wheel_cache: where scikit-image's wheel is downloaded to, once.
        whole_boxes: boxes per photo in `whole.csv`; None: 2 * boxes_per_half.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    held_out, whole = [], []
    encoded = photo_bytes(wheel_cache)
    for name, label in sorted(PHOTOS.items(), key=lambda item: item[1]):
        image = Image.open(io.BytesIO(encoded[name]))
        image = image.convert("L" if grey or image.mode == "L" else "RGB")
        path = f"{label}.png"
        image.save(out / path)
        width, height = image.size
        half = width // 2
        for x0, y0, x1, y1 in _boxes(rng, boxes_per_half, 0, half, height, box_range):
            held_out.append(dict(path=path, x0=x0, y0=y0, x1=x1, y1=y1, label=label, split="train"))
        for x0, y0, x1, y1 in _boxes(rng, boxes_per_half, half, width, height, box_range):
            held_out.append(dict(path=path, x0=x0, y0=y0, x1=x1, y1=y1, label=label, split="val"))
        for x0, y0, x1, y1 in _boxes(rng, whole_boxes or 2 * boxes_per_half, 0, width, height, box_range):
            whole.append(dict(path=path, x0=x0, y0=y0, x1=x1, y1=y1, label=label))
    return PhotoCrops(out, write_crops(out / "held_out.csv", held_out), write_crops(out / "whole.csv", whole),
                      tuple(sorted(PHOTOS.values())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--boxes-per-half", type=int, default=200)
    parser.add_argument("--colour", action="store_true", help="keep the photos' colour")
    parser.add_argument("--wheel-cache", type=Path, default=DEFAULT_WHEEL_CACHE,
                        help="where scikit-image's wheel is downloaded to, once")
    args = parser.parse_args()
    try:
        made = make_photo_crops(args.out_dir, args.seed, args.boxes_per_half, grey=not args.colour,
                                wheel_cache=args.wheel_cache)
    except UserError as e:
        sys.exit(str(e))
    print(f"{len(made.classes)} photos in {made.root}; held out: {made.held_out_csv}; whole: {made.whole_csv}")


if __name__ == "__main__":
    main()
