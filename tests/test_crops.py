"""Crop dataset: the pixels of every crop equal the slice of the file its CSV row names."""

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import crops
from datasets.crop_csv import write_crops
from errors import UserError
from tests import files


from tests.files import build_crops as build


def items(bundle) -> dict:
    """(label, pixels) of every item in both splits, keyed by the item's pixels' bytes for order-free compares."""
    out = []
    for split in (bundle.train, bundle.val):
        for i in range(len(split)):
            image, label = split[i]
            out.append((bundle.classes[label], image.clone()))
    return out


def all_crops(bundle) -> list[torch.Tensor]:
    """Every item of both splits in CSV order (splits hold sorted row indices; rows have distinct pixels)."""
    return [image for _, image in items(bundle)]


@pytest.fixture
def box_png(tmp_path):
    """An RGB PNG and box rows whose regions are already 16x16, so no resize touches the pixels."""
    rng = np.random.default_rng(1)
    scene = files.random_image(rng, 40, 50)
    files.write_png(tmp_path / "scene.png", scene)
    boxes = [(0, 0, 16, 16), (30, 20, 46, 36), (10, 5, 26, 21), (34, 24, 50, 40)]
    rows = [{"path": "scene.png", "x0": x0, "y0": y0, "x1": x1, "y1": y1, "label": f"c{i % 2}"}
            for i, (x0, y0, x1, y1) in enumerate(boxes)]
    return write_crops(tmp_path / "boxes.csv", rows), scene, boxes


@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
def test_box_crops_equal_the_image_slice(box_png, cache, tmp_path):
    csv, scene, boxes = box_png
    bundle = build(csv, cache=cache, cache_dir=str(tmp_path / "cache"))
    expected = {torch.from_numpy(scene[y0:y1, x0:x1]).permute(2, 0, 1).numpy().tobytes()
                for x0, y0, x1, y1 in boxes}
    got = {image.numpy().tobytes() for image in all_crops(bundle)}
    assert got == expected
    assert bundle.input_shape == (3, 16, 16)


@pytest.mark.parametrize("cache", ["none", "memory"])
def test_strip_crops_of_npy_equal_the_column_slice(tmp_path, cache):
    rng = np.random.default_rng(2)
    spectrogram = rng.integers(0, 256, size=(16, 100), dtype=np.uint8)  # (H, W) grey
    files.write_npy(tmp_path / "spec.npy", spectrogram)
    starts = [0, 20, 40, 84]
    rows = [{"path": "spec.npy", "start": s, "end": s + 16, "label": str(i % 2)} for i, s in enumerate(starts)]
    csv = write_crops(tmp_path / "strips.csv", rows, strip=True)
    bundle = build(csv, channels=1, cache=cache)
    expected = {spectrogram[:, s : s + 16][None].tobytes() for s in starts}
    assert {image.numpy().tobytes() for image in all_crops(bundle)} == expected
    assert bundle.classes == ["0", "1"]


def test_none_and_memory_give_identical_items_after_resize(tmp_path):
    rng = np.random.default_rng(3)
    files.write_png(tmp_path / "a.png", files.random_image(rng, 60, 60))
    files.write_npy(tmp_path / "b.npy", rng.random((60, 60, 3), dtype=np.float32))
    rows = [{"path": p, "x0": x, "y0": x // 2, "x1": x + 13 + x % 7, "y1": x // 2 + 21, "label": p[0]}
            for p in ("a.png", "b.npy") for x in range(0, 40, 5)]
    csv = write_crops(tmp_path / "mixed.csv", rows)
    lazy, held = build(csv, cache="none", width=24, height=12), build(csv, cache="memory", width=24, height=12)
    for a, b in zip(items(lazy), items(held)):
        assert a[0] == b[0]
        assert torch.equal(a[1], b[1])
        assert a[1].shape == (3, 12, 24)


@pytest.mark.parametrize(("cache", "channels"), [("memory", 1), ("memory", 3), ("disk", 3)])
def test_cached_crops_equal_cutting_each_crop_alone_for_boxes_of_shared_sizes(tmp_path, cache, channels):
    """cache=memory and disk resize a file's same-size boxes in one batch (grey ones as one channel, 4 to a
    call), and disk writes them by runs of rows: every pixel must equal the per-crop path cache=none takes,
    shrinking, enlarging or neither, with the files' rows interleaved in the CSV."""
    rng = np.random.default_rng(6)
    files.write_png(tmp_path / "grey.png", files.random_image(rng, 70, 90, channels=1))
    files.write_png(tmp_path / "rgb.png", files.random_image(rng, 70, 90))
    rows = []
    for path in ("grey.png", "rgb.png"):
        for h, w, count in ((12, 16, 4), (40, 33, 5), (7, 5, 3), (64, 80, 1), (12, 16, 2)):  # 12x16 = no resize
            for _ in range(count):
                y0, x0 = int(rng.integers(0, 71 - h)), int(rng.integers(0, 91 - w))
                rows.append({"path": path, "x0": x0, "y0": y0, "x1": x0 + w, "y1": y0 + h, "label": f"c{len(rows) % 2}"})
    csv = write_crops(tmp_path / "sizes.csv", [rows[i] for i in rng.permutation(len(rows))])
    lazy = build(csv, cache="none", channels=channels, width=16, height=12)
    held = build(csv, cache=cache, channels=channels, width=16, height=12, cache_dir=str(tmp_path / "cache"))
    for (label_a, a), (label_b, b) in zip(items(lazy), items(held), strict=True):
        assert label_a == label_b and a.shape == (channels, 12, 16)
        assert torch.equal(a, b)


def test_a_size_group_larger_than_one_call_gives_the_pixels_of_cutting_each_crop_alone(tmp_path):
    """A file's same-size boxes are resized at most crops.REGION_BYTES_PER_CALL of regions at a time, in calls
    of a multiple of 4 boxes (grey crops travel 4 to an image): groups longer than a call, ending in a call
    of another count, grey and RGB, give every pixel the per-crop path gives."""
    rng = np.random.default_rng(7)
    files.write_png(tmp_path / "grey.png", files.random_image(rng, 120, 130, channels=1))
    files.write_png(tmp_path / "rgb.png", files.random_image(rng, 120, 130))
    h = w = 96
    count = crops.REGION_BYTES_PER_CALL // (h * w) * 3 // 2 + 2  # one and a half grey calls (more RGB calls)
    rows = []
    for path in ("grey.png", "rgb.png"):
        for _ in range(count):
            y0, x0 = int(rng.integers(0, 121 - h)), int(rng.integers(0, 131 - w))
            rows.append({"path": path, "x0": x0, "y0": y0, "x1": x0 + w, "y1": y0 + h, "label": f"c{len(rows) % 2}"})
    csv = write_crops(tmp_path / "many.csv", rows)
    lazy, held = build(csv, cache="none", width=20, height=12), build(csv, cache="memory", width=20, height=12)
    for (label_a, a), (label_b, b) in zip(items(lazy), items(held), strict=True):
        assert label_a == label_b and torch.equal(a, b)


def test_crop_is_resized_to_width_by_height(box_png):
    csv, scene, boxes = box_png
    bundle = build(csv, width=48, height=24)
    image, _ = bundle.train[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 24, 48)
    # A flat region stays flat through the resize: resizing touches geometry, not values.
    flat = np.full((40, 50, 3), 77, dtype=np.uint8)
    files.write_png(csv.parent / "scene.png", flat)
    assert torch.all(build(csv, width=48, height=24).train[0][0] == 77)


def test_the_resize_is_torchvisions_to_the_byte():
    """Items are resized with torch's kernel directly (a run need not import torchvision): the bytes equal
    torchvision's resize, which users' other code and every earlier disk cache used, up and down, 1-4 channels."""
    from torchvision.transforms.v2 import functional as TF

    from datasets.transforms import to_tensor

    rng = np.random.default_rng(7)
    for h, w, c, height, width in [(40, 50, 3, 24, 48), (9, 13, 1, 32, 32), (64, 64, 4, 17, 5), (31, 7, 3, 31, 70),
                                   (200, 120, 1, 32, 32), (5, 5, 3, 5, 5)]:
        hwc = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        expected = TF.resize(torch.from_numpy(hwc).permute(2, 0, 1), [height, width], antialias=True)
        got = to_tensor(hwc, height, width)
        assert got.shape == (c, height, width) and torch.equal(got, expected), (h, w, c, height, width)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "1"])  # 16-bit: tests/test_values.py
def test_images_of_any_pil_mode_load_like_pil_converts_them(tmp_path, mode):
    rng = np.random.default_rng(4)
    path = files.write_png(tmp_path / "img.png", files.random_image(rng, 16, 16), mode=mode)
    csv = write_crops(tmp_path / "c.csv", [{"path": "img.png", "x0": 0, "y0": 0, "x1": 16, "y1": 16, "label": label}
                                           for label in "aabb"])
    for channels, pil_mode in ((3, "RGB"), (1, "L")):
        expected = np.asarray(Image.open(path).convert(pil_mode)).reshape(16, 16, channels)
        image, _ = build(csv, channels=channels).train[0]
        assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)


def test_channels_grey_repeats_to_rgb_and_rgb_becomes_luma(tmp_path):
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.stack([grey, grey // 2, 255 - grey], axis=2)
    files.write_npy(tmp_path / "grey.npy", grey)
    files.write_npy(tmp_path / "rgb.npy", rgb)
    rows = [{"path": p, "x0": 0, "y0": 0, "x1": 16, "y1": 16, "label": p} for p in ("grey.npy", "rgb.npy") * 2]
    csv = write_crops(tmp_path / "c.csv", rows)
    as_rgb = {label: img for label, img in items(build(csv, channels=3))}
    assert torch.equal(as_rgb["grey.npy"], torch.from_numpy(grey).expand(3, 16, 16))
    as_grey = {label: img for label, img in items(build(csv, channels=1))}
    luma = np.rint(rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).astype(np.uint8)
    assert torch.equal(as_grey["rgb.npy"][0], torch.from_numpy(luma))


def test_npy_values_scale_to_uint8_per_file(tmp_path):
    unit = np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16)
    decibels = np.linspace(-80, 0, 256, dtype=np.float64).reshape(16, 16)
    files.write_npy(tmp_path / "unit.npy", unit)
    files.write_npy(tmp_path / "db.npy", decibels)
    rows = [{"path": p, "start": 0, "end": 16, "label": p} for p in ("unit.npy", "db.npy") * 2]
    got = dict(items(build(write_crops(tmp_path / "s.csv", rows, strip=True), channels=1, value_range="per_file")))
    assert torch.equal(got["unit.npy"][0], torch.from_numpy(np.rint(unit * 255).astype(np.uint8)))
    assert got["db.npy"].min() == 0 and got["db.npy"].max() == 255  # min-max over the file


def test_split_column_is_respected_and_integer_labels_sort_numerically(tmp_path):
    rng = np.random.default_rng(5)
    files.write_png(tmp_path / "s.png", files.random_image(rng, 16, 160))
    rows = [{"path": "s.png", "x0": 16 * i, "y0": 0, "x1": 16 * i + 16, "y1": 16, "label": str([2, 10][i % 2]),
             "split": "val" if i in (3, 4) else "train"} for i in range(10)]
    bundle = build(write_crops(tmp_path / "c.csv", rows))
    assert bundle.classes == ["2", "10"]
    assert len(bundle.train) == 8 and len(bundle.val) == 2
    val_pixels = {bundle.val[i][0].numpy().tobytes() for i in range(2)}
    scene = np.asarray(Image.open(tmp_path / "s.png"))
    assert val_pixels == {scene[:, 48:64].transpose(2, 0, 1).tobytes(), scene[:, 64:80].transpose(2, 0, 1).tobytes()}


def test_seeded_split_is_stratified_and_repeatable(crop_csv):
    first, second, other = build(crop_csv), build(crop_csv), build(crop_csv, seed=1)
    assert torch.equal(first.train.indices, second.train.indices)
    assert not torch.equal(first.train.indices, other.train.indices)
    labels = [first.val[i][1] for i in range(len(first.val))]
    assert labels.count(0) == labels.count(1) == 16  # half of each class's 32 rows


def test_memory_cache_holds_one_uint8_array(crop_csv):
    bundle = build(crop_csv)
    assert bundle.train.store is bundle.val.store
    assert bundle.train.store.images.dtype == torch.uint8
    assert bundle.train.store.images.shape == (64, 3, 16, 16)


def test_missing_csv_and_missing_file_are_named(tmp_path):
    with pytest.raises(UserError, match="file not found: .*nothere.csv"):
        build(tmp_path / "nothere.csv")
    csv = write_crops(tmp_path / "c.csv", [{"path": "gone.png", "x0": 0, "y0": 0, "x1": 4, "y1": 4, "label": "a"}])
    with pytest.raises(UserError, match="line 2: .*gone.png.*file not found"):
        build(csv)


@pytest.mark.slow  # the whole demo, twice
def test_demo_is_generated_deterministically(tmp_path):
    from datasets import demo

    a, b = demo.generate(tmp_path / "a"), demo.generate(tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a" / "scene_00.png").read_bytes() == (tmp_path / "b" / "scene_00.png").read_bytes()
