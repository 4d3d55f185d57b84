"""Argument checks of the fused losses, with the exception types and messages torch's own losses raise for the same
bad input (torch 2.14: aten/src/ATen/native/LossNLL.cpp, torch/nn/functional.py). Shapes and dtypes only: nothing
here reads tensor data, so nothing syncs with a GPU."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from fused_optim.autograd.cross_entropy import loss_dtype

REDUCTIONS = ("none", "mean", "sum")


def _type_name(dtype: torch.dtype) -> str:
    """torch's C++ name of a dtype ("Float", "Long", ...), as its error messages print it."""
    return torch.empty(0, dtype=dtype).type().removeprefix("torch.").removesuffix("Tensor")


def is_int(value) -> bool:
    """Whether `value` is an integer as torch's argument parser takes one: any `__index__`, but not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def is_float(value) -> bool:
    """Whether `value` is a float as torch's argument parser takes one: a Python float or int (a bool too), a numpy
    scalar (numpy itself not imported: a user who passes one has it), or a 0-d tensor that requires no grad."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not value.requires_grad
    if type(value).__module__ == "numpy":
        return type(value).__name__ != "ndarray" and not isinstance(value, complex) and hasattr(value, "__float__")
    return isinstance(value, (float, int))


def check_cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: str,
                        label_smoothing: float, ignore_index: int) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    # torch's argument parser's checks, in the order of cross_entropy_loss's arguments
    for position, name, value in ((1, "input", input), (2, "target", target), (3, "weight", weight)):
        if not isinstance(value, torch.Tensor) and not (name == "weight" and value is None):
            raise TypeError(f"cross_entropy_loss(): argument '{name}' (position {position}) must be Tensor, not "
                            f"{type(value).__name__}")
    if not is_int(ignore_index):  # a float one would reach our ops' schemas
        raise TypeError(f"cross_entropy_loss(): argument 'ignore_index' (position 5) must be int, not "
                        f"{type(ignore_index).__name__}")
    if not -2**63 <= operator.index(ignore_index) < 2**63:  # torch's argument parser's words for one past int64
        raise ValueError("Overflow when unpacking long long")
    if not is_float(label_smoothing):
        raise TypeError(f"cross_entropy_loss(): argument 'label_smoothing' (position 6) must be float, not "
                        f"{type(label_smoothing).__name__}")
    if target.device != input.device:
        raise RuntimeError(f"Expected the target on the input's device ({input.device}), got it on {target.device}.")
    if weight is not None and weight.requires_grad and torch.is_grad_enabled() and not target.is_floating_point():
        # torch's own words: its NLL loss has no derivative for the class weights either (its loss of probability
        # targets, which ours runs too, has one)
        raise RuntimeError("The function 'nll_loss_forward' is not differentiable with respect to argument 'weight'. "
                           "This input cannot have requires_grad True.")
    # torch's checks in torch's order (cross_entropy_loss, nll_loss_nd, then nll_loss or nll_loss2d), so that input
    # with several faults raises what torch raises for it.
    probabilities = target.is_floating_point()
    if not probabilities and target.shape == input.shape:  # torch takes a target shaped like the logits as those
        raise RuntimeError(f"Expected floating point type for target with class probabilities, got "
                           f"{_type_name(target.dtype)}")
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing:g}")  # as C++ prints
    if probabilities:
        return  # probability targets run torch's own cross-entropy, which checks them itself
    if input.dim() == 0:  # torch's words: it reads the class dimension, 1
        raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)")
    _check_target_dims(input, target)
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_type_name(target.dtype)}")
    if input.dim() == 1 and target.dim() == 1 and target.shape[0] != 1:
        raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}")
    if input.dim() == 2 and target.dim() == 0:  # (0, C) logits (the batch sizes matched): torch reads its dim 0
        raise IndexError("Dimension specified as 0 but tensor has no dimensions")
    num_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    if weight is not None:
        if input.dim() <= 2 and (weight.dim() != 1 or weight.numel() != num_classes):
            raise RuntimeError(f"weight tensor should be defined either for all {num_classes} classes or no classes "
                               f"but got weight tensor of shape: {list(weight.shape)}")
        if input.dim() > 2 and weight.numel() != num_classes:  # nll_loss2d's words: it takes any shape of C values
            raise RuntimeError("weight tensor should be defined either for all or no classes")
    if input.dim() == 4 and list(target.shape[1:]) != list(input.shape[2:]):
        # nll_loss2d's message, its unbalanced parenthesis included
        raise RuntimeError(f"size mismatch (got input: {list(input.shape)} , target: {list(target.shape)}")
    if weight is not None and loss_dtype(weight.dtype, input.device) != loss_dtype(input.dtype, input.device):
        # compared in the dtype the loss is computed in: under autocast fp32 for both (float64 excepted), as torch's
        raise RuntimeError(f"expected scalar type {_type_name(loss_dtype(input.dtype, input.device))} but found "
                           f"{_type_name(loss_dtype(weight.dtype, input.device))}")
    # torch's spatial loss (3 or more input dims) reads its targets as int64 only; its empty "mean" and "sum" read none
    if input.dim() > 2 and target.dtype == torch.uint8 and (target.numel() > 0 or reduction == "none"):
        raise RuntimeError("expected scalar type Long but found Byte")


def _check_target_dims(input: torch.Tensor, target: torch.Tensor) -> None:
    """The target's shape as nll_loss_nd, then nll_loss or nll_loss2d, check it before its dtype."""
    if input.dim() == 1:
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        return
    target_batch = target.shape[0] if target.dim() > 0 else 0  # torch reads a 0-d target's batch size as 0
    if input.shape[0] != target_batch:
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target_batch}).")
    if input.dim() == 2:
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    elif input.dim() == 4:  # nll_loss2d's check; it compares the sizes after the dtype and the class weights
        if target.dim() != 3:
            raise RuntimeError(f"only batches of spatial targets supported (3D tensors) but got targets of "
                               f"dimension: {target.dim()}")
    elif target.dim() == 0 or list(target.shape[1:]) != list(input.shape[2:]):
        raise RuntimeError(f"Expected target size {[input.shape[0], *input.shape[2:]]}, got {list(target.shape)}")


def check_linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, linear_bias: torch.Tensor | None,
                               target: torch.Tensor, ignore_index: int | None) -> None:
    """torch 2.14's checks of linear_cross_entropy's own arguments, in its order and words (the logits' checks
    follow: check_cross_entropy)."""
    if input.dim() not in (1, 2):
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    in_features = input.shape[-1]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError("expected equal input and linear_weight last dimensions (in_features), "
                           f"got {in_features} and {linear_weight.shape[-1]}, respectively")
    if linear_bias is not None and tuple(linear_bias.shape) != tuple(linear_weight.shape[:-1]):
        raise RuntimeError(f"expected linear_bias shape {tuple(linear_weight.shape[:-1])}, got "
                           f"{tuple(linear_bias.shape)}")
    if linear_weight.dim() > 2 and input.dim() == 1:
        raise RuntimeError(f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires "
                           f"batched input, (N, {in_features}), got unbatched input with shape {tuple(input.shape)}")
    if ignore_index is not None and target.shape == (*input.shape[:-1], *linear_weight.shape[:-1]):
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    # torch's F.linear runs before its loss: its dtype and device checks (under autocast, of the dtypes it casts
    # to), made on empty stand-ins where the operands differ, so a batch of no rows is checked too
    operands = [t for t in (input, linear_weight, linear_bias) if t is not None]
    if len({(t.dtype, t.device) for t in operands}) > 1:
        F.linear(torch.empty((0, in_features), dtype=input.dtype, device=input.device),
                 torch.empty((0, in_features), dtype=linear_weight.dtype, device=linear_weight.device),
                 None if linear_bias is None else torch.empty(0, dtype=linear_bias.dtype, device=linear_bias.device))
