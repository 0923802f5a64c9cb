import pytest
import torch
from torch import nn

from errors import UserError
from models.cnn import TutorialCNN, min_input_size
from models.fastnet import FastNet
from models.resnet import ResNet18
from models.size import cost


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("height, width", [(16, 16), (32, 32), (24, 48), (17, 100)])
def test_any_size_the_architecture_takes(channels, height, width):
    model = TutorialCNN(channels, height, width, num_classes=7)
    assert model(torch.zeros(2, channels, height, width)).shape == (2, 7)


def test_tutorial_shape_at_32():
    assert TutorialCNN(3, 32, 32, 10).fc1.in_features == 16 * 5 * 5  # the tutorial's own number


def test_too_small_names_the_smallest_size():
    assert min_input_size() == 16
    with pytest.raises(UserError, match="at least 16"):
        TutorialCNN(3, 15, 32, 10)


@pytest.mark.parametrize("model_class", [ResNet18, FastNet])
@pytest.mark.parametrize("channels, height, width, classes", [(1, 16, 16, 2), (3, 32, 32, 10), (4, 24, 40, 3)])
def test_larger_models_take_any_channels_size_and_classes(model_class, channels, height, width, classes):
    model = model_class(channels, height, width, classes)
    assert model(torch.zeros(2, channels, height, width)).shape == (2, classes)


def test_resnet18_is_adapted_to_small_inputs():
    net = ResNet18(1, 32, 32, 5).net
    assert (net.conv1.kernel_size, net.conv1.stride, net.conv1.in_channels) == ((3, 3), (1, 1), 1)
    assert isinstance(net.maxpool, nn.Identity)
    assert net.fc.out_features == 5


def test_fastnet_is_compact_and_normalised():
    model = FastNet(3, 32, 32, 10)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.GELU) for m in model.modules())


@pytest.mark.parametrize("model_class, name", [(ResNet18, "resnet18"), (FastNet, "fastnet")])
def test_every_model_declares_its_smallest_input(model_class, name):
    smallest = model_class.MIN_INPUT_SIZE
    model_class(3, smallest, smallest, 2)(torch.zeros(1, 3, smallest, smallest))
    with pytest.raises(UserError, match=f"too small for {name}: .* at least {smallest}"):
        model_class(3, smallest - 1, 64, 2)


def test_cost_counts_parameters_and_flops_without_touching_batchnorm():
    model = FastNet(3, 32, 32, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parameters, flops = cost(model, (3, 32, 32))
    assert parameters == sum(p.numel() for p in model.parameters())
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # The tutorial CNN by hand: multiply-adds of conv1, conv2 and the three linear layers, 2 FLOPs each.
    macs = 6 * 28 * 28 * 3 * 25 + 16 * 10 * 10 * 6 * 25 + 400 * 120 + 120 * 84 + 84 * 10
    assert cost(TutorialCNN(3, 32, 32, 10), (3, 32, 32)) == (62006, 2 * macs)
