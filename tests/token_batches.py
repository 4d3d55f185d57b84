"""The data of the gradient-accumulation tests across ranks (DDP in test_distributed.py, FSDP2 in test_dtensor.py):
a small classifier and each rank's micro-batches of labels, some of them ignored, so that ranks count different
numbers of tokens. The same in every process (seeded), so the test process can compute the single-process answer."""

from __future__ import annotations

import torch

CLASSES, FEATURES, IGNORE = 7, 6, -100


def classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 10), torch.nn.Tanh(), torch.nn.Linear(10, CLASSES))


def rank_micro_batches(rank_batches: list[list[tuple[int, int]]]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every rank's micro-batches (inputs, labels), given each one's (counted, ignored) token numbers per rank."""
    generator = torch.Generator().manual_seed(1234)
    data = []
    for batches in rank_batches:
        rank_data = []
        for counted, ignored in batches:
            x = torch.randn(counted + ignored, FEATURES, generator=generator)
            y = torch.randint(0, CLASSES, (counted + ignored,), generator=generator)
            y[torch.randperm(counted + ignored, generator=generator)[:ignored]] = IGNORE
            rank_data.append((x, y))
        data.append(rank_data)
    return data
