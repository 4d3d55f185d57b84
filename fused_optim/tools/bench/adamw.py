"""AdamW and Adam step benchmarks: ours against torch's fused, foreach and for-loop AdamW (op "adamw") or Adam (op
"adam": the same step with coupled L2 weight decay, `ADAM`; no bf16 case), and DeepSpeed's CPUAdam on the CPU,
apex's FusedAdam on a GPU, each in the matching mode (a row says "absent" when one is not installed), and on a GPU
`torch.compile` of torch's foreach step (but in the host case); on the CPU or a CUDA GPU, reported as time, GB/s
and % of the device's measured memory roof. The two ops share everything here but the `Variant`.

Cases (each on a GPT-like list of tensors, `model_shapes`):
  fp32          fp32 params, grads and state.
  bf16          bf16 params and grads. Our state is fp32; torch keeps its state in the param dtype (bf16), so it
                moves fewer bytes and does its arithmetic on bf16 moments: the bytes model follows each one's state.
  bf16+master   bf16 params and grads with fp32 master weights. Ours: `AdamW(..., master_weights=True)`, one pass.
                Peer, "the torch way": fp32 masters stepped by torch's fused AdamW, grads up-cast before
                (`torch._foreach_copy_` into persistent fp32 grads, or `.float()` each step) and the params copied
                back after (`torch._foreach_copy_(bf16_params, fp32_masters)`).
  (fp32 and bf16 also run ours with `moments="bf16"` and `moments="int8"`: half and a quarter of the state's
  bytes, checked coarsely against the fp32 reference, `TOLERANCES["bf16_moments"]` and `["int8_moments"]`;
  tests/test_adam_moments.py and test_adam_int8_moments.py check them bit for bit. The op "adamw" also runs
  torchao's and bitsandbytes' AdamW8bit there, where installed.)
  host          1000 fp32 tensors of 4096 elements: what matters when a model has many small params. On a GPU
                the host time per step (Python, dispatch, launches; no sync) beside the device time; on the
                CPU the step time is all there is.

Before it is timed, every implementation is stepped `check_steps` times (the grads scaled by -1/2 between steps)
and compared with torch's for-loop AdamW or Adam (`foreach=False`) stepped on the same input (for bf16+master: on fp32
copies of the params with up-cast grads, compared on the fp32 masters). A wrong result is reported as wrong and
not timed. The masters and fp32 params are held to a few ulps; bf16 params only to an ulp or two (`TOLERANCES`).

Bytes model (`adam_step_bytes`), the fewest bytes one step must move, per element:
    read   grad + exp_avg + exp_avg_sq [+ max_exp_avg_sq] + (an fp32 master copy, or the param [+ its remainder])
    write  param + exp_avg + exp_avg_sq [+ max_exp_avg_sq] [+ master copy or remainder]
each at its own dtype: fp32 = 16 read + 12 written = 28 B/param; bf16 params with fp32 state = 12 + 10 = 22;
bf16 with fp32 state and an fp32 master copy (the torch way) = 14 + 14 = 28, with our 2-byte master remainder
14 + 12 = 26; torch's bf16 (bf16 state) = 8 + 6 = 14. GB/s is this model over
the median time: an implementation that moves more (temporaries, several passes) shows as fewer GB/s.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import Tensor

from fused_optim.int8_moments import dequantize
from fused_optim.master_remainder import join_master
from fused_optim.tools.bench.peers import Impl, apex_peer, compile_step, not_installed, our_implementations
from fused_optim.tools.bench.registry import Benchmark, Request
from fused_optim.tools.bench.timing import error_note, release_memory, Timing, host_time, synchronize, time_fn

CASES = ("fp32", "bf16", "bf16+master", "host")
HOST_SHAPES = [(4096,)] * 1000
# lr, betas, eps, weight decay of the benchmark. weight_decay=0.1 (an LLM's) also makes a missing or wrong decay
# visible to the check: lr·wd = 1e-4 relative per step, far above its 1e-5 tolerance.
HPARAMS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}
# Tolerances (rtol, atol) of the check against torch's for-loop; params ~ 0.02 (GPT init), updates ~ lr.
# fp32: a few ulps apart (order of operations). bf16: torch rounds its bf16 moments and intermediates, ours keeps
# them fp32, so the params may be an ulp or two apart (bf16 ulp = 2^-8 relative) — a coarse check; the fp32 case
# and the masters of bf16+master check the math. A bf16 param rounded from a master: one ulp of the reference.
# bf16 moments (moments="bf16"): each moment is off by up to 2^-9 relative after its stochastic rounding, so each
# update by up to ~2^-8 of lr (1e-3): a coarse check of the update's size and sign, beside the bit-exact tests.
TOLERANCES = {"fp32": (1e-5, 1e-7), "bf16": (1.6e-2, 1e-4), "bf16_rounded": (8e-3, 1e-8), "bf16_moments": (1e-5, 2e-5)}
# int8 moments (ours moments="int8", torchao's and bitsandbytes' AdamW8bit): a moment is off by ~1.5 % at the top of
# its block and by much more for its block's small elements, whose second update (after the check's grad flip) can
# even change sign; so these are held to the whole update instead: |result - reference| over |reference - start|,
# in the 2-norm over every param, under INT8_UPDATE_ERROR (a wrong scale or sign is off by ~1 or more).
INT8_UPDATE_ERROR = 0.1
# Adam (coupled decay) folds wd·p into the grad before the moments: on some elements g + wd·p cancels to ~eps, where
# one rounding of that sum (up to ~1e-9 for |wd·p| ~ 1e-2) moves the update g/(|g| + eps) by up to lr·1e-9/eps =
# lr/10; two correct fp32 implementations differ there by that much (seen: 5e-6 in the 1000-tensor case). The
# check's atol for "adam" is that bound: still far under what a missing or decoupled decay or a wrong bias
# correction moves (~lr on most elements).
COUPLED_DECAY_ATOL = 0.1 * HPARAMS["lr"]


def tolerance(kind: str, variant: Variant) -> tuple[float, float]:
    """(rtol, atol) of `TOLERANCES[kind]` for `variant` (atol at least COUPLED_DECAY_ATOL for Adam)."""
    rtol, atol = TOLERANCES[kind]
    return rtol, atol if variant.decoupled_weight_decay else max(atol, COUPLED_DECAY_ATOL)


@dataclass(frozen=True)
class Variant:
    """Which Adam the benchmark steps: the op's name, the class's name in fused_optim and torch.optim, whether the
    weight decay is decoupled (AdamW: p -= lr·wd·p) or coupled L2 (Adam: grad += wd·p), and the cases it runs."""

    op: str
    class_name: str
    decoupled_weight_decay: bool
    cases: tuple[str, ...] = CASES

    def ours(self) -> type:
        import fused_optim

        return getattr(fused_optim, self.class_name)

    def torch_class(self) -> type:
        return getattr(torch.optim, self.class_name)


ADAMW = Variant("adamw", "AdamW", decoupled_weight_decay=True)
# Adam has no bf16 case: torch's bf16 reference folds wd·p into the grad in bf16, where g + wd·p cancels to ~eps on
# some elements after a bf16 rounding (~4e-6 here) that moves the update by up to lr, an ulp of the bf16 param: the
# check cannot tell right from wrong there (torch's own fused Adam fails it). bf16+master does its math in fp32.
ADAM = Variant("adam", "Adam", decoupled_weight_decay=False, cases=("fp32", "bf16+master", "host"))
VARIANTS = {v.op: v for v in (ADAMW, ADAM)}


def adam_step_bytes(numel: int, param_dtype: torch.dtype, grad_dtype: torch.dtype | None = None,
                    state_dtype: torch.dtype = torch.float32, master_bytes: int = 0, amsgrad: bool = False) -> int:
    """The fewest bytes one Adam/AdamW step moves over `numel` elements (module docstring); `master_bytes`: 4 for an
    fp32 master copy (read instead of the param), 2 for a master remainder (read beside the param), 0 for none.

    >>> adam_step_bytes(1, torch.float32)
    28
    >>> adam_step_bytes(1, torch.bfloat16, master_bytes=4), adam_step_bytes(1, torch.bfloat16, master_bytes=2)
    (28, 26)
    """
    param = torch.empty((), dtype=param_dtype).element_size()
    grad = torch.empty((), dtype=grad_dtype or param_dtype).element_size()
    # int8 moments carry a bf16 scale per 64 codes (ours; torchao's and bitsandbytes' fp32 one per 256 is half that,
    # so their rows are charged 0.4 % more bytes than they move)
    moment = torch.empty((), dtype=state_dtype).element_size() + (2 / 64 if state_dtype == torch.int8 else 0)
    state = moment * (3 if amsgrad else 2)
    read = grad + state + (master_bytes if master_bytes == 4 else param + master_bytes)
    write = param + state + master_bytes
    return round(numel * (read + write))


def model_shapes(n_params: int) -> list[tuple[int, ...]]:
    """A GPT-2-like list of param shapes totalling exactly `n_params`: a few large tensors (the token embedding,
    the MLP weights) and many small ones (biases, LayerNorms).

    Width d: 768 up to ~250M params, 1024 up to ~800M, else 2048, never more than sqrt(n/48) (so small totals
    still get several layers). Per layer: qkv (3d, d) + (3d,), out (d, d) + (d,), fc (4d, d) + (4d,),
    proj (d, 4d) + (d,), two LayerNorms 2 × ((d,), (d,)) = 12d² + 13d. Layers take ~55% of the total, the
    embedding (rows, d) the rest, then a final LayerNorm and one vector for the remainder.

    >>> sum(math.prod(s) for s in model_shapes(84_000_000))
    84000000
    """
    if n_params < 64:
        return [(n_params,)]
    d = 768 if n_params < 250e6 else 1024 if n_params < 800e6 else 2048
    d = max(8, min(d, int(math.sqrt(n_params / 48))))
    per_layer = 12 * d * d + 13 * d
    layers = max(1, int(0.55 * n_params / per_layer))
    while layers > 0 and layers * per_layer + 2 * d + d > n_params:
        layers -= 1
    rest = n_params - layers * per_layer - 2 * d
    shapes: list[tuple[int, ...]] = [(rest // d, d)] if rest >= d else []
    for _ in range(layers):
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    shapes += [(d,), (d,)]
    if rest % d:
        shapes.append((rest % d,))
    assert sum(math.prod(s) for s in shapes) == n_params
    return shapes


@dataclass
class Workload:
    """One case's inputs: initial params and grads (read-only; every implementation steps clones of the params)."""

    case: str
    device: torch.device
    dtype: torch.dtype
    master: bool
    p0: list[Tensor]
    grads: list[Tensor]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.p0)


def make_workload(case: str, n_params: int, device: torch.device, seed: int = 0) -> Workload:
    shapes = HOST_SHAPES if case == "host" else model_shapes(n_params)
    dtype = torch.float32 if case in ("fp32", "host") else torch.bfloat16
    generator = torch.Generator(device=device).manual_seed(seed)
    def randn(shape, scale):
        return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)
    p0 = [randn(s, 0.02) for s in shapes]  # GPT-2's init scale
    grads = [randn(s, 1e-3) for s in shapes]
    return Workload(case, device, dtype, case == "bf16+master", p0, grads)


class Runner:
    """One implementation set up on a workload: `step()` runs one optimizer step; `result()` the tensors compared
    with the reference (the fp32 masters with master weights, else the params)."""

    def __init__(self, step: Callable[[], Any], result: Callable[[], list[Tensor]],
                 state_dtype: Callable[[], torch.dtype], params: list[Tensor], master_bytes: int = 4,
                 tolerance: str | None = None) -> None:
        self.step, self.result, self.state_dtype, self.params = step, result, state_dtype, params
        self.master_bytes = master_bytes  # per param, with master weights: an fp32 copy's 4, a remainder's 2
        self.tolerance = tolerance  # a TOLERANCES key for fp32 params in place of "fp32" (bf16 moments)
        self.grads = [p.grad for p in params]  # what its step reads (the check varies them between steps)


def compressed_moment_runner(opt: torch.optim.Optimizer, params: list[Tensor], key: str) -> Runner:
    """A runner of an optimizer with one bf16 or int8 moment per param (state `key`: Lion's and SGD's
    moments="bf16" / "int8"), whose result is the params, then the moments as fp32 (int8 codes dequantized)."""
    def result() -> list[Tensor]:
        states = [opt.state[p] for p in params]
        return params + [dequantize(s[key], s["moment_scales"][0]) if "moment_scales" in s else s[key].float()
                         for s in states]
    return Runner(opt.step, result, lambda: opt.state[params[0]][key].dtype, params, tolerance="compressed_moments")


def _clone_params(w: Workload, dtype: torch.dtype | None = None) -> list[Tensor]:
    params = [p.to(dtype or p.dtype, copy=True) for p in w.p0]
    for p, g in zip(params, w.grads):
        p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
    return params


def _ours(backend: str, variant: Variant = ADAMW, moments: str = "fp32") -> Callable[[Workload], Runner]:
    def build(w: Workload) -> Runner:
        params = _clone_params(w)
        opt = variant.ours()(params, **HPARAMS, master_weights=w.master, moments=moments, backend=backend)
        if w.master:  # bf16 params: each master is the param and its int16 remainder
            def result():
                return [join_master(p.detach(), opt.state[p]["master_remainder"]) for p in params]
        else:
            def result():
                return params
        return Runner(opt.step, result, lambda: opt.state[params[0]]["exp_avg"].dtype, params, master_bytes=2,
                      tolerance={"bf16": "bf16_moments", "int8": "int8_moments"}.get(moments))
    return build


def _eight_bit(make: Callable[[list[Tensor]], Any]) -> Callable[[Workload], Runner]:
    """A peer's 8-bit AdamW (torchao's, bitsandbytes'), `make(params)`: moments in int8 codes with block scales."""
    def build(w: Workload) -> Runner:
        params = _clone_params(w)
        opt = make(params)
        return Runner(opt.step, lambda: params, lambda: torch.int8, params, tolerance="int8_moments")
    return build


def _torchao_adamw8bit(params: list[Tensor]):
    from torchao.optim import AdamW8bit

    return AdamW8bit(params, **HPARAMS)


def _bnb_adamw8bit(params: list[Tensor]):
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(params, **HPARAMS, min_8bit_size=0)  # every tensor 8-bit, as ours


def _torch(variant: Variant = ADAMW, **options) -> Callable[[Workload], Runner]:
    """torch.optim.AdamW (or Adam) with `options` (fused=True, foreach=True or foreach=False); state in the param
    dtype."""
    def build(w: Workload) -> Runner:
        # The for-loop reference of bf16+master steps fp32 copies with up-cast grads (what the masters must become).
        params = _clone_params(w, torch.float32 if w.master else None)
        opt = variant.torch_class()(params, **HPARAMS, **options)
        return Runner(opt.step, lambda: params, lambda: opt.state[params[0]]["exp_avg"].dtype, params)
    return build


def _compiled(variant: Variant = ADAMW) -> Callable[[Workload], Runner]:
    """torch.compile(opt.step) of torch's foreach AdamW (or Adam), compiled before the check (peers.compile_step)."""
    def build(w: Workload) -> Runner:
        params = _clone_params(w)
        opt = variant.torch_class()(params, **HPARAMS, foreach=True)
        step = compile_step(opt.step, params, w.p0, opt.state)
        return Runner(step, lambda: params, lambda: opt.state[params[0]]["exp_avg"].dtype, params)
    return build


def _torch_way(upcast: str, variant: Variant = ADAMW) -> Callable[[Workload], Runner]:
    """bf16 params with fp32 masters, the torch way: up-cast the grads, torch's fused AdamW on the masters, copy
    the masters back into the params. `upcast`: "foreach_copy" into persistent fp32 grads, or ".float()"."""
    def build(w: Workload) -> Runner:
        params = _clone_params(w)
        masters = [p.detach().float() for p in params]
        opt = variant.torch_class()(masters, **HPARAMS, fused=True)
        if upcast == "foreach_copy":
            for m in masters:
                m.grad = torch.empty_like(m)
            master_grads = [m.grad for m in masters]

            def step():
                torch._foreach_copy_(master_grads, [p.grad for p in params])
                opt.step()
                torch._foreach_copy_(params, masters)
        else:
            def step():
                for m, p in zip(masters, params):
                    m.grad = p.grad.float()
                opt.step()
                torch._foreach_copy_(params, masters)
                for m in masters:
                    m.grad = None
        return Runner(step, lambda: masters, lambda: torch.float32, params)
    return build


def _deepspeed(variant: Variant) -> Callable[[Workload], Runner]:
    def build(w: Workload) -> Runner:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        params = _clone_params(w)
        opt = DeepSpeedCPUAdam(params, **HPARAMS, adamw_mode=variant.decoupled_weight_decay)
        return Runner(opt.step, lambda: params, lambda: opt.state[params[0]]["exp_avg"].dtype, params)
    return build


def _apex(fused_adam: type, variant: Variant) -> Callable[[Workload], Runner]:
    """apex.optimizers.FusedAdam in AdamW or Adam mode (its state in the param dtype, as torch's)."""
    def build(w: Workload) -> Runner:
        params = _clone_params(w)
        opt = fused_adam(params, **HPARAMS, adam_w_mode=variant.decoupled_weight_decay)
        return Runner(opt.step, lambda: params, lambda: opt.state[params[0]]["exp_avg"].dtype, params)
    return build


def implementations(case: str, device: torch.device, variant: Variant = ADAMW) -> list[Impl]:
    """The implementations compared in `case` on `device`, usable or not (with the reason)."""
    impls = our_implementations(device, lambda backend: _ours(backend, variant))
    if case in ("fp32", "bf16"):  # and with half the state (moments="bf16"), a quarter (moments="int8")
        for moments in ("bf16", "int8"):
            impls += [replace(impl, name=f"{impl.name} moments={moments}", auto=False) for impl in
                      our_implementations(device, lambda backend, m=moments: _ours(backend, variant, moments=m))]
        if variant is ADAMW:  # the 8-bit peers, where installed
            for name, module, package, make in (("torchao AdamW8bit", "torchao", "torchao", _torchao_adamw8bit),
                                                ("bitsandbytes AdamW8bit", "bitsandbytes", "bitsandbytes",
                                                 _bnb_adamw8bit)):
                missing = not_installed(module, package)
                impls.append(Impl(name, None if missing else _eight_bit(make), unavailable=missing))
    if case == "bf16+master":
        impls.append(Impl("torch way: fused + _foreach_copy_", _torch_way("foreach_copy", variant), baseline=True))
        impls.append(Impl("torch way: fused + .float()", _torch_way(".float()", variant)))
        return impls
    impls.append(Impl("torch fused", _torch(variant, fused=True), baseline=True))
    impls.append(Impl("torch foreach", _torch(variant, foreach=True)))
    # GPU only: on the CPU the compile takes long (and the CPU's inductor code is no GPU's). Not in the host case:
    # compiling a foreach step over its 1,000 tensors took 226 s (135 tensors: 27 s; dynamo and inductor, on this
    # project's 2-core CPU), and it ran the H200's AdamW benchmark past its 110 s limit.
    if device.type == "cuda" and case != "host":
        impls.append(Impl("torch.compile foreach", _compiled(variant)))
    impls.append(Impl("torch for-loop", _torch(variant, foreach=False), reference=True))
    if device.type == "cpu" and case != "host":
        missing = not_installed("deepspeed", "deepspeed")
        impls.append(Impl("DeepSpeed CPUAdam", None if missing else _deepspeed(variant), unavailable=missing))
    apex = apex_peer("apex FusedAdam", "FusedAdam", device, lambda fused_adam: _apex(fused_adam, variant))
    if apex is not None:
        impls.append(apex)
    return impls


def compare(result: list[Tensor], reference: list[Tensor], rtol: float, atol: float) -> tuple[bool, float]:
    """(|result - reference| <= atol + rtol·|reference| everywhere, the largest |result - reference|)."""
    ok, worst = True, 0.0
    for a, b in zip(result, reference):
        diff = (a.float() - b.float()).abs()
        worst = max(worst, float(diff.max()))
        ok = ok and bool((diff <= atol + rtol * b.float().abs()).all())
    return ok, worst


@dataclass
class AdamWConfig:
    """What `run` measures. `budget_s`: seconds spent timing each implementation; `max_time_s`: an implementation
    whose timing would take longer (from its check steps) is skipped, not timed (the for-loop at large sizes)."""

    device: torch.device
    sizes: list[int]
    cases: tuple[str, ...] = CASES
    budget_s: float = 1.5
    max_time_s: float = 30.0
    check_steps: int = 2
    host_steps: int = 200
    seed: int = 0
    variant: Variant = ADAMW  # ADAM: the "adam" op


def plan(config: AdamWConfig) -> list[tuple[str, int]]:
    """The (case, total params) pairs `run` measures, in order."""
    pairs = []
    for case in config.cases:
        if case == "host":
            pairs.append((case, sum(math.prod(s) for s in HOST_SHAPES)))
        else:
            pairs += [(case, n) for n in config.sizes]
    return pairs


def count_tasks(config: AdamWConfig) -> int:
    return sum(1 + len(implementations(case, config.device, config.variant)) for case, _ in plan(config))


def run(config: AdamWConfig, roof_gbps: float | None = None,
        on_task: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Measures every case × implementation of `config`; one row (a dict) per pair. `on_task(description)` is called
    as each task (a reference run or an implementation) ends, for a progress bar."""
    rows = []
    for case, n_params in plan(config):
        rows += _run_case(config, case, n_params, roof_gbps, on_task or (lambda description: None))
    return rows


def _check_steps(runner: Runner, steps: int, device: torch.device) -> float:
    """Runs `steps` steps, the grads multiplied by -1/2 before each after the first (exact in every dtype, and
    undone after), so that the moments depend on the betas (with one grad repeated, the bias-corrected moments
    would not). Returns the seconds of the last step (the first one also allocates the state)."""
    grads = list({id(g): g for g in runner.grads}.values())
    last = 0.0
    for i in range(steps):
        if i:
            torch._foreach_mul_(grads, -0.5)
        synchronize(device)
        t0 = time.perf_counter()
        runner.step()
        synchronize(device)
        last = time.perf_counter() - t0
    if steps > 1:
        torch._foreach_mul_(grads, (-2.0) ** (steps - 1))
    return last


def _run_case(config: AdamWConfig, case: str, n_params: int, roof_gbps: float | None,
              on_task: Callable[[str], None]) -> list[dict[str, Any]]:
    device = config.device
    w = make_workload(case, n_params, device, config.seed)
    impls = implementations(case, device, config.variant)
    label = f"{config.variant.op} {case} {_human(n_params)}"

    # The reference: torch's for-loop on the same input (fp32 copies for bf16+master), stepped check_steps times.
    reference_runner = _torch(config.variant, foreach=False)(w)
    reference_step_s = _check_steps(reference_runner, config.check_steps, device)
    reference = [t.detach().clone() for t in reference_runner.result()]
    if case == "bf16+master":  # not one of the compared implementations: free it now
        reference_runner = None
    on_task(f"{label}: reference")

    rows: dict[str, dict[str, Any]] = {}
    # The reference implementation first, so that its memory is freed before the others run.
    ordered = sorted(impls, key=lambda impl: not impl.reference)
    for impl in ordered:
        row = _row(config.variant.op, case, impl, w)
        rows[impl.name] = row
        try:
            if impl.unavailable is not None:
                row["note"] = impl.unavailable
                continue
            if impl.reference:
                runner, step_s = reference_runner, reference_step_s
                reference_runner = None
                row.update(correct=True, max_abs_err=0.0, note="reference")
            else:
                runner = impl.build(w)
                step_s = _check_steps(runner, config.check_steps, device)
                _check(case, runner, reference, row, config.variant, w.p0)
                if not row["correct"]:
                    continue
            _measure(config, case, runner, step_s, row)
        except Exception as error:  # noqa: BLE001  (one failing peer must not end the benchmark)
            row["note"] = error_note(error)
        finally:
            runner = None
            release_memory(device)
            on_task(f"{label}: {impl.name}")

    ordered_rows = [rows[impl.name] for impl in impls]
    _derive(ordered_rows, roof_gbps)
    return ordered_rows


def _row(op: str, case: str, impl: Impl, w: Workload) -> dict[str, Any]:
    return {
        "op": op,
        "case": case,
        "impl": impl.name,
        "auto": impl.auto,
        "baseline": impl.baseline,
        "dtype": str(w.dtype).replace("torch.", ""),
        "master_weights": w.master,
        "n_params": w.numel,
        "n_tensors": len(w.p0),
        "device": str(w.device),
        "time_ms_median": None,
        "time_ms_iqr": None,
        "n_timed": None,
        "time_ms_estimate": None,
        "host_ms_median": None,
        "host_ms_iqr": None,
        "bytes": None,
        "gbps": None,
        "pct_of_roof": None,
        "speedup_vs_torch_fused": None,
        "peak_mem": None,
        "correct": None,
        "max_abs_err": None,
        "note": "",
    }


def update_error(result: list[Tensor], reference: list[Tensor], start: list[Tensor]) -> float:
    """||result - reference|| / ||reference - start|| over all params (2-norms, in float64)."""
    return relative_error([a.double() - p.double() for a, p in zip(result, start)],
                          [b.double() - p.double() for b, p in zip(reference, start)])


def relative_error(result: list[Tensor], reference: list[Tensor]) -> float:
    """||result - reference|| / ||reference|| over all tensors (2-norms, in float64)."""
    error = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(result, reference))
    return math.sqrt(error / sum(float(b.double().square().sum()) for b in reference))


# The moments of Lion's and SGD's benchmarks with moments="bf16" or "int8", dequantized, against the float64
# reference's: relative_error under this (bf16 rounds by up to 2^-8 relative, an int8 code by ~1 % of its block's
# largest element; a moment that missed an update is off by ~100 %).
COMPRESSED_MOMENT_ERROR = 0.05


def _check(case: str, runner: Runner, reference: list[Tensor], row: dict[str, Any], variant: Variant = ADAMW,
           start: list[Tensor] = ()) -> None:
    if runner.tolerance == "int8_moments":
        err = update_error(runner.result(), reference, start)
        ok = err < INT8_UPDATE_ERROR
    elif case == "bf16+master":
        ok, err = compare(runner.result(), reference, *tolerance("fp32", variant))
        rounded_ok, _ = compare(runner.params, [r.to(torch.bfloat16) for r in reference],
                                *tolerance("bf16_rounded", variant))
        ok = ok and rounded_ok
    else:
        kind = (runner.tolerance or "fp32") if case in ("fp32", "host") else "bf16"
        ok, err = compare(runner.result(), reference, *tolerance(kind, variant))
    if runner.tolerance == "int8_moments":
        row.update(correct=ok, update_error=err, note=f"update off by {err:.1%} (2-norm)")
    else:
        row.update(correct=ok, max_abs_err=err)
    if not ok:
        what = "update error" if runner.tolerance == "int8_moments" else "max |error|"
        row["note"] = f"wrong result ({what} {err:.3g} vs torch for-loop): not timed"


def _measure(config: AdamWConfig, case: str, runner: Runner, step_s: float, row: dict[str, Any]) -> None:
    device = config.device
    w_numel = row["n_params"]
    row["bytes"] = adam_step_bytes(
        w_numel, getattr(torch, row["dtype"]), state_dtype=runner.state_dtype(),
        master_bytes=runner.master_bytes if row["master_weights"] else 0,
    )
    # The check's last step estimates a step: skip what would take too long to time (at least ~7 steps).
    if step_s * 7 > config.max_time_s:
        row["note"] = (row["note"] + "; " if row["note"] else "") + (
            f"not timed: {step_s:.1f} s/step (> {config.max_time_s:.0f} s for 7 steps)")
        row["time_ms_estimate"] = step_s * 1e3
        return
    timing: Timing = time_fn(runner.step, device, config.budget_s)
    row.update(time_ms_median=timing.median_ms, time_ms_iqr=timing.iqr_ms, n_timed=timing.n)
    if case == "host" and device.type == "cuda":  # on the CPU the host time is the step time
        steps = max(20, min(config.host_steps, int(config.budget_s / max(step_s, 1e-6))))
        host = host_time(runner.step, device, steps=steps)
        row.update(host_ms_median=host.median_ms, host_ms_iqr=host.iqr_ms)
    if device.type == "cuda":
        # Transient memory of one step beyond the params, grads and state it keeps (temporaries, up-cast grads).
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner.step()
        synchronize(device)
        row["peak_mem"] = torch.cuda.max_memory_allocated(device) - base


def _derive(rows: list[dict[str, Any]], roof_gbps: float | None) -> None:
    baseline = next((r for r in rows if r["baseline"] and r["time_ms_median"]), None)
    for r in rows:
        if not r["time_ms_median"]:
            continue
        r["gbps"] = r["bytes"] / (r["time_ms_median"] * 1e6)
        if roof_gbps:
            r["pct_of_roof"] = 100.0 * r["gbps"] / roof_gbps
        if baseline is not None:
            r["speedup_vs_torch_fused"] = baseline["time_ms_median"] / r["time_ms_median"]


def _human(n: int) -> str:
    for unit, scale in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.1f}{unit}"
    return str(n)


def configure(request: Request, variant: Variant = ADAMW) -> AdamWConfig:
    return AdamWConfig(device=request.device, sizes=request.default_sizes(),
                       cases=tuple(case for case in request.cases or CASES if case in variant.cases),
                       budget_s=request.budget_s, host_steps=50 if request.quick else 200, variant=variant)


def describe(config: AdamWConfig) -> dict[str, Any]:
    """The configuration as the JSON report records it: adamw's at the top level, adam's under "adam"."""
    variant = config.variant
    described = {"sizes": config.sizes, "cases": list(config.cases),
                 "hparams": HPARAMS if variant is ADAMW else
                 {**HPARAMS, "decoupled_weight_decay": variant.decoupled_weight_decay},
                 "budget_s": config.budget_s, "check_steps": config.check_steps,
                 "tolerances": TOLERANCES if variant is ADAMW else
                 {kind: tolerance(kind, variant) for kind in TOLERANCES}}
    if variant is ADAMW:
        return described
    return {variant.op: {**described, "reference": f"torch.optim.{variant.class_name}(foreach=False)"}}


BENCHMARKS = tuple(
    Benchmark(ops=(variant.op,), configure=functools.partial(configure, variant=variant), count_tasks=count_tasks,
              run=run, describe=describe)
    for variant in (ADAMW, ADAM)
)
