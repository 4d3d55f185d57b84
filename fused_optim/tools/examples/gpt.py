"""A small GPT in plain PyTorch: token + position embeddings, pre-LayerNorm blocks of causal self-attention
(F.scaled_dot_product_attention) and a GELU MLP, a final LayerNorm, and an LM head tied to the token embedding.

`forward(idx)` returns the final hidden states, not the logits, so the loss can be a fused linear + cross-entropy
over them and `lm_head_weight` (fused_optim.functional.linear_cross_entropy) that never materialises the (B·T, V)
logits; `logits(hidden)` gives the logits for a loss that needs them.

Example:
    >>> import torch
    >>> from fused_optim.tools.examples.gpt import GPT, GPTConfig
    >>> model = GPT(GPTConfig(vocab_size=256, seq_len=16, n_layer=2, n_head=2, d_model=32))
    >>> hidden = model(torch.randint(0, 256, (4, 16)))
    >>> hidden.shape, model.logits(hidden).shape
    (torch.Size([4, 16, 32]), torch.Size([4, 16, 256]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256  # byte-level tokens
    seq_len: int = 128  # the longest context (the size of the position embedding)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256  # 4 layers of 12·d² + embeddings: about 3.2 M params

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig: d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, C)
        batch, time, channels = x.shape
        # (B, T, 3C) -> three (B, n_head, T, head_dim)
        q, k, v = self.qkv(x).view(batch, time, 3, self.n_head, channels // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, time, channels))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, 4 * config.d_model)
        self.down = nn.Linear(4 * config.d_model, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN: x + attn(ln(x)), then x + mlp(ln(x)); the residual stream itself is never normalised."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_mlp = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_final = nn.LayerNorm(config.d_model)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream: each block adds two, so their sum's
        # variance stays O(1) with depth
        for block in self.blocks:
            for projection in (block.attn.proj.weight, block.mlp.down.weight):
                nn.init.normal_(projection, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def lm_head_weight(self) -> Tensor:
        """The LM head's (V, C) weight: the token embedding itself (tied, Press & Wolf 2017)."""
        return self.token_embedding.weight

    def forward(self, idx: Tensor) -> Tensor:  # idx: (B, T) token ids -> (B, T, C) final hidden states
        time = idx.shape[1]
        if time > self.config.seq_len:
            raise ValueError(f"GPT: a sequence of {time} tokens is longer than seq_len={self.config.seq_len}")
        positions = torch.arange(time, device=idx.device)
        x = self.token_embedding(idx) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.ln_final(x)

    def logits(self, hidden: Tensor) -> Tensor:  # (B, T, C) -> (B, T, V)
        return F.linear(hidden, self.lm_head_weight)

    def num_params(self) -> int:
        """Parameters, the tied LM head counted once."""
        return sum(p.numel() for p in self.parameters())

    def num_flop_params(self) -> int:
        """The N of compute ≈ 6·N·D: the parameters, less the position embedding, a lookup added once per position
        rather than a matmul (the token embedding stays: as the tied LM head it is a (C, V) matmul per token)."""
        return self.num_params() - self.position_embedding.weight.numel()
