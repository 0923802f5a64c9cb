"""Test-time augmentation (commands/tta.py): which views are averaged, and when a mode is refused."""

import itertools

import pytest
import torch

from commands import tta
from errors import UserError
from training.augment import Augment


def _images(n=3, channels=2, side=5):
    return torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _seen(mode, images, scales=(1.0,)):
    """Every batch the model was given in `mode` at `scales`."""
    seen = []

    def forward(x):
        seen.append(x.clone())
        return torch.zeros(len(x), 4)

    tta.probabilities(forward, images, mode, scales)
    return seen


def test_dihedral_views_are_the_orientations_training_augmentation_draws():
    images = _images()
    # The 8 combinations of training's three coins (hflip, vflip, transpose), applied by its own code.
    augment = Augment(hflip=True, vflip=True, transpose=True)
    trained = []
    for h, v, t in itertools.product([False, True], repeat=3):
        coin = lambda on: torch.full((len(images),), on)  # noqa: E731
        trained.append(augment._geometric(images, None, coin(h), coin(v), coin(t)))
    seen = _seen("dihedral", images)
    assert len(seen) == 8
    key = lambda x: x.numpy().tobytes()  # noqa: E731
    assert {key(x) for x in seen} == {key(x) for x in trained}
    assert torch.equal(seen[0], images)  # the batch as it is comes first


def test_hflip_averages_the_softmax_of_the_batch_and_its_mirror():
    images = _images().float()
    weights = torch.randn(2 * 5 * 5, 4, generator=torch.Generator().manual_seed(1))
    forward = lambda x: x.flatten(1) @ weights / 100  # noqa: E731  an orientation-sensitive linear model
    got = tta.probabilities(forward, images, "hflip")
    expected = (torch.softmax(forward(images), 1) + torch.softmax(forward(images.flip(-1)), 1)) / 2
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(1), torch.ones(len(images)))
    assert torch.allclose(tta.probabilities(forward, images, "none"), torch.softmax(forward(images), 1))


def test_modes_need_the_transforms_the_run_trained_with():
    shape = (3, 8, 8)
    tta.check("none", {}, shape)
    tta.check("hflip", {"hflip": True}, shape)
    tta.check("dihedral", {"hflip": True, "vflip": True, "transpose": True}, shape)
    with pytest.raises(UserError, match=r"tta=hflip: the run trained without augment.hflip.*tta_force=true"):
        tta.check("hflip", {"hflip": False}, shape)
    with pytest.raises(UserError, match=r"without augment.vflip/transpose"):
        tta.check("dihedral", {"hflip": True}, shape)
    tta.check("dihedral", {"hflip": False}, shape, force=True)  # forced: the user says orientation is free


def test_unknown_modes_and_dihedral_on_non_square_inputs_are_refused():
    with pytest.raises(UserError, match="tta=vflip is not a test-time augmentation: use one of none, hflip, dihedral"):
        tta.check("vflip", {}, (3, 8, 8))
    with pytest.raises(UserError, match=r"tta=dihedral needs square inputs.*16x8"):
        tta.check("dihedral", {"hflip": True, "vflip": True, "transpose": True}, (1, 8, 16), force=True)
    assert [tta.views(m) for m in tta.MODES] == [1, 2, 8]


def test_scales_repeat_every_view_on_the_batch_zoomed_by_each_factor():
    images = _images(side=8)
    seen = _seen("hflip", images, [1.0, 0.8])
    zoomed = tta.zoom(images, 0.8)
    assert len(seen) == 4 == tta.views("hflip", [1.0, 0.8]) and not torch.equal(zoomed, images)
    for got, expected in zip(seen, [images, images.flip(-1), zoomed, zoomed.flip(-1)]):
        assert torch.equal(got, expected)
    weights = torch.randn(2 * 8 * 8, 4, generator=torch.Generator().manual_seed(1))
    forward = lambda x: x.float().flatten(1) @ weights / 100  # noqa: E731
    expected = torch.stack([torch.softmax(forward(x), 1) for x in (images, zoomed)]).mean(0)
    torch.testing.assert_close(tta.probabilities(forward, images, "none", [1.0, 0.8]), expected)


def test_a_zoom_spreads_or_squeezes_pixel_positions_about_the_centre():
    side = 32
    ramp = torch.arange(side, dtype=torch.float32).expand(2, 1, side, side)  # each pixel holds its column
    for factor in (0.8, 1.25):
        # Output column p shows source position (p + 1/2 - side/2) / factor + side/2 - 1/2 (pixel centres).
        expected = (torch.arange(side) + 0.5 - side / 2) / factor + side / 2 - 0.5
        inner = slice(4, side - 4)  # 0.8 reads 4 px beyond each border, reflected back in there
        torch.testing.assert_close(tta.zoom(ramp, factor)[0, 0, 10, inner], expected[inner], rtol=0, atol=1e-4)
        assert torch.equal(tta.zoom(ramp.to(torch.uint8), factor), tta.zoom(ramp, factor).round().to(torch.uint8))
    out = tta.zoom(ramp, 0.8)
    assert out.min() >= 0 and out.max() <= side - 1 and torch.equal(tta.zoom(ramp, 1.0), ramp)


def test_scales_outside_the_zooms_the_run_trained_with_are_refused_unless_forced():
    shape = (1, 8, 8)
    tta.check("none", {"scale": 1.4}, shape, scales=[1.0, 0.8, 0.72, 1.4])
    with pytest.raises(UserError, match=r"^tta_scales: the run trained without zooms \(augment.scale=1\), so "
                                        r"0.8 may look like another class .* tta_force=true"):
        tta.check("none", {"scale": 1.0}, shape, scales=[1.0, 0.8])
    with pytest.raises(UserError, match=r"zooms of 0.714-1.4x \(augment.scale=1.4\), so 0.7, 2 may"):
        tta.check("none", {"scale": 1.4}, shape, scales=[0.7, 1, 2])
    tta.check("none", {}, shape, force=True, scales=[1.0, 0.8])
    for bad in ([], [0], [1, "a"], 0.8, "0.8", [True], [5]):
        with pytest.raises(UserError, match=r"^tta_scales=.* must be a list of zoom factors between 0.25 and 4"):
            tta.check("none", {"scale": 2.0}, shape, force=True, scales=bad)
