import pytest
import torch

from errors import UserError
from models.cnn import TutorialCNN, min_input_size


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
