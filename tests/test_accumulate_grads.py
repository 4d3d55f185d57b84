"""fused_optim::accumulate_grads_* (main_grads[i] += grads[i]) against the float64 reference and torch, on every
backend that runs here.

fp32 main grads plus an fp32, bf16 or fp16 grad: both are fp32 values once the grad is widened (exactly), and the
float64 sum of two fp32 values rounded to fp32 is the correctly rounded fp32 sum, so every backend must match the
reference rounded to fp32 bit for bit, and so must torch's own `main.add_(grad)`.

Sizes, and why: 1 and 3 are smaller than any vector width or block (all tail); 0 is an empty tensor, which must be
skipped without touching memory, placed mid-list so the block search steps over it; 1023 is one short of a Triton
block (1024); 4097 spans five blocks, the last holding one element; (7, 13) is 2-D. They share one list, so the
pointer table's bookkeeping is exercised too.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BACKEND_DEVICES, one_element_past_an_allocation

from fused_optim.ops._library import resolve_op
from fused_optim.ops.accumulate import accumulate_grads
from fused_optim.reference import reference_accumulate

SHAPES = [(1,), (3,), (0,), (1023,), (4097,), (7, 13)]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


def random_main_grads(shapes, device) -> list[torch.Tensor]:
    return [torch.randn(s, device=device) for s in shapes]


def random_grads(shapes, dtypes, device) -> list[torch.Tensor]:
    """Standard-normal grads (never zeros) rounded to their dtype, as autograd hands them out."""
    return [torch.randn(s).to(device=device, dtype=d) for s, d in zip(shapes, dtypes)]


def assert_equal_to_reference(main_grads, expected) -> None:
    for m, e in zip(main_grads, expected):
        assert m.dtype == torch.float32
        torch.testing.assert_close(m.cpu(), e.float().cpu(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_matches_reference_and_torch_bit_for_bit(backend, device, dtype):
    main_grads = random_main_grads(SHAPES, device)
    theirs = [m.clone() for m in main_grads]
    for _ in range(3):  # three micro-batches: the sum so far is rounded to fp32 after each, as the kernels do
        grads = random_grads(SHAPES, [dtype] * len(SHAPES), device)
        expected = reference_accumulate(main_grads, grads)
        accumulate_grads(main_grads, grads, backend=backend)
        assert_equal_to_reference(main_grads, expected)
        for m, g in zip(theirs, grads):
            m.add_(g)  # torch at the same dtypes
    for ours, t in zip(main_grads, theirs):
        assert torch.equal(ours, t)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_mixed_grad_dtypes_in_one_list(backend, device):
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16, torch.float16, torch.float32]
    main_grads = random_main_grads(SHAPES, device)
    grads = random_grads(SHAPES, dtypes, device)
    expected = reference_accumulate(main_grads, grads)
    accumulate_grads(main_grads, grads, backend=backend)
    assert_equal_to_reference(main_grads, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_grad_strides_differ_from_main_grads(backend, device, dtype):
    """A transposed grad into a contiguous main grad, and a contiguous grad into a transposed (dense) main grad:
    the element at each index is added to the element at the same index, whatever the memory order."""
    main_grads = [torch.randn(7, 13, device=device), torch.randn(13, 7, device=device).t()]
    grads = [torch.randn(13, 7).to(device=device, dtype=dtype).t(), torch.randn(7, 13).to(device=device, dtype=dtype)]
    expected = reference_accumulate(main_grads, grads)
    accumulate_grads(main_grads, grads, backend=backend)
    assert_equal_to_reference(main_grads, expected)
    assert main_grads[1].stride() == (1, 7)  # updated in place, in its own layout


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_nan_and_inf_propagate(backend, device, dtype):
    main_grads = random_main_grads(SHAPES, device)
    grads = random_grads(SHAPES, [dtype] * len(SHAPES), device)
    grads[3][5] = math.nan  # in the masked tail of the only block of 1023
    grads[4][100] = math.inf  # in a whole (unmasked) block
    grads[4][4096] = -math.inf  # the last block's one element
    main_grads[5][6, 12] = math.nan  # already NaN in the main grad
    expected = reference_accumulate(main_grads, grads)
    accumulate_grads(main_grads, grads, backend=backend)
    assert_equal_to_reference(main_grads, expected)
    assert main_grads[3][5].isnan() and main_grads[4][100] == math.inf and main_grads[4][4096] == -math.inf
    assert main_grads[5][6, 12].isnan()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_unaligned_addresses(backend, device, dtype):
    """The Triton kernel promises the compiler 16-byte alignment only when the host saw it: a list with one
    unaligned tensor takes the narrow loads (on a GPU, a wrong promise is a misaligned-address fault)."""
    main_grads = random_main_grads(SHAPES, device)
    grads = random_grads(SHAPES, [dtype] * len(SHAPES), device)
    main_grads[4] = one_element_past_an_allocation(main_grads[4])
    grads[3] = one_element_past_an_allocation(grads[3])
    expected = reference_accumulate(main_grads, grads)
    accumulate_grads(main_grads, grads, backend=backend)
    assert_equal_to_reference(main_grads, expected)


def _bad_inputs(device):
    shapes = [(3,), (5,)]

    def good():
        return random_main_grads(shapes, device), random_grads(shapes, [torch.bfloat16] * 2, device)

    cases = {}
    main_grads, grads = good()
    cases["length mismatch"] = (main_grads, grads[:1], "same length")
    main_grads, grads = good()
    cases["bf16 main grad"] = ([main_grads[0].bfloat16(), main_grads[1]], grads, "float32")
    main_grads, grads = good()
    cases["fp64 grad"] = (main_grads, [grads[0], grads[1].double()], "float32, bfloat16 or float16")
    main_grads, grads = good()
    cases["shape mismatch"] = (main_grads, [grads[0], torch.randn(6, device=device, dtype=torch.bfloat16)], "shape")
    main_grads, grads = good()
    cases["non-dense main grad"] = ([main_grads[0], torch.randn(10, device=device)[::2]], grads, "dense")
    return cases


@pytest.mark.parametrize("case", list(_bad_inputs("cpu")))
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_bad_input_raises_and_changes_nothing(backend, device, case):
    main_grads, grads, message = _bad_inputs(device)[case]
    before = [m.clone() for m in main_grads]
    with pytest.raises(RuntimeError, match=message):
        accumulate_grads(main_grads, grads, backend=backend)
    for m, b in zip(main_grads, before):
        assert torch.equal(m, b)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_empty_lists_and_empty_tensors(backend, device):
    accumulate_grads([], [], backend=backend)  # nothing to do, no device to pick
    main_grads = [torch.empty(0, device=device), torch.empty(0, 3, device=device)]
    accumulate_grads(main_grads, [torch.empty(0, device=device), torch.empty(0, 3, device=device)], backend=backend)
    assert [m.shape for m in main_grads] == [(0,), (0, 3)]


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_torch_compile_fullgraph_matches_eager(backend, device):
    """The op is one node of the graph (its schema marks main_grads as mutated), so the compiled function's
    in-place writes are visible after the call, and later reads see them."""
    main_grads = random_main_grads(SHAPES, device)
    eager = [m.clone() for m in main_grads]

    def accumulate_and_scale(main_grads, grads):
        accumulate_grads(main_grads, grads, backend=backend)
        return [m * 0.5 for m in main_grads]

    torch._dynamo.reset()
    compiled = torch.compile(accumulate_and_scale, fullgraph=True)
    for _ in range(2):
        grads = random_grads(SHAPES, [torch.bfloat16] * len(SHAPES), device)
        halves = compiled(main_grads, grads)
        eager_halves = accumulate_and_scale(eager, grads)
        for ours, theirs in zip(main_grads + halves, eager + eager_halves):
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_opcheck(backend, device):
    """The op mutates only what its schema marks (main_grads: Tensor(a!)[]), has a fake impl, and AOT dispatch
    traces it as an opaque mutating call."""
    op = resolve_op("accumulate_grads_", backend, device)
    shapes = [(3,), (0,), (1030,), (2, 5)]
    torch.library.opcheck(op, (random_main_grads(shapes, device), random_grads(shapes, [torch.bfloat16] * 4, device)))
