"""Lion step benchmark: one Lion step (weight decay 0.1), ours against lion-pytorch's Lion (the implementation users
swap out; a per-tensor loop of torch ops) and the same update in torch's foreach ops (the fastest plain-torch
Lion), on the CPU or a CUDA GPU, reported as time, GB/s and % of the device's measured memory roof. torch has no
Lion of its own.

Workload: fp32 params and grads on the GPT-like list of tensors of the AdamW benchmark (`adamw.model_shapes`,
`adamw.make_workload`). Ours: `fused_optim.Lion(..., backend=...)` on each backend that runs here, and again with
`moments="bf16"` and `moments="int8"`. The foreach Lion is the baseline of the × column.

Correctness, before timing: each implementation takes two steps (grads g, then g × -1/2: the second step's
direction 0.9·0.01·g - 0.1·g/2 has the opposite sign of the first's, so a missing or mis-weighted moment shows) and
its params and moments are compared with `fused_optim.reference.ReferenceLion` in float64 within
`CHECK_TOLERANCES`; a wrong one is not timed. With bf16 or int8 moments (rounded stochastically) the moments,
dequantized, are held to `adamw.COMPRESSED_MOMENT_ERROR` in the 2-norm, and the params to the same tolerances but
on up to `FLIPPED_SHARE` of them: the check's second direction 0.009·g - 0.05·g stays far from 0 unless an element's
moment is tiny beside its block's largest, where an int8 code rounds it to 0 or to a whole code step, which can
flip that element's direction (a 2·lr miss; at 33.6 M params about 200 elements, 6e-6 of them).
tests/test_adam_int8_moments.py checks those moments bit for bit.

Bytes model (`lion_step_bytes`), the fewest bytes one step moves per param: read grad + param + exp_avg, write
param + exp_avg: fp32 20 B/param (AdamW's is 28: Lion keeps one moment); bf16 moments 16, int8 14.06 (a bf16 scale
per 64 codes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor

from fused_optim.reference import ReferenceLion
from fused_optim.tools.bench.adamw import (COMPRESSED_MOMENT_ERROR, Runner, Workload, _check_steps, _clone_params,
                                           _human, compare, compressed_moment_runner, make_workload, relative_error)
from fused_optim.tools.bench.peers import (Case, Impl, Kernel, SizesConfig, new_row, not_installed,
                                           our_implementations, run_cases)
from fused_optim.tools.bench.registry import Benchmark

OPS = ("lion",)
HPARAMS = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.1}
CHECK_STEPS = 2
# (rtol, atol) against float64 after two steps: the params move by lr·sign, exact but for the decay's and the
# subtraction's roundings (a few fp32 ulps of |p| ~ 0.02); the moment rounds twice a step.
CHECK_TOLERANCES = {"params": (1e-6, 1e-10), "exp_avgs": (1e-6, 1e-12)}
FLIPPED_SHARE = 1e-4  # of the params, outside CHECK_TOLERANCES, with bf16 or int8 moments (module docstring)
KERNELS = (Kernel("lion_step_", "lion"),)


def lion_step_bytes(numel: int, moment_dtype: torch.dtype = torch.float32) -> int:
    """The fewest bytes one Lion step moves over `numel` fp32 params with `moment_dtype` moments (module docstring).

    >>> lion_step_bytes(1), lion_step_bytes(1, torch.bfloat16), lion_step_bytes(64, torch.int8)
    (20, 16, 900)
    """
    # int8 moments carry a bf16 scale per 64 codes, read and written
    moment = torch.empty((), dtype=moment_dtype).element_size() + (2 / 64 if moment_dtype == torch.int8 else 0)
    read = 4 + 4 + moment  # grad, param, exp_avg
    write = 4 + moment  # param, exp_avg
    return round(numel * (read + write))


def _runner(params: list[Tensor], opt: torch.optim.Optimizer) -> Runner:
    """A runner whose result is the params then their moments (which exist after the first step)."""
    def result() -> list[Tensor]:
        return params + [opt.state[p]["exp_avg"] for p in params]
    return Runner(opt.step, result, lambda: torch.float32, params)


def _ours(backend: str, moments: str = "fp32") -> Callable[[Workload], Runner]:
    def build(w: Workload) -> Runner:
        import fused_optim

        params = _clone_params(w)
        opt = fused_optim.Lion(params, **HPARAMS, moments=moments, backend=backend)
        return _runner(params, opt) if moments == "fp32" else compressed_moment_runner(opt, params, "exp_avg")
    return build


def _lion_pytorch(w: Workload) -> Runner:
    import lion_pytorch

    params = _clone_params(w)
    return _runner(params, lion_pytorch.Lion(params, **HPARAMS))


class ForeachLion(torch.optim.Optimizer):
    """lion-pytorch's update in torch's foreach ops, one group at a time: the fastest Lion in plain torch."""

    def __init__(self, params, lr: float, betas: tuple[float, float], weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
            exp_avgs = [self.state[p]["exp_avg"] for p in params]
            lr, (beta1, beta2) = group["lr"], group["betas"]
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            direction = torch._foreach_mul(exp_avgs, beta1)
            torch._foreach_add_(direction, grads, alpha=1 - beta1)
            torch._foreach_sign_(direction)
            torch._foreach_add_(params, direction, alpha=-lr)
            torch._foreach_mul_(exp_avgs, beta2)
            torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)


def _foreach(w: Workload) -> Runner:
    params = _clone_params(w)
    return _runner(params, ForeachLion(params, **HPARAMS))


def implementations(device: torch.device) -> list[Impl]:
    """The implementations compared on `device`, usable or not (with the reason)."""
    impls = our_implementations(device, _ours, KERNELS, torch_fallback=True)
    for moments in ("bf16", "int8"):  # half and a quarter of the state's bytes
        impls += [replace(impl, name=f"{impl.name} moments={moments}", auto=False) for impl in
                  our_implementations(device, lambda backend, m=moments: _ours(backend, m), KERNELS)]
    impls.append(Impl("torch foreach Lion", _foreach, baseline=True))
    missing = not_installed("lion_pytorch", "lion-pytorch")
    impls.append(Impl("lion-pytorch", None if missing else _lion_pytorch, unavailable=missing))
    return impls


def reference(w: Workload) -> list[Tensor]:
    """The params then the moments after the two checked steps (grads g, then -g/2), by ReferenceLion in float64
    rounded to fp32; one tensor at a time, to keep the float64 copies small."""
    params, exp_avgs = [], []
    for p, g in zip(w.p0, w.grads):
        ref = ReferenceLion([p], **HPARAMS)
        for i in range(CHECK_STEPS):
            ref.step([g * (-0.5) ** i])
        params.append(ref.params[0].float())
        exp_avgs.append(ref.exp_avgs[0].float())
    return params + exp_avgs


def checked_step(impl: Impl, w: Workload, expected: list[Tensor], row: dict[str, Any]) -> Callable[[], Any] | None:
    """Builds `impl` on `w`, runs the two checked steps and compares its params and moments with `expected`
    (`reference(w)`), writing correct, max_abs_err and, when wrong, a note into `row`. Returns the step to time
    (it goes on from the checked state), or None when wrong."""
    runner = impl.build(w)
    _check_steps(runner, CHECK_STEPS, w.device)
    result, n = runner.result(), len(w.p0)
    row["bytes"] = lion_step_bytes(w.numel, runner.state_dtype())
    params_ok, params_err = compare(result[:n], expected[:n], *CHECK_TOLERANCES["params"])
    if runner.tolerance == "compressed_moments":
        moments_err = relative_error(result[n:], expected[n:])
        rtol, atol = CHECK_TOLERANCES["params"]
        flipped = sum(int(((p.double() - e.double()).abs() > atol + rtol * e.double().abs()).sum())
                      for p, e in zip(result[:n], expected[:n]))
        row.update(correct=flipped <= FLIPPED_SHARE * w.numel and moments_err < COMPRESSED_MOMENT_ERROR,
                   max_abs_err=params_err, note=f"moments off by {moments_err:.1%} (2-norm); {flipped} params flipped")
    else:
        moments_ok, moments_err = compare(result[n:], expected[n:], *CHECK_TOLERANCES["exp_avgs"])
        row.update(correct=params_ok and moments_ok, max_abs_err=max(params_err, moments_err))
    if not row["correct"]:
        row["note"] = (f"wrong result (max |error| params {params_err:.3g}, moments {moments_err:.3g} vs float64): "
                       "not timed")
        return None
    return runner.step


@dataclass
class LionConfig(SizesConfig):
    """What `run` measures: one step at each total of `sizes` (fp32 params)."""

    def describe(self) -> dict[str, Any]:
        """The configuration as the JSON report records it."""
        return {"lion": {"sizes": self.sizes, "hparams": HPARAMS, "check_steps": CHECK_STEPS,
                         "tolerances": CHECK_TOLERANCES, "bytes_per_param": lion_step_bytes(1),
                         "budget_s": self.budget_s}}


def count_tasks(config: LionConfig) -> int:
    return len(config.sizes) * (1 + len(implementations(config.device)))


def run(config: LionConfig, roof_gbps: float | None = None,
        on_task: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measures every size × implementation of `config`; one row (a dict) per pair."""
    cases = [functools.partial(_case, config, n_params) for n_params in config.sizes]
    return run_cases(cases, implementations(config.device), config, roof_gbps, on_task)


def _case(config: LionConfig, n_params: int) -> Case:
    w = make_workload("fp32", n_params, config.device, config.seed)
    expected = reference(w)
    return Case(f"lion fp32 {_human(n_params)}", lambda impl: _row(impl, w),
                lambda impl, row: checked_step(impl, w, expected, row), reference="float64 reference")


def _row(impl: Impl, w: Workload) -> dict[str, Any]:
    # bytes: the fp32 moments' model until checked_step knows the implementation's moment dtype
    return new_row("lion", "fp32", impl, w.device, dtype="float32", n_params=w.numel, n_tensors=len(w.p0),
                   bytes=lion_step_bytes(w.numel))


CAPTIONS = {
    "lion": "ms: median time of one Lion step (weight decay 0.1, fp32); GB/s by the bytes model (read grad, param, "
            "moment; write param, moment: 20 B/param, 16 with bf16 moments, 14.06 with int8); % of the roof; "
            "× = the torch foreach Lion's time / this one's; vs peers: ours' speed-up over each; peak mem (GPU): what "
            "a step allocates beyond its state.",
}


BENCHMARK = Benchmark(ops=OPS, configure=LionConfig.from_request, count_tasks=count_tasks, run=run)
