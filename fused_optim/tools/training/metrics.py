"""The figures the field judges a language-model run by, from the counts the loop keeps.

- Compute ≈ 6·N·D FLOPs (Kaplan et al. 2020): 2·N per token forward, 4·N backward, for N params and D tokens;
  the attention scores' 12·L·T·d per token are left out (small at these sequence lengths, and left out by
  convention). N counts every param once, the tied LM head included (it is a real matmul per token), the
  position embedding not (a lookup: GPT.num_flop_params).
- Model-FLOPs utilisation (6·N·D-based): achieved 6·N·D per second over the device's dense bf16 peak, on a GPU
  whose peak is in PEAK_BF16_FLOPS; "unknown" on any other device.
- Chinchilla-optimal tokens ≈ 20·N (Hoffmann et al. 2022), beside the tokens actually used.
- Perplexity = exp(mean loss per token, in nats).
"""

from __future__ import annotations

import math
import re

import torch

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, from the vendors' data sheets. Matched against the device
# name as whole words, the longest key in the name winning: "H100 NVL" and "H100 PCIe" are not taken for the SXM
# "H100", nor an "L40" for an "L4".
PEAK_BF16_FLOPS = (
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)
CHINCHILLA_TOKENS_PER_PARAM = 20


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when not in the table (every CPU)."""
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_flops_of(gpu_name: str) -> float | None:
    """PEAK_BF16_FLOPS of a GPU by its name (torch.cuda.get_device_name), or None when not in the table."""
    matches = [(len(key), peak) for key, peak in PEAK_BF16_FLOPS if re.search(rf"\b{re.escape(key)}\b", gpu_name)]
    return max(matches)[1] if matches else None


def training_flops(num_params: int, num_tokens: int) -> float:
    return 6.0 * num_params * num_tokens


def mfu(num_params: int, tokens_per_second: float, peak: float | None) -> float | None:
    """Model-FLOPs utilisation as a fraction, or None when the peak is unknown."""
    return None if peak is None else training_flops(num_params, 1) * tokens_per_second / peak


def chinchilla_tokens(num_params: int) -> int:
    return CHINCHILLA_TOKENS_PER_PARAM * num_params


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709
