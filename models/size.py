"""What every model shares: the check that inputs are as large as the architecture takes, and its cost."""

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from errors import UserError


def require_input_size(model: str, smallest: int, height: int, width: int) -> None:
    """`smallest` is the model's declared minimum side (its MIN_INPUT_SIZE), in pixels."""
    if height < smallest or width < smallest:
        raise UserError(f"input {width}x{height} (width x height) is too small for {model}: "
                        f"dataset.width and dataset.height must each be at least {smallest}")


def cost(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[int, int]:
    """(parameters, FLOPs per sample) of a model, the FLOPs counted by torch over one forward pass of a zero
    input (a multiply-add counts 2). Run in eval mode without gradients, so BatchNorm's running statistics
    and the random streams are left as they were."""
    parameters = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    return parameters, counter.get_total_flops()
