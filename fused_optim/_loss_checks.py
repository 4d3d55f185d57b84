"""Argument checks of the fused losses, with the exception types and messages torch's own losses raise for the same
bad input (torch 2.14: aten/src/ATen/native/LossNLL.cpp, torch/nn/functional.py). Shapes and dtypes only: nothing
here reads tensor data, so nothing syncs with a GPU."""

from __future__ import annotations

import torch

REDUCTIONS = ("none", "mean", "sum")


def _type_name(dtype: torch.dtype) -> str:
    """torch's C++ name of a dtype ("Float", "Long", ...), as its error messages print it."""
    return torch.empty(0, dtype=dtype).type().removeprefix("torch.").removesuffix("Tensor")


def check_cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: str,
                        label_smoothing: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if input.dim() == 0:
        raise ValueError("Expected input to have at least one dimension, got a 0-dimensional tensor.")
    if target.device != input.device:
        raise RuntimeError(f"Expected the target on the input's device ({input.device}), got it on {target.device}.")
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        # torch's own words: its NLL loss has no derivative for the class weights either
        raise RuntimeError("The function 'nll_loss_forward' is not differentiable with respect to argument 'weight'. "
                           "This input cannot have requires_grad True.")
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing:g}")  # as C++ prints
    if target.is_floating_point():
        return  # probability targets run torch's own cross-entropy, which checks them itself
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {_type_name(target.dtype)}")
    num_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    if weight is not None:
        if weight.dim() != 1 or weight.numel() != num_classes:
            raise RuntimeError(f"weight tensor should be defined either for all {num_classes} classes or no classes "
                               f"but got weight tensor of shape: {list(weight.shape)}")
        if weight.dtype != input.dtype:
            raise RuntimeError(f"expected scalar type {_type_name(input.dtype)} but found {_type_name(weight.dtype)}")
    if input.dim() == 1:
        if target.dim() > 1 or target.numel() != 1:
            raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.numel()}")
    elif input.dim() == 2:
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if target.shape[0] != input.shape[0]:
            raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                             f"({target.shape[0]}).")
    else:
        expected = [input.shape[0], *input.shape[2:]]
        if list(target.shape) != expected:
            raise RuntimeError(f"Expected target size {expected}, got {list(target.shape)}")


def check_linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor,
                               linear_bias: torch.Tensor | None) -> None:
    if input.dim() not in (1, 2):
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.shape[-1] != input.shape[-1]:
        rows = input.shape[0] if input.dim() == 2 else 1
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({rows}x{input.shape[-1]} and "
                           f"{linear_weight.shape[-1]}x{linear_weight.shape[:-1].numel()})")
    if linear_bias is not None and linear_bias.shape != linear_weight.shape[:-1]:
        raise RuntimeError(f"expected linear_bias of shape {tuple(linear_weight.shape[:-1])}, got "
                           f"{tuple(linear_bias.shape)}")
