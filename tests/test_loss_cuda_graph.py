"""The losses on a GPU run without a host sync and replay in a CUDA graph (README: "no host sync, CUDA-graph
capturable"): cross_entropy and linear_cross_entropy, forward and backward, with ignored rows and class weights,
an incoming gradient of 1 (the scale kernel skips the rows on the device) and of 1/3 (it scales them), fp32 and bf16,
on the CUDA C++ and Triton backends. Needs a GPU: skipped here, run by benchmarks/gpu_check.sh."""

from __future__ import annotations

import pytest
import torch

import fused_optim.functional as FF

pytestmark = pytest.mark.cuda

ROWS, IN_FEATURES, CLASSES = 64, 32, 1000


def make_inputs(seed: int, dtype: torch.dtype):
    """(input, lm head, class weights, target): fresh values, a fifth of the rows ignored."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(ROWS, IN_FEATURES, device="cuda", generator=generator).to(dtype)
    head = (torch.randn(CLASSES, IN_FEATURES, device="cuda", generator=generator) / 2).to(dtype)
    class_weight = (torch.rand(CLASSES, device="cuda", generator=generator) + 0.5).to(dtype)
    target = torch.randint(0, CLASSES, (ROWS,), device="cuda", generator=generator)
    target[::5] = -100
    return x, head, class_weight, target


def loss_and_grads(loss_name: str, backend: str, x, head, class_weight, target, incoming: float):
    """The loss and the gradients of input and lm head, through autograd.grad (no .grad fields to reset)."""
    if loss_name == "cross_entropy":
        loss = FF.cross_entropy(x @ head.t(), target, weight=class_weight, backend=backend)
    else:
        loss = FF.linear_cross_entropy(x, head, target, weight=class_weight, backend=backend)
    grads = torch.autograd.grad(loss, (x, head), torch.full_like(loss, incoming))
    return loss.detach(), grads


CASES = [(loss_name, backend, dtype, incoming)
         for loss_name in ("cross_entropy", "linear_cross_entropy") for backend in ("cuda", "triton")
         for dtype in (torch.float32, torch.bfloat16) for incoming in (1.0, 1 / 3)]
IDS = [f"{name}-{backend}-{str(dtype)[6:]}-incoming{incoming:.2g}" for name, backend, dtype, incoming in CASES]


@pytest.mark.parametrize("loss_name, backend, dtype, incoming", CASES, ids=IDS)
def test_forward_and_backward_make_no_host_sync(loss_name, backend, dtype, incoming):
    x, head, class_weight, target = make_inputs(0, dtype)
    x.requires_grad_()
    head.requires_grad_()
    loss_and_grads(loss_name, backend, x, head, class_weight, target, incoming)  # first call: kernels load
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_and_grads(loss_name, backend, x, head, class_weight, target, incoming)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("loss_name, backend, dtype, incoming", CASES, ids=IDS)
def test_a_captured_forward_and_backward_replays_as_eager(loss_name, backend, dtype, incoming):
    """Captured after warm-up calls on a side stream, then replayed on new values copied into the static inputs:
    the loss and gradients equal eager calls on the same values."""
    static = [t.clone() for t in make_inputs(0, dtype)]
    static[0].requires_grad_()
    static[1].requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            loss_and_grads(loss_name, backend, *static, incoming)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_loss, graphed_grads = loss_and_grads(loss_name, backend, *static, incoming)
    for seed in (1, 2):
        fresh = make_inputs(seed, dtype)
        with torch.no_grad():
            for held, value in zip(static, fresh):
                held.copy_(value)
        graph.replay()
        leaves = [fresh[0].requires_grad_(), fresh[1].requires_grad_(), *fresh[2:]]
        eager_loss, eager_grads = loss_and_grads(loss_name, backend, *leaves, incoming)
        torch.cuda.synchronize()
        # the dtype's default tolerances: the GEMMs may take another algorithm under capture
        torch.testing.assert_close(graphed_loss, eager_loss)
        for graphed, eager in zip(graphed_grads, eager_grads):
            torch.testing.assert_close(graphed, eager)
