"""SGD step benchmark: one SGD step with momentum 0.9 (no Nesterov, no weight decay), ours against torch's fused,
foreach and for-loop SGD (on a GPU also `torch.compile` of torch's foreach SGD step, and apex's FusedSGD; its row
says "absent" when apex is not installed), on the CPU or a CUDA GPU, reported as time, GB/s and % of the device's
measured memory roof.

Workload: fp32 params and grads on the GPT-like list of tensors of the AdamW benchmark (`adamw.model_shapes`,
`adamw.make_workload`). Ours: `fused_optim.SGD(..., backend=...)` on each backend that runs here (one whose
sgd_step_ kernel is not registered is shown as absent, and then ours on the torch backend is measured), and again
with `moments="bf16"` and `moments="int8"` momentum buffers. torch's
fused SGD is the baseline of the × column where torch has it on the device, else its foreach SGD.

Correctness, before timing: each implementation takes two steps (grads g, then g × -1/2: the second step's buffer
0.9·g - g/2 differs from the grad, so a missing momentum shows) and its params and momentum buffers are compared
with `fused_optim.reference.ReferenceSGD` in float64 within `CHECK_TOLERANCES`; a wrong one is not timed. bf16
and int8 buffers (rounded stochastically) move the params by their rounding: the params are held to the whole
update (`adamw.update_error` under `adamw.INT8_UPDATE_ERROR`, as the AdamW benchmark's 8-bit rows) and the
buffers, dequantized, to `adamw.COMPRESSED_MOMENT_ERROR` in the 2-norm; tests/test_adam_int8_moments.py checks
them bit for bit.

Bytes model (`sgd_step_bytes`), the fewest bytes one step moves per param: read grad + param + momentum buffer,
write param + momentum buffer: fp32 20 B/param, bf16 buffers 16, int8 14.06 (a bf16 scale per 64 codes); bf16
params with an int8 buffer and 24-bit masters (a 1-byte remainder read and written beside each) 10.06.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor

from fused_optim.tools.bench.adamw import (COMPRESSED_MOMENT_ERROR, INT8_UPDATE_ERROR, Runner, Workload, _check_steps,
                                           _clone_params, _human, compare, compressed_moment_runner, make_workload,
                                           relative_error, update_error)
from fused_optim.tools.bench.peers import (Case, Impl, Kernel, SizesConfig, apex_peer, compile_step, new_row,
                                     our_implementations, run_cases, torch_fused_supported)
from fused_optim.reference import ReferenceSGD
from fused_optim.tools.bench.registry import Benchmark

OPS = ("sgd",)
# lr 0.01: a missing momentum moves the params by 0.9·lr·|g| ~ 1e-5 on the second step, a thousand times the
# params' tolerance.
HPARAMS = {"lr": 1e-2, "momentum": 0.9, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
CHECK_STEPS = 2
# (rtol, atol) against float64 after two steps. A step rounds the buffer twice (0.9·buf, + grad; the cancellation
# 0.9·g - g/2 makes that ~2 ulps of the result) and the param once or twice: ~16 fp32 ulps allowed. atol covers
# params that cancel to ~0 (|p| ~ lr·|buf| ~ 1e-5, whose ulp is ~1e-12).
CHECK_TOLERANCES = {"params": (1e-6, 1e-11), "momentum_buffers": (1e-6, 1e-12)}
KERNELS = (Kernel("sgd_step_", "sgd"),)


def sgd_step_bytes(numel: int, buffer_dtype: torch.dtype = torch.float32, param_dtype: torch.dtype = torch.float32,
                   master_bytes: int = 0) -> int:
    """The fewest bytes one SGD-with-momentum step moves over `numel` params of `param_dtype` (and grads of it) with
    `buffer_dtype` momentum buffers (module docstring); `master_bytes` as adam_step_bytes's (4: an fp32 master copy
    read instead of the param, 2 or 1: a remainder read beside it).

    >>> sgd_step_bytes(1), sgd_step_bytes(1, torch.bfloat16), sgd_step_bytes(64, torch.int8)
    (20, 16, 900)
    >>> sgd_step_bytes(64, torch.int8, torch.bfloat16, master_bytes=1)
    644
    """
    param = torch.empty((), dtype=param_dtype).element_size()
    # int8 buffers carry a bf16 scale per 64 codes, read and written
    buffer = torch.empty((), dtype=buffer_dtype).element_size() + (2 / 64 if buffer_dtype == torch.int8 else 0)
    read = param + buffer + (master_bytes if master_bytes == 4 else param + master_bytes)  # grad, buffer, param
    write = param + buffer + master_bytes  # param, momentum buffer, master
    return round(numel * (read + write))


def _runner(params: list[Tensor], opt: torch.optim.Optimizer) -> Runner:
    """A runner whose result is the params then their momentum buffers (the buffers exist after the first step)."""
    def result() -> list[Tensor]:
        return params + [opt.state[p]["momentum_buffer"] for p in params]
    return Runner(opt.step, result, lambda: torch.float32, params)


def _ours(backend: str, moments: str = "fp32") -> Callable[[Workload], Runner]:
    def build(w: Workload) -> Runner:
        import fused_optim

        params = _clone_params(w)
        opt = fused_optim.SGD(params, **HPARAMS, moments=moments, backend=backend)
        if moments == "fp32":
            return _runner(params, opt)
        return compressed_moment_runner(opt, params, "momentum_buffer")
    return build


def _torch(**options) -> Callable[[Workload], Runner]:
    """torch.optim.SGD with `options` (fused=True, foreach=True or foreach=False)."""
    def build(w: Workload) -> Runner:
        params = _clone_params(w)
        return _runner(params, torch.optim.SGD(params, **HPARAMS, **options))
    return build


def _compiled(w: Workload) -> Runner:
    """torch.compile(opt.step) of torch's foreach SGD, compiled before the check (peers.compile_step)."""
    params = _clone_params(w)
    opt = torch.optim.SGD(params, **HPARAMS, foreach=True)
    runner = _runner(params, opt)
    runner.step = compile_step(opt.step, params, w.p0, opt.state)
    return runner


def _apex(fused_sgd: type) -> Callable[[Workload], Runner]:
    def build(w: Workload) -> Runner:
        params = _clone_params(w)
        return _runner(params, fused_sgd(params, **HPARAMS))
    return build


def implementations(device: torch.device) -> list[Impl]:
    """The implementations compared on `device`, usable or not (with the reason)."""
    impls = our_implementations(device, _ours, KERNELS, torch_fallback=True)
    for moments in ("bf16", "int8"):  # half and a quarter of the buffers' bytes
        impls += [replace(impl, name=f"{impl.name} moments={moments}", auto=False) for impl in
                  our_implementations(device, lambda backend, m=moments: _ours(backend, m), KERNELS)]
    fused = torch_fused_supported(torch.optim.SGD, device)
    if fused:
        impls.append(Impl("torch fused", _torch(fused=True), baseline=True))
    else:
        impls.append(Impl("torch fused", None,
                          unavailable=f"absent (torch {torch.__version__} has no fused SGD on {device.type})"))
    impls.append(Impl("torch foreach", _torch(foreach=True), baseline=not fused))
    if device.type == "cuda":  # on the CPU the compile takes long
        impls.append(Impl("torch.compile foreach", _compiled))
    impls.append(Impl("torch for-loop", _torch(foreach=False)))
    apex = apex_peer("apex FusedSGD", "FusedSGD", device, _apex)
    if apex is not None:
        impls.append(apex)
    return impls


def reference(w: Workload) -> list[Tensor]:
    """The params then the momentum buffers after the two checked steps (grads g, then -g/2), by ReferenceSGD in
    float64 rounded to fp32; one tensor at a time, to keep the float64 copies small."""
    params, buffers = [], []
    for p, g in zip(w.p0, w.grads):
        ref = ReferenceSGD([p], **HPARAMS)
        for i in range(CHECK_STEPS):
            ref.step([g * (-0.5) ** i])
        params.append(ref.params[0].float())
        buffers.append(ref.momentum_buffers[0].float())
    return params + buffers


def checked_step(impl: Impl, w: Workload, expected: list[Tensor], row: dict[str, Any]) -> Callable[[], Any] | None:
    """Builds `impl` on `w`, runs the two checked steps and compares its params and momentum buffers with
    `expected` (`reference(w)`), writing correct, max_abs_err and, when wrong, a note into `row`. Returns the step
    to time (it goes on from the checked state), or None when wrong."""
    runner = impl.build(w)
    _check_steps(runner, CHECK_STEPS, w.device)
    result, n = runner.result(), len(w.p0)
    row["bytes"] = sgd_step_bytes(w.numel, runner.state_dtype())
    if runner.tolerance == "compressed_moments":
        update_err = update_error(result[:n], expected[:n], w.p0)
        buffers_err = relative_error(result[n:], expected[n:])
        row.update(correct=update_err < INT8_UPDATE_ERROR and buffers_err < COMPRESSED_MOMENT_ERROR,
                   update_error=update_err,
                   note=f"update off by {update_err:.1%}, buffers by {buffers_err:.1%} (2-norm)")
        if not row["correct"]:
            row["note"] = f"wrong result ({row['note']} vs float64): not timed"
            return None
        return runner.step
    params_ok, params_err = compare(result[:n], expected[:n], *CHECK_TOLERANCES["params"])
    buffers_ok, buffers_err = compare(result[n:], expected[n:], *CHECK_TOLERANCES["momentum_buffers"])
    row.update(correct=params_ok and buffers_ok, max_abs_err=max(params_err, buffers_err))
    if not row["correct"]:
        row["note"] = (f"wrong result (max |error| params {params_err:.3g}, momentum buffers {buffers_err:.3g} vs "
                       "float64): not timed")
        return None
    return runner.step


@dataclass
class SGDConfig(SizesConfig):
    """What `run` measures: one step at each total of `sizes` (fp32 params)."""

    def describe(self) -> dict[str, Any]:
        """The configuration as the JSON report records it."""
        return {"sgd": {"sizes": self.sizes, "hparams": HPARAMS, "check_steps": CHECK_STEPS,
                        "tolerances": CHECK_TOLERANCES, "bytes_per_param": sgd_step_bytes(1),
                        "budget_s": self.budget_s}}


def count_tasks(config: SGDConfig) -> int:
    return len(config.sizes) * (1 + len(implementations(config.device)))


def run(config: SGDConfig, roof_gbps: float | None = None,
        on_task: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measures every size × implementation of `config`; one row (a dict) per pair."""
    cases = [functools.partial(_case, config, n_params) for n_params in config.sizes]
    return run_cases(cases, implementations(config.device), config, roof_gbps, on_task)


def _case(config: SGDConfig, n_params: int) -> Case:
    w = make_workload("fp32", n_params, config.device, config.seed)
    expected = reference(w)
    return Case(f"sgd fp32 {_human(n_params)}", lambda impl: _row(impl, w),
                lambda impl, row: checked_step(impl, w, expected, row), reference="float64 reference")


def _row(impl: Impl, w: Workload) -> dict[str, Any]:
    # bytes: the fp32 buffers' model until checked_step knows the implementation's buffer dtype
    return new_row("sgd", "fp32", impl, w.device, dtype="float32", n_params=w.numel, n_tensors=len(w.p0),
                   bytes=sgd_step_bytes(w.numel))


CAPTIONS = {
    "sgd": "ms: median time of one SGD step (momentum 0.9, fp32); GB/s by the bytes model (read grad, param, "
           "momentum buffer; write param, momentum buffer: 20 B/param, 16 with bf16 buffers, 14.06 with int8); "
           "% of the roof; × = torch fused's time "
           "(foreach where torch has no fused SGD here) / this one's; vs peers: ours' speed-up over each; peak mem "
           "(GPU): what a step allocates beyond its state.",
}


BENCHMARK = Benchmark(ops=OPS, configure=SGDConfig.from_request, count_tasks=count_tasks, run=run)
