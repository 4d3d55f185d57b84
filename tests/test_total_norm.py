"""fused_optim::total_norm* (the p-norm of a list of tensors as one vector) against the float64 reference and
torch's own `torch.linalg.vector_norm` at the same dtype, on every backend that runs here.

Sizes, and why: 1 and 3 are smaller than any vector width or block (all tail); 0 is an empty tensor, placed
mid-list so the block search steps over it (and p = inf must not take the max of nothing); 1023 is one short of a
Triton block (1024); 4097 spans five blocks, the last holding one element; (7, 13) is 2-D. Norm types: 1 and 2
(the kernels' sums of |x| and x²), 3.5 and 0.5 (a general p above and below 1, |x|^p), inf (a max).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import BACKEND_DEVICES, one_element_past_an_allocation

from fused_optim.ops._library import resolve_op
from fused_optim.ops.total_norm import total_norm
from fused_optim.reference import reference_total_norm

SHAPES = [(1,), (3,), (0,), (1023,), (4097,), (7, 13)]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]
NORM_TYPES = [1.0, 2.0, 3.5, math.inf, 0.5]


def random_tensors(shapes, dtypes, device) -> list[torch.Tensor]:
    """Standard-normal values (never zeros) rounded to their dtype."""
    return [torch.randn(s).to(device=device, dtype=d) for s, d in zip(shapes, dtypes)]


def torch_norm(tensors, norm_type) -> torch.Tensor:
    """torch's own norm of the concatenation, widened to fp32 first (so it returns fp32, as ours does)."""
    flat = torch.cat([t.flatten() for t in tensors])
    if flat.numel() == 0:
        return flat.new_zeros((), dtype=torch.float32)
    return torch.linalg.vector_norm(flat, norm_type, dtype=torch.float32)


def error(norm: torch.Tensor, reference: torch.Tensor) -> float:
    return (norm.double().cpu() - reference).abs().item()


def assert_accurate(backend: str, norm: torch.Tensor, tensors, norm_type: float) -> None:
    """Our kernels: never further from the float64 norm than torch's own norm of the concatenation at the same
    dtype; the Triton kernel also within a few fp32 roundings (one for the result, a few for the sums: fp32 trees
    of 1024 elements, fp64 across blocks) of it. The "torch" backend is torch's own (per-tensor norms, then the norm
    of those), the peer itself: its 1-norm of 5,000 fp32 values is 4-5 eps off here, its 0.5-norm ~25 eps, so it
    is only held to 1e-5 relative."""
    reference = reference_total_norm(tensors, norm_type)
    if backend == "torch":
        assert error(norm, reference) <= 1e-5 * reference.item()
        return
    assert error(norm, reference) <= error(torch_norm(tensors, norm_type), reference)
    if backend == "triton":
        assert error(norm, reference) <= 4 * torch.finfo(torch.float32).eps * reference.item()


def check_norm(norm: torch.Tensor, device: str) -> None:
    assert norm.shape == () and norm.dtype == torch.float32 and norm.device.type == device


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_matches_reference_at_least_as_well_as_torch(backend, device, dtype, norm_type):
    tensors = random_tensors(SHAPES, [dtype] * len(SHAPES), device)
    ours = total_norm(tensors, norm_type, backend=backend)
    check_norm(ours, device)
    assert_accurate(backend, ours, tensors, norm_type)


@pytest.mark.parametrize("norm_type", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_precision_on_a_hundred_thousand_elements(backend, device, dtype, norm_type):
    """Sums over many blocks: fp32 within a block (a tree, error ~ log2(BLOCK)), fp64 across them. Values of
    mixed magnitudes, so that a long fp32 running sum would lose the small ones."""
    for _ in range(3):
        shapes = [(30001,), (50000,), (20011,)]
        tensors = [(torch.randn(s) * torch.rand(s) * 10).to(device=device, dtype=dtype) for s in shapes]
        assert_accurate(backend, total_norm(tensors, norm_type, backend=backend), tensors, norm_type)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_mixed_dtypes_in_one_list(backend, device, norm_type):
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16, torch.float16, torch.float32]
    tensors = random_tensors(SHAPES, dtypes, device)
    ours = total_norm(tensors, norm_type, backend=backend)
    assert_accurate(backend, ours, tensors, norm_type)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("wide_dtype", [torch.float64, torch.complex64, torch.complex128],
                         ids=["fp64", "complex64", "complex128"])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_fp64_and_complex_tensors_count_in_their_own_precision(backend, device, wide_dtype, norm_type):
    """The grads of fp64 and complex params, which the optimizers step: torch's norms of them in their own precision
    (a complex element counting with its modulus), combined in fp64 with the op's norm of the others, beside them
    and alone: an fp64 result, a few fp64 roundings from the float64 norm alone and a few fp32 ones beside the
    others (the "torch" op, the peer itself, within 1e-5)."""
    dtypes = [torch.float32, wide_dtype, torch.bfloat16, wide_dtype, torch.float16, wide_dtype]
    tensors = [torch.randn(shape, dtype=dtype).to(device) for shape, dtype in zip(SHAPES, dtypes)]
    for chosen in (tensors, [t for t in tensors if t.dtype == wide_dtype]):
        ours = total_norm(chosen, norm_type, backend=backend)
        assert ours.shape == () and ours.dtype == torch.float64 and ours.device.type == device
        reference = reference_total_norm(chosen, norm_type)
        alone = len(chosen) == 3
        tolerance = (1e-13 if alone else 1e-5 if backend == "torch" else 4 * torch.finfo(torch.float32).eps)
        assert error(ours, reference) <= tolerance * reference.item(), (ours, reference)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_many_small_tensors(backend, device, norm_type):
    """Enough tensors (40, some empty) for a six-step block search, most of them a single tail block."""
    shapes = [(int(n),) for n in torch.randint(0, 40, (39,))] + [(2100,)]
    tensors = random_tensors(shapes, [torch.float32] * len(shapes), device)
    assert_accurate(backend, total_norm(tensors, norm_type, backend=backend), tensors, norm_type)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_transposed_and_strided_tensors(backend, device, dtype):
    """A transposed tensor is dense and goes to the kernel as it is (the norm does not depend on the order of the
    elements); a strided slice is not, and is copied first."""
    base = torch.randn(13, 14).to(device=device, dtype=dtype)
    tensors = [base.t(), base[:, ::2], torch.randn(5).to(device=device, dtype=dtype)]
    for norm_type in NORM_TYPES:
        assert_accurate(backend, total_norm(tensors, norm_type, backend=backend), tensors, norm_type)


NON_FINITE = {  # where to put the non-finite values: (tensor index, element index) in SHAPES
    "whole-block": [(4, 100)],
    "tail": [(3, 5)],
    "last-block-of-one": [(4, 4096)],
    "2-d": [(5, 90)],
}


@pytest.mark.interpreted_cover(2)
@pytest.mark.parametrize("where", list(NON_FINITE))
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_nan_gives_nan_and_inf_gives_inf(backend, device, dtype, norm_type, where):
    """Every other value is finite and some are larger than 1, so a max that drops NaN would return a number."""
    for values, expected in (([math.inf], math.inf), ([-math.inf], math.inf), ([math.nan], math.nan),
                             ([math.inf, math.nan], math.nan)):
        tensors = random_tensors(SHAPES, [dtype] * len(SHAPES), device)
        positions = NON_FINITE[where] + [(1, 2)]  # the second value (if any) elsewhere
        for value, (t, i) in zip(values, positions):
            tensors[t].view(-1)[i] = value
        ours = total_norm(tensors, norm_type, backend=backend)
        assert ours.item() == expected or (math.isnan(expected) and ours.isnan().item()), (values, ours)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_only_empty_tensors_give_zero(backend, device, norm_type):
    ours = total_norm([torch.empty(0, device=device), torch.empty(3, 0, device=device)], norm_type, backend=backend)
    check_norm(ours, device)
    assert ours.item() == 0.0


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_same_bits_every_time_and_at_any_alignment(backend, device):
    """No atomics, a fixed combining order: the same values give the same bits, on a second call and when they
    sit at addresses that are not 16-byte aligned (the Triton kernels then take narrower loads)."""
    tensors = random_tensors(SHAPES, [torch.bfloat16, torch.float32] * 3, device)
    shifted = [one_element_past_an_allocation(t) for t in tensors]
    for norm_type in NORM_TYPES:
        first = total_norm(tensors, norm_type, backend=backend)
        assert torch.equal(total_norm(tensors, norm_type, backend=backend), first), norm_type
        assert torch.equal(total_norm(shifted, norm_type, backend=backend), first), norm_type


BAD_INPUTS = {  # (tensors, norm_type, what the error says)
    "no tensors": (lambda d: [], 2.0, "at least one tensor"),
    "zero norm": (lambda d: [torch.randn(3, device=d)], 0.0, "positive"),
    "negative norm": (lambda d: [torch.randn(3, device=d)], -2.0, "positive"),
    "-inf norm": (lambda d: [torch.randn(3, device=d)], -math.inf, "positive"),
    "nan norm": (lambda d: [torch.randn(3, device=d)], math.nan, "positive"),
    "int tensor": (lambda d: [torch.ones(3, device=d, dtype=torch.int32)], 2.0,
                   "float32, bfloat16, float16, float64, complex64 or complex128"),
    "int tensor beside fp64": (lambda d: [torch.randn(2, device=d, dtype=torch.float64),
                                          torch.ones(3, device=d, dtype=torch.int32)], 2.0,
                               "float32, bfloat16, float16, float64, complex64 or complex128"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_bad_input_raises(backend, device, case):
    make_tensors, norm_type, message = BAD_INPUTS[case]
    tensors = make_tensors(device)
    before = [t.clone() for t in tensors]
    with pytest.raises(RuntimeError, match=message):
        total_norm(tensors, norm_type, backend=backend)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_torch_compile_fullgraph_matches_eager(backend, device):
    """The op is one node of the graph: clipping with its result compiles without a graph break or host sync."""
    tensors = random_tensors(SHAPES, [torch.bfloat16, torch.float32] * 3, device)

    def clip_coefficient(tensors, max_norm: float):
        norm = total_norm(tensors, 2.0, backend=backend)
        return norm, torch.clamp(max_norm / (norm + 1e-6), max=1.0)

    torch._dynamo.reset()
    compiled = torch.compile(clip_coefficient, fullgraph=True)
    (norm, coefficient), (eager_norm, eager_coefficient) = compiled(tensors, 1.0), clip_coefficient(tensors, 1.0)
    assert torch.equal(norm, eager_norm)
    # the compiled division is inductor's own kernel, which on a GPU need not round as eager torch's does
    torch.testing.assert_close(coefficient, eager_coefficient, rtol=2 * torch.finfo(torch.float32).eps, atol=0)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_opcheck(backend, device, norm_type):
    """The op mutates nothing, its fake impl gives the 0-dim fp32 result, and AOT dispatch traces it."""
    op = resolve_op("total_norm", backend, device)
    tensors = random_tensors([(3,), (0,), (1030,), (2, 5)], [torch.bfloat16, torch.float32] * 2, device)
    torch.library.opcheck(op, (tensors, norm_type))
