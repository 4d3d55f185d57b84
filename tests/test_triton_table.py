"""The pointer table the multi-tensor Triton kernels share (fused_optim/triton/_table.py), built on the host: its
layout, which every kernel's binary search and row reads assume, and its alignment test."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from fused_optim.triton._table import addresses, all_aligned, numels, pack  # noqa: E402


def test_pack_lays_out_a_row_per_tensor_then_the_block_starts():
    # three tensors: 5 elements (one block), none (no block), 2049 (three blocks of 1024, the last partial)
    columns = [[4096, 8192, 12288], [0, 0, 0], [5, 0, 2049]]  # an array's addresses, an absent array, the numels
    entries, num_blocks = pack(columns, 1024)
    assert entries == [4096, 0, 5, 8192, 0, 0, 12288, 0, 2049] + [0, 1, 1, 4]
    assert num_blocks == 4


def test_pack_of_no_tensors_has_no_blocks():
    assert pack([[], []], 1024) == ([0], 0)


def test_columns_read_each_tensors_address_and_numel():
    tensors = [torch.randn(3), torch.empty(0), torch.randn(2, 5)]
    assert addresses(tensors) == [t.data_ptr() for t in tensors]
    assert numels(tensors) == [3, 0, 10]


def test_all_aligned_looks_at_every_address_of_every_column():
    assert all_aligned([16, 32], [0, 4096])
    assert not all_aligned([16, 32], [0, 4104])  # one address 8 bytes past a multiple of 16
    assert all_aligned()
