"""datasets/regions.py and datasets/tiff.py on real files the tests write: every box read equals the same box cut
from the whole decoded array, a tiled TIFF decodes only the tiles a box touches, and bad files are one line."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from datasets import regions, tiff
from errors import UserError
from tests.files import random_image, write_npy, write_png, write_tiff

BOXES = [(0, 1, 0, 1), (3, 37, 5, 50), (16, 32, 16, 32), (15, 17, 15, 17), (0, 45, 0, 61), (40, 45, 60, 61)]


def smooth(height: int, width: int, channels: int = 1, dtype=np.uint8) -> np.ndarray:
    """A gradient with noise: every pixel differs from its neighbours, so a misplaced tile shows."""
    rng = np.random.default_rng(height * width + channels)
    top = np.iinfo(dtype).max
    values = rng.integers(0, top, size=(height, width, channels), dtype=dtype, endpoint=True)
    return values[:, :, 0] if channels == 1 else values


@pytest.mark.parametrize("channels, dtype, compression, tile", [
    (1, np.uint8, "zstd", (16, 16)),
    (3, np.uint8, "deflate", (16, 32)),
    (1, np.uint16, "lzw", (32, 16)),
    (4, np.uint8, None, (16, 16)),
    (1, np.uint8, "zstd", None),  # strips: still readable by window (a striped lower level takes this path)
])
def test_every_box_equals_the_whole_array_cut(tmp_path, channels, dtype, compression, tile):
    array = smooth(45, 61, channels, dtype)
    path = write_tiff(tmp_path / "a.tif", array, tile=tile, compression=compression)
    reader = tiff.TiledTiff(path)
    whole = tifffile.imread(path)
    assert reader.shape == (45, 61) and reader.channels == channels and reader.dtype == dtype
    for top, bottom, left, right in BOXES:
        box = reader.read(top, bottom, left, right)
        assert box.dtype == dtype and box.shape == (bottom - top, right - left, channels)
        np.testing.assert_array_equal(box.reshape(whole[top:bottom, left:right].shape), whole[top:bottom, left:right])


def test_separate_planes_read_as_pixels(tmp_path):
    array = smooth(40, 40, 3)
    path = write_tiff(tmp_path / "planar.tif", np.moveaxis(array, 2, 0), planarconfig="separate", photometric="rgb")
    np.testing.assert_array_equal(tiff.TiledTiff(path).read(5, 39, 7, 33), array[5:39, 7:33])


def test_a_box_decodes_only_the_tiles_it_touches(tmp_path):
    path = write_tiff(tmp_path / "a.tif", smooth(64, 64), tile=(16, 16))
    cache = tiff.TileCache(2**20)
    tiff.TiledTiff(path).read(20, 40, 30, 33, cache)  # rows 20..39 span tile rows 1-2; columns 30..32 tile 1-2
    assert set(cache.tiles) == {(0, 1, 1), (0, 1, 2), (0, 2, 1), (0, 2, 2)}


def test_the_tile_cache_keeps_its_budget(tmp_path):
    path = write_tiff(tmp_path / "a.tif", smooth(64, 64), tile=(16, 16))
    cache = tiff.TileCache(3 * 16 * 16)  # three grey tiles
    tiff.TiledTiff(path).read(0, 64, 0, 64, cache)
    assert cache.held <= 3 * 16 * 16 and len(cache.tiles) == 3


def test_pyramid_levels_from_subifds(tmp_path):
    level0, level1, level2 = smooth(64, 96), smooth(32, 48), smooth(16, 24)
    path = write_tiff(tmp_path / "pyramid.tif", level0, levels=[level1, level2])
    reader = regions.open_regions(path, level=2)
    assert reader.levels == [(64, 96), (32, 48), (16, 24)] and reader.shape == (16, 24)
    np.testing.assert_array_equal(reader.read(3, 16, 2, 21)[:, :, 0], level2[3:16, 2:21])
    np.testing.assert_array_equal(regions.open_regions(path, level=1).read(0, 32, 0, 48)[:, :, 0], level1)


def test_a_level_that_does_not_exist_is_one_line(tmp_path):
    path = write_tiff(tmp_path / "flat.tif", smooth(32, 32))
    with pytest.raises(UserError, match=r"flat.tif: no pyramid level 1: the file has 1 level\(s\), 0..0"):
        regions.open_regions(path, level=1)
    png = write_png(tmp_path / "a.png", random_image(np.random.default_rng(0), 8, 8))
    with pytest.raises(UserError, match="a.png: no pyramid level 2"):
        regions.open_regions(png, level=2)


def test_npy_and_png_read_through_the_same_interface(tmp_path):
    rng = np.random.default_rng(1)
    array = rng.random((30, 40), dtype=np.float32)
    reader = regions.open_regions(write_npy(tmp_path / "a.npy", array))
    assert (reader.levels, reader.channels, reader.dtype) == ([(30, 40)], 1, np.float32)
    assert isinstance(reader.array, np.memmap)  # nothing read until a box is used
    np.testing.assert_array_equal(reader.read(2, 9, 3, 30)[:, :, 0], array[2:9, 3:30])
    np.testing.assert_array_equal(reader.to_uint8(reader.read(0, 1, 0, 1)), np.rint(array[:1, :1, None] * 255))
    image = random_image(rng, 20, 24)
    png = regions.open_regions(write_png(tmp_path / "a.png", image))
    assert (png.shape, png.channels, png.dtype) == ((20, 24), 3, np.uint8)
    np.testing.assert_array_equal(png.to_uint8(png.read(4, 20, 0, 7)), image[4:20, :7])


def test_strip_tiffs_at_level_0_are_decoded_by_pil(tmp_path):
    path = write_tiff(tmp_path / "strips.tif", smooth(20, 30), tile=None, compression=None)
    reader = regions.open_regions(path)
    assert isinstance(reader, regions.ArrayRegions)  # today's whole-image path
    np.testing.assert_array_equal(reader.read(0, 20, 0, 30)[:, :, 0], np.asarray(Image.open(path)))


def test_sixteen_bit_maps_by_its_depth(tmp_path):
    array = np.array([[0, 257, 65535, 1000]], dtype=np.uint16)
    reader = regions.open_regions(write_tiff(tmp_path / "deep.tif", array, tile=(16, 16)))
    np.testing.assert_array_equal(reader.to_uint8(reader.read(0, 1, 0, 4))[:, :, 0], [[0, 1, 255, 4]])


def test_float_tiles_map_by_the_levels_own_range(tmp_path):
    array = np.linspace(-2.0, 6.0, 32 * 32, dtype=np.float32).reshape(32, 32)
    reader = regions.open_regions(write_tiff(tmp_path / "float.tif", array, tile=(16, 16)))
    box = reader.to_uint8(reader.read(0, 1, 0, 2))  # the range comes from every tile, not this box's
    np.testing.assert_array_equal(box[:, :, 0], np.rint((array[:1, :2] + 2.0) * 255 / 8.0))


def test_truncated_tiff_is_one_line(tmp_path):
    path = write_tiff(tmp_path / "cut.tif", smooth(64, 64), tile=(16, 16), compression=None)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated: \d+ of 16 tiles lie beyond the end of the file"):
        regions.open_regions(path)


def test_damaged_tile_is_one_line(tmp_path):
    path = write_tiff(tmp_path / "bad.tif", smooth(32, 32), tile=(16, 16), compression="zstd")
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[3], tif.pages[0].databytecounts[3]
    data = bytearray(path.read_bytes())
    data[offset:offset + count] = b"\x00" * count
    path.write_bytes(bytes(data))
    reader = regions.open_regions(path)
    reader.read(0, 16, 0, 16)  # tile 0 is intact
    with pytest.raises(ValueError, match="tile 3 cannot be decoded .*damaged or truncated"):
        reader.read(16, 32, 16, 32)


def test_unsupported_compression_is_one_line(tmp_path):
    path = write_tiff(tmp_path / "odd.tif", smooth(32, 32), tile=(16, 16), compression=None)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["Compression"].overwrite(34999)  # a compression code no codec knows
    with pytest.raises(UserError, match="odd.tif: TIFF compression .*34999.* cannot be decoded .* save it with zstd"):
        regions.open_regions(path)


def test_an_edited_file_is_opened_again(tmp_path):
    path = write_tiff(tmp_path / "a.tif", smooth(32, 32))
    first = regions.open_regions(path)
    assert regions.open_regions(path) is first  # one header parse per process
    write_tiff(path, smooth(48, 40))
    assert regions.open_regions(path).shape == (48, 40)
