"""The `fused_optim` torch.library namespace: every op schema of the package is defined in it."""

import torch

lib = torch.library.Library("fused_optim", "DEF")
