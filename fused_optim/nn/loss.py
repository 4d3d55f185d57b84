"""The loss modules: thin shells over fused_optim.functional, with torch's constructors and state."""

from __future__ import annotations

import math

import torch
from torch.nn.modules.loss import _WeightedLoss

from fused_optim import functional


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss, fused (fused_optim.functional.cross_entropy), with the keyword options
    `z_loss`, `softcap`, `return_z_loss`, `inplace_backward` and `backend`.

    Example:
        >>> import torch, fused_optim
        >>> loss_fn = fused_optim.CrossEntropyLoss(ignore_index=-100, label_smoothing=0.1)
        >>> logits = torch.randn(8, 1000, requires_grad=True)
        >>> loss_fn(logits, torch.randint(0, 1000, (8,))).backward()
    """

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0, *, z_loss=0.0, softcap=None, return_z_loss=False, inplace_backward=False,
                 backend=None):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss, self.softcap, self.return_z_loss = z_loss, softcap, return_z_loss
        self.inplace_backward, self.backend = inplace_backward, backend

    def forward(self, input, target):
        return functional.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                        reduction=self.reduction, label_smoothing=self.label_smoothing,
                                        z_loss=self.z_loss, softcap=self.softcap, return_z_loss=self.return_z_loss,
                                        inplace_backward=self.inplace_backward, backend=self.backend)


class LinearCrossEntropyLoss(_WeightedLoss):
    """torch.nn.LinearCrossEntropyLoss (torch 2.14), fused and chunked (fused_optim.functional.
    linear_cross_entropy): it owns the (num_classes, in_features) projection as `self.linear`, like torch's, so
    state dicts load into either. Extra keyword options: `z_loss`, `softcap`, `return_z_loss`, `backend`.

    Example:
        >>> import torch, fused_optim
        >>> head = fused_optim.LinearCrossEntropyLoss(32, 1000)
        >>> hidden = torch.randn(64, 32, requires_grad=True)
        >>> head(hidden, torch.randint(0, 1000, (64,))).backward()
    """

    def __init__(self, in_features, num_classes, *, out_features=(), bias=False, device=None, dtype=None,
                 reduction="mean", weight=None, ignore_index=None, label_smoothing=0.0, options=None, z_loss=0.0,
                 softcap=None, return_z_loss=False, backend=None):
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
        self.num_classes, self.out_features = num_classes, tuple(out_features)
        self.ignore_index, self.label_smoothing, self.options = ignore_index, label_smoothing, options
        self.z_loss, self.softcap, self.return_z_loss, self.backend = z_loss, softcap, return_z_loss, backend
        # stored flat, as torch stores it, and reshaped for a K-dimensional loss in forward
        self.linear = torch.nn.Linear(in_features, math.prod(self.out_features, start=num_classes), bias=bias,
                                      device=device, dtype=dtype)

    def forward(self, input, target):
        shape = (self.num_classes, *self.out_features)
        linear_bias = self.linear.bias.reshape(shape) if self.linear.bias is not None else None
        return functional.linear_cross_entropy(
            input, self.linear.weight.reshape(*shape, self.linear.in_features), target, linear_bias=linear_bias,
            weight=self.weight, reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, options=self.options, z_loss=self.z_loss, softcap=self.softcap,
            return_z_loss=self.return_z_loss, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, "
                f"reduction={self.reduction}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, options={self.options}")
