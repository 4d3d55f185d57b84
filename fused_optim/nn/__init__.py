"""Loss modules: drop-ins for torch.nn.CrossEntropyLoss and torch.nn.LinearCrossEntropyLoss."""

from fused_optim.nn.loss import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]
