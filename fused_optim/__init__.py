"""fused_optim: fused training-step kernels for PyTorch (CUDA C++, Triton and CPU), as drop-ins.

    >>> import torch, fused_optim
    >>> model = torch.nn.Linear(16, 4)
    >>> opt = fused_optim.AdamW(model.parameters(), lr=1e-3)  # was: torch.optim.AdamW(...)
    >>> model(torch.randn(8, 16)).square().mean().backward()
    >>> opt.step(); opt.zero_grad()
    >>> sorted(fused_optim.backends()["backends"])
    ['cpu', 'cuda', 'torch', 'triton']
"""

from fused_optim import functional, lr_scheduler, ops  # noqa: F401  (ops: defines the ops and loads the C++ extensions)
from fused_optim.accumulate import GradAccumulator, count_tokens
from fused_optim.amp import GradScaler
from fused_optim.clip_grad import clip_grad_norm_
from fused_optim.info import backends
from fused_optim.nn import CrossEntropyLoss, LinearCrossEntropyLoss
from fused_optim.optim import SGD, Adam, AdamW, Lion

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW", "CrossEntropyLoss", "GradAccumulator", "GradScaler", "LinearCrossEntropyLoss", "Lion", "SGD",
           "backends", "clip_grad_norm_", "count_tokens", "functional", "lr_scheduler", "__version__"]
