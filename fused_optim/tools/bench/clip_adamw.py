"""Clip + unscale + AdamW benchmark: the optimizer side of a mixed-precision training step with gradient clipping,
ours against torch's sequence, on the CPU or a CUDA GPU.

  ours    `fused_optim.AdamW(params, max_grad_norm=1.0)` stepped by `fused_optim.GradScaler`: the scale is folded into
          the step, and the step takes one pass over the grads for the global norm (which is also the inf/NaN
          check), then the update pass. Measured on each of our backends that runs here (one whose total_norm or
          adam kernel is not registered yet is shown as absent, and then ours on the torch backend is measured).
  torch   `scaler.unscale_(opt)`, `torch.nn.utils.clip_grad_norm_(params, 1.0)`, `scaler.step(opt)`,
          `scaler.update()` with torch.amp.GradScaler and torch.optim.AdamW(fused=True) (on a device without
          torch's fused AdamW, foreach=True): the baseline of the × column.

What is timed: one `scaler.step(opt); scaler.update()` (ours) or the four calls above (torch), the grads already
in `p.grad` (fp32 params, grads and state; GPT-like tensor list, `adamw.model_shapes`). The timed calls must not
change the grads (torch's sequence writes them in place), so they run with scale 1 and grads whose global norm
(0.5) is under max_norm: every pass still runs — torch multiplies by 1/scale and by the clip coefficient 1.0 —
and each call reads the same grads. The clipping and the unscaling are checked before, with scale 2^10, on two
steps: grads of norm ~4 (clipped by ~1/4), then those grads × -1/8 (norm ~0.5: not clipped). Two, because Adam's
first update barely depends on a uniform factor on the grads (m̂/√v̂), so one step would not show a missing clip
or unscale; across two steps with different clip coefficients it does (and a missing unscale clips the second).

Bytes model (`clip_adamw_bytes`), the fewest bytes such a step moves: the grads read twice (the norm, the update)
+ param, exp_avg and exp_avg_sq each read and written: fp32 32 B/param. Every row's GB/s uses it; torch's sequence
moves more (the unscale reads and writes the grads, the clip reads them twice and writes them once).

Correctness, before timing: each implementation's params after the checked step are compared with
`fused_optim.reference.ReferenceAdam` in float64 (grads unscaled and clipped with the float64 global norm), within
`CHECK_TOLERANCES`; a wrong one is reported as wrong and not timed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from fused_optim.tools.bench.adamw import HPARAMS, _human, compare, model_shapes
from fused_optim.tools.bench.peers import (Case, Impl, Kernel, SizesConfig, new_row, our_implementations, run_cases,
                                    torch_fused_supported)
from fused_optim.reference import ReferenceAdam
from fused_optim.tools.bench.registry import Benchmark

OPS = ("clip_adamw",)
MAX_GRAD_NORM = 1.0
CHECK_SCALE = 2.0**10  # the loss scale of the checked step (a power of two: the scaled grads are exact)
CHECK_NORM = 4.0  # about the unscaled global grad norm of the first checked step: clipped by ~1/4
# The factors on the unscaled grads of the two checked steps: the second's norm is ~0.5 (under max_norm). Powers of
# two: the scaled grads are exact. The timed steps run with scale 1 and grads × 1/8 (norm ~0.5).
CHECK_FACTORS = (1.0, -(2.0**-3))
# (rtol, atol) of the params after the two checked steps: atol is a thousandth of one update (lr). torch's CPU fused
# AdamW orders the update's operations differently; over 84 M params its worst element after two steps was 6.5e-7
# off the float64 result (gradients near eps make the update sensitive). A missing clip or unscale is off by ~lr.
CHECK_TOLERANCES = (1e-5, 1e-3 * HPARAMS["lr"])
TIMED_GRAD_FACTOR = 2.0**-3
NEVER = 2**62  # GradScaler growth_interval: the scale stays where it starts
KERNELS = (Kernel("adam_step_", "adam"), Kernel("total_norm", "total_norm"))


def clip_adamw_bytes(n_params: int) -> int:
    """The fewest bytes clip + unscale + AdamW moves over `n_params` fp32 params (module docstring).

    >>> clip_adamw_bytes(1)
    32
    """
    grad_reads = 2 * 4
    param_and_state = 3 * (4 + 4)  # param, exp_avg, exp_avg_sq: read and written
    return n_params * (grad_reads + param_and_state)


@dataclass
class Workload:
    """The initial params and the unscaled grads of the first checked step (read-only: every implementation steps
    copies)."""

    device: torch.device
    p0: list[Tensor]
    grads: list[Tensor]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.p0)


def make_workload(n_params: int, device: torch.device, seed: int = 0) -> Workload:
    shapes = model_shapes(n_params)
    generator = torch.Generator(device=device).manual_seed(seed)
    grad_std = CHECK_NORM / math.sqrt(n_params)
    p0 = [torch.randn(s, generator=generator, device=device) * 0.02 for s in shapes]  # GPT-2's init scale
    grads = [torch.randn(s, generator=generator, device=device) * grad_std for s in shapes]
    return Workload(device, p0, grads)


def _params(w: Workload, grad_factor: float) -> list[Tensor]:
    """Copies of the params, each with its own grad = unscaled grad × `grad_factor` (a power of two: exact)."""
    params = [p.clone() for p in w.p0]
    for p, g in zip(params, w.grads):
        p.grad = g * grad_factor
    return params


def _scaler(scaler_class: type, device: torch.device, scale: float) -> torch.amp.GradScaler:
    scaler = scaler_class(device.type, init_scale=scale, growth_interval=NEVER)
    scaler.scale(torch.ones((), device=device))  # makes its scale tensor (step() asserts it was used)
    return scaler


# A runner: build(workload, scale, grad_factor) → (step, params).
def _ours(backend: str) -> Callable:
    def build(w: Workload, scale: float, grad_factor: float):
        import fused_optim

        params = _params(w, grad_factor)
        scaler = _scaler(fused_optim.GradScaler, w.device, scale)
        opt = fused_optim.AdamW(params, **HPARAMS, max_grad_norm=MAX_GRAD_NORM, backend=backend)

        def step():
            scaler.step(opt)
            scaler.update()
        return step, params
    return build


def _torch_sequence(**options) -> Callable:
    def build(w: Workload, scale: float, grad_factor: float):
        params = _params(w, grad_factor)
        scaler = _scaler(torch.amp.GradScaler, w.device, scale)
        opt = torch.optim.AdamW(params, **HPARAMS, **options)

        def step():
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            scaler.step(opt)
            scaler.update()
        return step, params
    return build


def implementations(device: torch.device) -> list[Impl]:
    """The implementations compared on `device`, usable or not (with the reason)."""
    impls = our_implementations(device, _ours, KERNELS, torch_fallback=True)
    if torch_fused_supported(torch.optim.AdamW, device):
        impls.append(Impl("torch unscale_ + clip_grad_norm_ + fused AdamW", _torch_sequence(fused=True),
                          baseline=True))
    else:
        impls.append(Impl("torch unscale_ + clip_grad_norm_ + foreach AdamW", _torch_sequence(foreach=True),
                          baseline=True))
    return impls


def reference_params(w: Workload) -> list[Tensor]:
    """The params after the two checked steps, by ReferenceAdam in float64 (rounded to fp32): each step's grads
    unscaled and clipped by min(1, max_norm / (norm + 1e-6)) as torch's clip_grad_norm_. One tensor at a time, to
    keep the float64 copies small."""
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in w.grads))
    grad_scales = [CHECK_SCALE / min(1.0, MAX_GRAD_NORM / (norm * abs(factor) + 1e-6)) for factor in CHECK_FACTORS]
    result = []
    for p, g in zip(w.p0, w.grads):
        ref = ReferenceAdam([p], **HPARAMS, decoupled_weight_decay=True)
        for factor, grad_scale in zip(CHECK_FACTORS, grad_scales):
            ref.step([g * (factor * CHECK_SCALE)], grad_scale=grad_scale)
        result.append(ref.params[0].float())
    return result


def checked_step(impl: Impl, w: Workload, expected: list[Tensor], row: dict[str, Any]) -> Callable[[], None] | None:
    """Builds `impl` on `w`, runs the two checked steps and compares the params with `expected`
    (`reference_params(w)`), writing correct, max_abs_err and, when wrong, a note into `row`. Returns a fresh
    build's step to time (scale 1, grads of norm ~0.5), or None when wrong."""
    first, second = CHECK_FACTORS
    step, params = impl.build(w, CHECK_SCALE, first * CHECK_SCALE)
    step()
    for p, g in zip(params, w.grads):  # torch's sequence unscaled and clipped its grads in place
        torch.mul(g, second * CHECK_SCALE, out=p.grad)
    step()
    ok, err = compare(params, expected, *CHECK_TOLERANCES)
    row.update(correct=ok, max_abs_err=err)
    if not ok:
        row["note"] = f"wrong result (max |error| {err:.3g} vs float64): not timed"
        return None
    del step, params
    step, _ = impl.build(w, 1.0, TIMED_GRAD_FACTOR)
    return step


@dataclass
class ClipAdamWConfig(SizesConfig):
    """What `run` measures: one step at each total of `sizes` (params)."""

    def describe(self) -> dict[str, Any]:
        """The configuration as the JSON report records it."""
        return {"clip_adamw": {"sizes": self.sizes, "hparams": HPARAMS, "max_grad_norm": MAX_GRAD_NORM,
                               "check_scale": CHECK_SCALE,
                               "check_grad_norms": [CHECK_NORM * abs(f) for f in CHECK_FACTORS],
                               "timed_grad_norm": CHECK_NORM * TIMED_GRAD_FACTOR, "timed_scale": 1.0,
                               "tolerances": CHECK_TOLERANCES, "bytes_per_param": clip_adamw_bytes(1),
                               "budget_s": self.budget_s}}


def count_tasks(config: ClipAdamWConfig) -> int:
    return len(config.sizes) * (1 + len(implementations(config.device)))


def run(config: ClipAdamWConfig, roof_gbps: float | None = None,
        on_task: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measures every size × implementation of `config`; one row (a dict) per pair."""
    cases = [functools.partial(_case, config, n_params) for n_params in config.sizes]
    return run_cases(cases, implementations(config.device), config, roof_gbps, on_task)


def _case(config: ClipAdamWConfig, n_params: int) -> Case:
    w = make_workload(n_params, config.device, config.seed)
    expected = reference_params(w)
    return Case(f"clip_adamw fp32 {_human(n_params)}", lambda impl: _row(impl, w),
                lambda impl, row: checked_step(impl, w, expected, row), reference="float64 reference")


def _row(impl: Impl, w: Workload) -> dict[str, Any]:
    return new_row("clip_adamw", "fp32", impl, w.device, dtype="float32", n_params=w.numel, n_tensors=len(w.p0),
                   bytes=clip_adamw_bytes(w.numel))


CAPTIONS = {
    "clip_adamw": "ms: median time of the optimizer side of a step with loss scaling and clipping to norm 1 (ours: "
                  "GradScaler step + update of AdamW(max_grad_norm=1); torch: unscale_ + clip_grad_norm_ + "
                  "step + update); GB/s by the bytes model (grads read twice + param, exp_avg, exp_avg_sq read "
                  "and written: 32 B/param); % of the roof; × = torch's sequence's time / this one's; peak mem "
                  "(GPU): what a step allocates beyond its state.",
}


BENCHMARK = Benchmark(ops=OPS, configure=ClipAdamWConfig.from_request, count_tasks=count_tasks, run=run)
