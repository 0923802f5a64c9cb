"""augment=...: seeded augmentation of whole uint8 training batches on the device, the same in both loader modes,
for any number of workers, and when an epoch resumes mid-way."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import training
from datasets.base import ArrayStore, InMemoryDataset
from errors import UserError
from training.augment import Augment, batch_generator
from training.loaders import build_loader
from tests.helpers import events

N = 24
LOADER = dict(device=torch.device("cpu"), batch_size=8, shuffle=True, pin_memory=False, persistent_workers=False,
              prefetch_factor=2)


def distinct_images(n: int, channels: int = 2, size: int = 6) -> torch.Tensor:
    """Every pixel of every item different, so each output pixel names the one input pixel it came from."""
    image = torch.randperm(256)[: channels * size * size].to(torch.uint8).view(1, channels, size, size)
    return image.repeat(n, 1, 1, 1)


def dihedral(image: torch.Tensor) -> list[torch.Tensor]:
    """The 8 orientations of a square (C, H, W) image."""
    turns = [torch.rot90(image, k, dims=(1, 2)) for k in range(4)]
    return turns + [turn.flip(-1) for turn in turns]


def crops(image: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every H x W window of the image reflect-padded by `pad`, with torch's own padding as the reference."""
    _, height, width = image.shape
    padded = torch.nn.functional.pad(image.float().unsqueeze(0), (pad,) * 4, mode="reflect")[0].to(torch.uint8)
    return [padded[:, y : y + height, x : x + width] for y in range(2 * pad + 1) for x in range(2 * pad + 1)]


def matches(item: torch.Tensor, candidates: list[torch.Tensor]) -> list[int]:
    return [i for i, candidate in enumerate(candidates) if torch.equal(item, candidate)]


def test_hflip_mirrors_about_half_the_items_and_nothing_else():
    images = distinct_images(64)
    out = Augment(hflip=True)(images, batch_generator(0, 0, 0, 0))
    mirrored = [bool(matches(o, [i.flip(-1)])) for o, i in zip(out, images)]
    assert all(mirrored[k] or torch.equal(out[k], images[k]) for k in range(64))
    assert 16 < sum(mirrored) < 48


def test_dihedral_gives_every_orientation_of_each_item():
    images = distinct_images(128)
    out = Augment(hflip=True, vflip=True, transpose=True)(images, batch_generator(0, 0, 0, 0))
    seen = set()
    for o, i in zip(out, images):
        (which,) = matches(o, dihedral(i))  # exactly one orientation, never a mixed-up image
        seen.add(which)
    assert seen == set(range(8))


def test_pad_crop_is_a_window_of_the_reflect_padded_image_at_every_offset():
    images = distinct_images(200)
    out = Augment(pad=2)(images, batch_generator(3, 1, 0, 5))
    offsets = [matches(o, crops(i, 2)) for o, i in zip(out, images)]
    assert all(len(found) == 1 for found in offsets)
    assert {found[0] for found in offsets} == set(range(25))


def test_standard_combines_crop_and_flip():
    images = distinct_images(64)
    out = Augment(pad=1, hflip=True)(images, batch_generator(0, 0, 0, 0))
    for o, i in zip(out, images):
        assert len(matches(o, crops(i, 1) + crops(i.flip(-1), 1))) == 1


def test_cutout_erases_one_square_to_the_fill_and_keeps_the_rest():
    images = torch.full((64, 3, 12, 12), 200, dtype=torch.uint8)
    out = Augment(cutout=4, fill=(10, 20, 30))(images, batch_generator(0, 0, 0, 0))
    erased = out != 200
    assert torch.equal(erased[:, 0], erased[:, 2])  # the same square in every channel...
    fill = torch.tensor([10, 20, 30], dtype=torch.uint8).view(1, 3, 1, 1).expand_as(out)
    assert torch.equal(out[erased], fill[erased])
    rows, cols = erased[:, 0].any(2), erased[:, 0].any(1)
    area = erased[:, 0].sum((1, 2))
    assert torch.equal(area, rows.sum(1) * cols.sum(1))  # ...a rectangle: the square, clipped at the border
    assert (area <= 16).all() and (area == 16).any() and (area < 16).any() and (area > 0).all()


def coordinates(n: int, size: int) -> torch.Tensor:
    """Items whose channel 0 is each pixel's row and channel 1 its column."""
    grid = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")).to(torch.uint8)
    return grid.unsqueeze(0).repeat(n, 1, 1, 1)


def test_scale_zooms_each_item_about_its_centre_in_and_out_within_the_factor():
    size, n = 32, 256
    out = Augment(scale=2.0)(coordinates(n, size), batch_generator(0, 0, 0, 0)).long()
    rows, cols = out[:, 0], out[:, 1]
    assert torch.equal(rows, rows[:, :, :1].expand_as(rows)) and torch.equal(cols, cols[:, :1].expand_as(cols))
    row_map, col_map = rows[:, :, 0], cols[:, 0, :]
    assert torch.equal(row_map, col_map)  # one factor for both axes: the aspect is kept
    centre = torch.arange(size // 4, 3 * size // 4)  # no border reflection here for zooms of 1/2..2
    span = (row_map[:, centre[-1]] - row_map[:, centre[0]]).float() / (len(centre) - 1)  # source px per output px
    assert (span >= 0.5 - 0.07).all() and (span <= 2 + 0.07).all()
    assert (span < 0.8).sum() > n // 8 and (span > 1.25).sum() > n // 8  # zoomed in and out, both often
    assert ((row_map[:, size // 2] - size // 2).abs() <= 1).all()  # about the centre
    assert (row_map[:, centre].diff(dim=1) >= 0).all()  # nearest pixels in order: no flip without hflip/vflip
    assert out.min() >= 0 and out.max() <= size - 1


def test_scale_one_draws_and_gives_exactly_what_runs_without_it_did():
    images = distinct_images(32)
    for keys in (dict(pad=2, hflip=True), dict(pad=1, hflip=True, vflip=True, transpose=True, cutout=2)):
        plain = Augment(**keys)(images, batch_generator(0, 0, 0, 0))
        assert torch.equal(Augment(**keys, scale=1.0)(images, batch_generator(0, 0, 0, 0)), plain)
        zoomed = Augment(**keys, scale=1.5)(images, batch_generator(0, 0, 0, 0))
        assert not torch.equal(zoomed, plain) and zoomed.shape == plain.shape


def test_scale_with_the_largest_pad_stays_inside_the_image():
    out = Augment(pad=7, scale=2.0, hflip=True)(coordinates(64, 8), batch_generator(1, 0, 0, 0))
    assert out.min() >= 0 and out.max() <= 7


def test_decisions_repeat_for_their_coordinates_and_differ_across_seeds_epochs_ranks_and_batches():
    images = distinct_images(32)
    augment = Augment(pad=2, hflip=True, vflip=True, transpose=True, cutout=2)
    first = augment(images, batch_generator(0, 0, 0, 0))
    assert torch.equal(augment(images, batch_generator(0, 0, 0, 0)), first)
    for other in [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)]:
        assert not torch.equal(augment(images, batch_generator(*other)), first), other


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_get_the_same_augmentation_as_cpu_batches():
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    augment = Augment(pad=4, hflip=True, vflip=True, transpose=True, cutout=6, fill=(1, 2, 3))
    on_cuda = augment(images.cuda(), batch_generator(0, 1, 0, 2))
    assert on_cuda.device.type == "cuda"
    assert torch.equal(on_cuda.cpu(), augment(images, batch_generator(0, 1, 0, 2)))


def test_none_returns_the_batch_itself():
    images = distinct_images(4)
    assert Augment()(images, batch_generator(0, 0, 0, 0)) is images


@pytest.fixture(scope="module")
def dataset():
    images = torch.randint(0, 256, (N, 3, 6, 6), dtype=torch.uint8)
    return InMemoryDataset(ArrayStore(images, torch.arange(N)))


def augmented_epoch(dataset, epoch, mode="device", workers=0, skip=0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = build_loader(dataset, seed=0, train=True, mode=mode, num_workers=workers, **LOADER)
    loader.set_epoch(epoch, skip)
    augment = Augment(pad=2, hflip=True, vflip=True, transpose=True, cutout=2).for_epoch(0, epoch, 0, skip)
    return [(augment(images), labels) for images, labels in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


def test_both_loader_modes_any_workers_and_a_resumed_epoch_see_the_same_batches(dataset):
    for epoch in (0, 1):
        expected = augmented_epoch(dataset, epoch)
        assert same(augmented_epoch(dataset, epoch, mode="dataloader", workers=2), expected)
        assert same(augmented_epoch(dataset, epoch, mode="dataloader"), expected)
        assert same(augmented_epoch(dataset, epoch, skip=2), expected[2:])  # resumed after 2 of 3 batches
    assert not same(augmented_epoch(dataset, 1), augmented_epoch(dataset, 0))


@pytest.mark.parametrize("choice", ["crops", "imagefolder", "datasetfolder", "cifar10"])
def test_no_dataset_has_its_own_flip_and_augment_defaults_to_none(make_cfg, choice):
    cfg = make_cfg(f"dataset={choice}")
    assert "hflip" not in cfg.dataset
    assert not Augment(**{k: cfg.augment[k] for k in ("pad", "hflip", "vflip", "transpose", "cutout", "scale")}).active


@pytest.mark.parametrize("choice, on", [("hflip", {"hflip"}), ("standard", {"pad", "hflip"}),
                                        ("dihedral", {"pad", "hflip", "vflip", "transpose"})])
def test_presets(make_cfg, choice, on):
    augment = make_cfg(f"augment={choice}").augment
    assert {k for k in ("pad", "hflip", "vflip", "transpose", "cutout") if augment[k]} == on


def first_batch(run_dir: Path) -> torch.Tensor:
    (image,) = events(run_dir).Images("train/first_batch")
    return torch.from_numpy(np.array(Image.open(io.BytesIO(image.encoded_image_string))))


def test_augmentation_reaches_training_and_the_first_batch_image(make_cfg, crop_csv, tmp_path):
    runs = {}
    for choice in ("none", "dihedral"):
        runs[choice] = training.run(make_cfg(f"dataset.csv={crop_csv}", "loader.batch_size=8", f"augment={choice}",
                                             "augment.cutout=8", run_dir=tmp_path / choice))
    assert runs["dihedral"]["train/loss"] != runs["none"]["train/loss"]
    assert not torch.equal(first_batch(tmp_path / "dihedral"), first_batch(tmp_path / "none"))
    # The same run in dataloader mode trains on the same augmented batches.
    again = training.run(make_cfg(f"dataset.csv={crop_csv}", "loader.batch_size=8", "augment=dihedral",
                                  "augment.cutout=8", "loader.mode=dataloader", run_dir=tmp_path / "again"))
    assert again["train/loss"] == runs["dihedral"]["train/loss"]


@pytest.mark.parametrize("overrides, message", [
    (["augment=standard", "augment.pad=16"], "augment.pad=16 is too large for 16x16 .* at most 15"),
    (["augment=dihedral", "dataset.width=24"], "augment.transpose=true needs square inputs, got 24x16"),
    (["augment.cutout=17"], "augment.cutout=17 is larger than 16x16"),
    (["augment.pad=-1"], "augment.pad must be at least 0, got -1"),
    (["augment.scale=3"], "augment.scale must be between 1 and 2, got 3"),
])
def test_an_augmentation_that_cannot_apply_is_one_line_before_any_data_is_read(make_cfg, tmp_path, overrides,
                                                                              message):
    missing = tmp_path / "nowhere" / "crops.csv"  # reading the data would fail differently
    with pytest.raises(UserError, match=f"^{message}"):
        training.run(make_cfg(f"dataset.csv={missing}", "dataset.width=16", "dataset.height=16", *overrides))
