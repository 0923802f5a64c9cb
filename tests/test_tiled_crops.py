"""Crops cut from tiled and pyramidal TIFFs: the same bytes as the same boxes cut from the whole decoded image
(the pixels saved as PNG or .npy) in every cache mode; dataset.level; the pixel limit on what is decoded at
once; preview drawing a slide without decoding its full resolution; bad files as one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from commands.preview import draw_file
from datasets import crops
from datasets.base import limit_image_pixels
from datasets.crop_csv import read_crops, write_crops
from datasets.regions import FileSource
from errors import UserError
from tests.files import write_npy, write_png, write_tiff
from tests.helpers import in_child

SIDE = 96  # the test image's height; width 80
BOXES = [(0, 0, 16, 16), (5, 7, 37, 29), (60, 70, 80, 96), (31, 15, 33, 17), (0, 40, 80, 56), (17, 33, 65, 81)]
MODES = ("none", "memory", "disk")


def pixels(channels: int = 1, dtype=np.uint8, height: int = SIDE, width: int = 80) -> np.ndarray:
    rng = np.random.default_rng(channels)
    shape = (height, width) if channels == 1 else (height, width, channels)
    return rng.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)


def crop_csv(folder: Path, name: str, boxes=BOXES) -> Path:
    rows = [{"path": name, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "label": "ab"[i % 2],
             "split": "val" if i % 3 == 0 else "train"} for i, (x0, y0, x1, y1) in enumerate(boxes)]
    return write_crops(folder / f"{name}.csv", rows)


def build(csv: Path, cache: str, channels: int = 1, **keys):
    return crops.build(str(csv), None, width=12, height=10, channels=channels, cache=cache,
                       cache_dir=str(csv.parent / "cache"), val_fraction=0.2, mean=[0.5], std=[0.5], seed=0, **keys)


def items(bundle) -> torch.Tensor:
    return torch.stack([bundle.train[i][0] for i in range(len(bundle.train))]
                       + [bundle.val[i][0] for i in range(len(bundle.val))])


@pytest.mark.parametrize("channels, dtype, stored_as, model_channels", [
    (1, np.uint8, "png", 1),
    (1, np.uint8, "png", 3),   # grey seen as RGB: stored once, repeated
    (3, np.uint8, "png", 3),
    (1, np.uint16, "png", 1),  # 16-bit: 255/65535 as a 16-bit PNG
    (3, np.uint8, "npy", 1),   # RGB to grey by the .npy luma (PIL's own L conversion rounds differently)
])
def test_every_cache_mode_cuts_what_the_whole_image_gives(tmp_path, channels, dtype, stored_as, model_channels):
    array = pixels(channels, dtype)
    write_tiff(tmp_path / "slide.tif", array, tile=(16, 32))
    (write_png if stored_as == "png" else write_npy)(tmp_path / f"whole.{stored_as}", array)
    expected = items(build(crop_csv(tmp_path, f"whole.{stored_as}"), "memory", model_channels))
    for cache in (*MODES, "disk"):  # disk twice: written, then mapped
        got = items(build(crop_csv(tmp_path, "slide.tif"), cache, model_channels))
        assert got.shape == (len(BOXES), model_channels, 10, 12) and torch.equal(got, expected), cache


@pytest.mark.parametrize("channels", [1, 3])
def test_boxes_of_one_size_resized_together_match_one_by_one(tmp_path, channels):
    # cache=memory resizes a slide's boxes a size at a time (1 to 3 boxes plain, 4 and more packed); cache=none
    # resizes each alone: the same bytes for every group size, and the same as the whole image's crops.
    array = pixels(channels)
    write_tiff(tmp_path / "slide.tif", array, tile=(16, 16))
    write_png(tmp_path / "whole.png", array)
    boxes = [(x, y, x + 14, y + 11) for x, y in [(0, 0), (3, 50), (40, 2), (61, 80), (22, 37), (9, 9)]]
    boxes += [(x, 5, x + 20, 25) for x in (0, 30)] + [(4, 60, 17, 95)] + BOXES  # groups of 6, 2, 1
    expected = items(build(crop_csv(tmp_path, "whole.png", boxes), "memory", 3))
    for cache in MODES:
        assert torch.equal(items(build(crop_csv(tmp_path, "slide.tif", boxes), cache, 3)), expected), cache


def test_a_grey_slide_is_stored_once_for_an_rgb_model(tmp_path):
    write_tiff(tmp_path / "slide.tif", pixels(), tile=(16, 16))
    bundle = build(crop_csv(tmp_path, "slide.tif"), "memory", channels=3)
    assert tuple(bundle.train.store.images.shape[1:]) == (1, 10, 12) and bundle.train[0][0].shape == (3, 10, 12)


def test_a_crop_decodes_only_the_tiles_it_touches(tmp_path):
    path = write_tiff(tmp_path / "slide.tif", pixels(), tile=(16, 16))
    source = FileSource(path, 1)  # what a cache=none item opens
    crop = read_crops(crop_csv(tmp_path, "slide.tif", [(20, 40, 36, 47)])).crops[0]
    crops.cut(source, crop, 10, 12)
    assert sorted(source.tiles.tiles) == [(0, 2, 1), (0, 2, 2)]  # rows 40..46: tile row 2; columns 20..35: 1-2


def test_level_cuts_level_0_boxes_from_the_smaller_level(tmp_path):
    level0, level1 = pixels(height=96, width=80), pixels(3, height=48, width=40)[:, :, 0]
    write_tiff(tmp_path / "pyramid.tif", level0, tile=(16, 16), levels=[level1])
    write_png(tmp_path / "level1.png", level1)
    # Level-0 boxes, and the level-1 boxes they become: halved, rounded outward (x 5..37 -> 2..19).
    boxes = [(5, 7, 37, 29), (0, 0, 80, 96), (31, 15, 33, 17), (60, 70, 80, 96)]
    halved = [(2, 3, 19, 15), (0, 0, 40, 48), (15, 7, 17, 9), (30, 35, 40, 48)]
    expected = items(build(crop_csv(tmp_path, "level1.png", halved), "memory"))
    for cache in MODES:
        got = items(build(crop_csv(tmp_path, "pyramid.tif", boxes), cache, level=1))
        assert torch.equal(got, expected), cache


def write_reduced_pages(path: Path, levels: list[np.ndarray], tile: int = 16) -> Path:
    """A pyramid as some slide and GIS writers store it: every level its own top-level page (NewSubfileType 1,
    reduced, for all but level 0; no SubIFDs and no tifffile metadata), written tile by tile, with a thumbnail
    page after level 0 (not reduced, as SVS files have one) and the smallest level in strips."""
    import tifffile

    def tiles(array):
        for top in range(0, array.shape[0], tile):
            for left in range(0, array.shape[1], tile):
                part = np.zeros((tile, tile), dtype=array.dtype)
                block = array[top:top + tile, left:left + tile]
                part[:block.shape[0], :block.shape[1]] = block
                yield part

    common = {"compression": "zstd", "photometric": "minisblack", "metadata": None}
    with tifffile.TiffWriter(path) as tif:
        for index, level in enumerate(levels):
            reduced = {"subfiletype": 1} if index else {}
            if index == len(levels) - 1 and index:
                tif.write(level, rowsperstrip=4, **reduced, **common)
            else:
                tif.write(tiles(level), shape=level.shape, dtype=level.dtype, tile=(tile, tile), **reduced, **common)
            if index == 0:
                tif.write(level[::8, ::8], **common)  # the thumbnail: a series of its own, not a level
    return path


@pytest.mark.parametrize("level", [1, 2])
def test_levels_stored_as_reduced_pages_are_read_as_levels(tmp_path, level):
    level0 = pixels(height=96, width=80)
    levels = [level0, pixels(3, height=48, width=40)[:, :, 0], pixels(3, height=24, width=20)[:, :, 1]]
    path = write_reduced_pages(tmp_path / "pages.tif", levels)
    assert FileSource(path, 1, level=level).reader.levels == [(96, 80), (48, 40), (24, 20)]
    write_png(tmp_path / "level.png", levels[level])
    boxes = [(5, 7, 37, 29), (0, 0, 80, 96), (31, 15, 33, 17), (60, 70, 80, 96)]
    factor = 2 ** level  # level-0 boxes on the smaller level, rounded outward
    scaled = [(x0 // factor, y0 // factor, -(-x1 // factor), -(-y1 // factor)) for x0, y0, x1, y1 in boxes]
    expected = items(build(crop_csv(tmp_path, "level.png", scaled), "memory"))
    for cache in MODES:
        assert torch.equal(items(build(crop_csv(tmp_path, "pages.tif", boxes), cache, level=level)), expected), cache
    with pytest.raises(UserError, match=r"no pyramid level 3: the file has 3 level\(s\), 0..2"):
        build(crop_csv(tmp_path, "pages.tif", boxes), "memory", level=3)


def test_a_level_a_file_lacks_is_a_bad_row(tmp_path):
    write_tiff(tmp_path / "flat.tif", pixels(), tile=(16, 16))
    with pytest.raises(UserError, match=r"line 2: .*flat.tif: unreadable \(.*flat.tif: no pyramid level 2: the file "
                                        r"has 1 level\(s\), 0..0; set dataset.level within them\)"):
        build(crop_csv(tmp_path, "flat.tif"), "memory", level=2)


def test_strip_tiffs_keep_the_whole_image_path(tmp_path):
    write_tiff(tmp_path / "strips.tif", pixels(), tile=None, compression=None)
    assert FileSource(tmp_path / "strips.tif", 1).windowed is False
    write_png(tmp_path / "whole.png", pixels())
    assert torch.equal(items(build(crop_csv(tmp_path, "strips.tif"), "memory")),
                       items(build(crop_csv(tmp_path, "whole.png"), "memory")))


def test_the_pixel_limit_holds_what_is_decoded_at_once_not_the_header(tmp_path):
    write_tiff(tmp_path / "slide.tif", pixels(), tile=(16, 16))  # 7,680 pixels
    csv = crop_csv(tmp_path, "slide.tif")

    def body():
        limit_image_pixels(2500)  # PIL's limit is process-wide: changed in a child only
        assert len(items(build(csv, "memory"))) == len(BOXES)  # every box has at most 2,304 pixels
        big = crop_csv(tmp_path, "slide.tif", [*BOXES, (0, 0, 80, 96)])
        with pytest.raises(UserError, match=r"region x 0..80, y 0..96 has more than max_image_pixels=2500 pixels"):
            build(big, "memory")

    in_child(body)


def test_a_truncated_slide_is_one_line_before_training(tmp_path):
    path = write_tiff(tmp_path / "slide.tif", pixels(), tile=(16, 16), compression=None)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(UserError, match=r"slide.tif: unreadable \(truncated: \d+ of 30 tiles lie beyond the end"):
        build(crop_csv(tmp_path, "slide.tif"), "none")


def test_a_damaged_tile_is_one_line_in_every_cache_mode(tmp_path):
    import tifffile

    path = write_tiff(tmp_path / "slide.tif", pixels(), tile=(16, 16))
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = b"\x00" * count
    path.write_bytes(bytes(data))
    csv = crop_csv(tmp_path, "slide.tif")
    for cache in ("memory", "disk"):
        with pytest.raises(UserError, match=r"1 file\(s\) cannot be decoded.*\n  .*slide.tif: tile 0 cannot be "):
            build(csv, cache)
    lazy = build(csv, "none")
    with pytest.raises(UserError, match=r"crop \d+ \(CSV line \d+\): cannot read .*slide.tif: tile 0 cannot be "):
        items(lazy)


def test_preview_draws_a_slide_from_a_low_level_within_the_pixel_limit(tmp_path):
    level0 = np.kron(pixels(height=48, width=40), np.ones((4, 4), np.uint8))  # 192 x 160, blocks of 4 x 4
    write_tiff(tmp_path / "pyramid.tif", level0, tile=(16, 16), levels=[level0[::2, ::2], level0[::4, ::4]])
    crop = read_crops(crop_csv(tmp_path, "pyramid.tif")).crops[0]

    def body():
        limit_image_pixels(20_000)  # level 0 (30,720 pixels) cannot be read whole; level 2 (1,920) can
        picture = np.asarray(draw_file(tmp_path / "pyramid.tif", [crop], {"a": 0}, [(255, 0, 0)], max_side=48))
        shown = picture[5:10, 6:10, 0]  # inside the picture, away from the box's outline
        assert np.array_equal(shown, level0[::4, ::4][5:10, 6:10])

    in_child(body)


def test_preview_draws_reduced_pages_from_a_low_level(tmp_path):
    level0 = pixels(height=192, width=160)
    level2 = 255 - level0[::4, ::4]  # unlike level 0 at a stride: the picture shows which was read
    path = write_reduced_pages(tmp_path / "pages.tif", [level0, level0[::2, ::2], level2])
    crop = read_crops(crop_csv(tmp_path, "pages.tif")).crops[0]

    def body():
        limit_image_pixels(20_000)  # level 0 (30,720 pixels) cannot be read whole; level 2 (1,920) can
        picture = np.asarray(draw_file(path, [crop], {"a": 0}, [(255, 0, 0)], max_side=48))
        assert np.array_equal(picture[5:10, 6:10, 0], level2[5:10, 6:10])  # inside, away from the box's outline

    in_child(body)


def test_preview_of_a_flat_slide_reads_it_at_a_stride(tmp_path):
    level0 = np.kron(pixels(height=24, width=20), np.ones((4, 4), np.uint8))
    write_tiff(tmp_path / "flat.tif", level0, tile=(16, 16))
    source = FileSource(tmp_path / "flat.tif", 1)

    def body():
        limit_image_pixels(1000)  # a band of 16 rows x 48 columns at a time
        np.testing.assert_array_equal(source.overview(24)[0].numpy(), level0[::4, ::4])

    in_child(body)
    assert Image.open(write_png(tmp_path / "x.png", level0)).size == (80, 96)
