"""`fused_optim.GradAccumulator`: fp32 main grads for a model's params, filled micro-batch by micro-batch, and
normalised by the number of tokens that made them.

Why a token count. With micro-batches of different numbers of (non-ignored) target tokens, the mean of the
per-micro-batch mean losses gives a token of a short micro-batch more weight than a token of a long one: it is not
the full batch's mean loss, and its gradient is not the full-batch gradient (docs/accumulation-notes.md has the
numbers). Summing each micro-batch's loss (`reduction="sum"`) and dividing the accumulated gradient once by the
total count of target tokens is exact however uneven the micro-batches are. Under torch.distributed the count is
summed over the ranks together with the gradients, so every rank divides by the global count.

Why fp32 main grads. Adding k bf16 micro-batch gradients in bf16 rounds k times to 8 bits of mantissa; adding
them into fp32 (the grad widened on the fly, one multi-tensor launch: fused_optim/ops/accumulate.py) does not.
fused_optim's optimizers read the fp32 main grad of a bf16/fp16 param directly (`p.main_grad`), so it is never
rounded to bf16 at all.

Layout: one flat buffer per device holds every main grad, each a view in its param's memory layout starting on a
64-byte boundary (the kernels' 16-byte loads apply). `finalize()` is then a norm pass and one multiply over that
buffer, plus, when distributed, one all-reduce of it.
"""

from __future__ import annotations

import math
import numbers
import sys
import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from fused_optim import _backend
from fused_optim._loss_checks import is_int
from fused_optim._weak_hooks import register_weak_hook, remove_when_collected
from fused_optim.clip_grad import clip_coefficient, global_norm
from fused_optim.ops._dtensor import DTensor, is_dtensor
from fused_optim.ops._library import FLOAT_DTYPES, dense
from fused_optim.ops.accumulate import accumulate_grads

_ALIGN = 16  # elements of fp32: every main grad starts on a 64-byte boundary

# Each param's GradAccumulator (while it lives) and the param's index in it, for gradient release's hook
# (optim/_base.py): weak both ways, so neither the param nor the accumulator is kept alive, nor pickled, by it.
_accumulators: WeakIdKeyDictionary = WeakIdKeyDictionary()


def accumulator_of(p: Tensor) -> tuple[GradAccumulator, int] | None:
    """The live GradAccumulator that holds a main grad for `p`, and `p`'s index in it; None if there is none."""
    entry = _accumulators.get(p)
    accumulator = entry[0]() if entry is not None else None
    return None if accumulator is None else (accumulator, entry[1])


def count_tokens(target: Tensor, ignore_index: int = -100, *, weight: Tensor | None = None) -> Tensor:
    """What torch's reduction="mean" divides a cross-entropy's summed loss by, as a 0-dim tensor on the target's
    device (no host sync). Sum it over micro-batches and pass it to `GradAccumulator.finalize(num_tokens=...)`:
    the losses summed with reduction="sum" over it are the full batch's mean loss.

    Class-index targets count those != ignore_index (int64); with the loss's class `weight`, the sum of those
    targets' weights (float: torch's weighted mean divides by it). Probability targets (floating point, (N, C) or
    (N, C, d1, ...)) count their N x d1 x ... rows.

    Example:
        >>> fused_optim.count_tokens(torch.tensor([3, -100, 7]))
        tensor(2)
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"count_tokens: target must be a Tensor, not {type(target).__name__}")
    if not is_int(ignore_index):
        raise TypeError(f"count_tokens: ignore_index must be an int, not {type(ignore_index).__name__}")
    if target.is_floating_point():  # probability targets: every row counts, the class dim does not
        return torch.full((), target.numel() // target.shape[1] if target.dim() > 1 else 1, dtype=torch.int64,
                          device=target.device)
    # int64: a uint8 target (torch's losses take those too) would compare with -100 as 156, and index as a mask
    target = target.long()
    kept = target != ignore_index
    if weight is None:
        return kept.sum()
    # summed in fp32 at least: 70,000 fp16 weights of 1 overflow fp16, 1001 round to 1000 in bf16
    return torch.where(kept, weight[torch.where(kept, target, 0)], 0).sum(dtype=torch.promote_types(weight.dtype,
                                                                                                 torch.float32))


def _local(p: Tensor) -> Tensor:
    return p._local_tensor if is_dtensor(p) else p


def _flatten_params(params: Iterable[Tensor] | Iterable[dict[str, Any]]
                    ) -> tuple[list[Tensor], list[Tensor]]:
    """The params that take grads, in order, once each (tied weights appear once), and those that do not (frozen);
    param groups are flattened, and named params ((name, param) pairs, as named_parameters() gives them) taken by
    their param, as torch's optimizers take them."""
    if isinstance(params, Tensor):  # iterating it would take its rows, views that never get a grad
        raise TypeError("GradAccumulator: params should be an iterable of Tensors or dicts, but got "
                        f"{torch.typename(params)}")
    seen, result, frozen = set(), [], []
    for item in params:
        group = item["params"] if isinstance(item, dict) else [item]
        for p in [group] if isinstance(group, Tensor) else group:
            if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
                p = p[1]
            if not isinstance(p, Tensor):
                raise TypeError(f"GradAccumulator: params must be Tensors, not {type(p).__name__}")
            if not p.is_leaf:
                raise ValueError("GradAccumulator: can't accumulate the grads of a non-leaf Tensor (autograd gives "
                                 "it none)")
            if id(p) not in seen:
                seen.add(id(p))
                (result if p.requires_grad else frozen).append(p)
    return result, frozen


def _is_number(value: Any) -> bool:
    """A real number (int, float, numpy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _in_compiled_autograd() -> bool:
    """Whether compiled autograd runs this backward: dynamo traces its hooks, or runs the graph it compiled."""
    compiled_autograd = sys.modules.get("torch._dynamo.compiled_autograd")  # imported by whoever turned it on
    return torch.compiler.is_compiling() or bool(getattr(compiled_autograd, "in_compiled_autograd_region", False))


def _check_num_tokens(num_tokens: Any, zero_allowed: bool = False) -> None:
    """finalize's and release's token count: a positive, finite number (or 0, `zero_allowed`: one rank's count,
    which the ranks' sum divides by), a one-element tensor (a device count, not read: 0 there makes the grads NaN),
    or None."""
    if num_tokens is None:
        return
    if isinstance(num_tokens, Tensor):
        if num_tokens.numel() != 1:
            raise ValueError(f"num_tokens must be one count, got a tensor of shape {tuple(num_tokens.shape)}")
        return
    if not _is_number(num_tokens):
        raise TypeError(f"num_tokens must be a number or a tensor, not {type(num_tokens).__name__}")
    try:
        value = float(num_tokens)
    except OverflowError:  # an int past float's range
        value = math.inf
    if not (math.isfinite(value) and (value > 0 or (zero_allowed and value == 0))):
        raise ValueError(f"num_tokens must be a positive number of tokens, got {num_tokens}")


def _count_tensor(num_tokens: int | float | Tensor, device: torch.device) -> Tensor:
    """A checked token count as a 0-dim fp64 tensor on `device` (a Python int past int64, a Fraction: as floats)."""
    if isinstance(num_tokens, Tensor):
        return num_tokens.to(device=device, dtype=torch.float64).reshape(())
    # a fill on the device, exact in fp64: torch.as_tensor(count, device=...) copied an fp32 count from the host and
    # waited for the copy
    return torch.full((), float(num_tokens), dtype=torch.float64, device=device)


class GradAccumulator:
    """fp32 main grads for `params`: `accumulate()` after each micro-batch's backward, `finalize()` once before the
    optimizer step, `zero_()` after it.

    Args:
        params: the params (or param groups, or named params) whose grads to accumulate; those without
            requires_grad are left out.
        dtype: the main grads' dtype; float32 (the kernels' and the optimizers' main-grad dtype) is the one taken.
        backend: which kernels add the grads ("auto", "cuda", "triton", "cpu", "torch"; fused_optim._backend).
        use_hooks: accumulate each grad as soon as autograd has it (`register_post_accumulate_grad_hook`) and free
            it at once, so at most one param's micro-batch grad is alive; `accumulate()` then has nothing to do. A
            later GradAccumulator over the same params takes their grads from then on.
        process_group: the group whose ranks' gradients and token counts `finalize()` sums (default: the whole
            world when torch.distributed is initialised with more than one rank).

    After `finalize()`, fp32 params have `p.grad` (the main grad itself, no copy) and every param that received a
    gradient has `p.main_grad`, which fused_optim's optimizers read in preference to `p.grad`: bf16/fp16 params are
    stepped from their fp32 gradient. (torch's optimizers read only `p.grad`, which bf16/fp16 params lack here.)

    With DDP, run the micro-batches under `model.no_sync()` (the last one may be synced too; the result is the
    same): `finalize()` all-reduces the fp32 sum once, instead of DDP reducing each micro-batch in bf16. Every
    param then gets a main grad, zero where no rank's backward reached it (telling would take a host read): its
    optimizer's momentum and weight decay still move it, where DDP leaves such a param's grad None; freeze it
    (`requires_grad=False`) instead. A rank's Python token count may be 0 there (the ranks' sum divides).

    With FSDP2 (`fully_shard`) the params are DTensors and so are the main grads: each rank keeps fp32 main grads
    of its own shards only. Run the micro-batches but the last with `model.set_requires_gradient_sync(False)`
    (FSDP2 sums them unsharded), the last with sync (one reduce-scatter), then `accumulate()`: the sharded grads
    are already reduced, so `finalize()` all-reduces only the token count, and clipping takes the norm over the
    whole mesh. FSDP2 averages the ranks' gradients (its default divide factor, which `finalize()` assumes and
    undoes in the same multiply): the global token count is what divides. With a 2-D (FSDP x TP) mesh, pass the
    data-parallel group as `process_group`: tensor-parallel ranks share their tokens. FSDP2 sums the unsynced
    micro-batches in its reduce dtype: with bf16 or fp16 params give it
    `mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32)`, or it adds them in bf16 before `accumulate()` sees
    them (about 3x the error of fp32 sums over 32 micro-batches on 2 ranks), or keep gradient sync on for every one.

    With an optimizer built with `gradient_release=True`, call `release(num_tokens=...)` before the last
    micro-batch's backward instead of `finalize()` and `step()`: each param is stepped inside that backward.

    Example:
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = fused_optim.AdamW(model.parameters())
        >>> micro_batches = [(torch.randn(8, 4), torch.randint(3, (8,))) for _ in range(2)]
        >>> acc = fused_optim.GradAccumulator(model.parameters())
        >>> tokens = 0
        >>> for x, y in micro_batches:
        ...     fused_optim.functional.cross_entropy(model(x), y, reduction="sum").backward()
        ...     acc.accumulate()
        ...     tokens = tokens + fused_optim.count_tokens(y)
        >>> norm = acc.finalize(num_tokens=tokens, max_norm=1.0)
        >>> opt.step(); opt.zero_grad(); acc.zero_()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        dtype: torch.dtype = torch.float32,
        backend: str | None = None,
        use_hooks: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if dtype != torch.float32:
            raise TypeError(f"GradAccumulator keeps float32 main grads (dtype=torch.float32), not {dtype}")
        self.backend = backend if backend is not None else _backend.default_backend()
        _backend.check_backend_name(self.backend)
        self.params, self._frozen = _flatten_params(params)
        self.process_group = process_group
        self.main_grads: list[Tensor] = [None] * len(self.params)  # type: ignore[list-item]
        # one flat buffer per device for plain params, and one per device mesh for DTensor params (their shards)
        self._indices_by_buffer: dict[tuple[torch.device, object], list[int]] = {}
        for i, p in enumerate(self.params):
            if p.dtype not in FLOAT_DTYPES:
                raise TypeError(f"GradAccumulator takes float32, bfloat16 and float16 params, not {p.dtype}")
            self._indices_by_buffer.setdefault((p.device, p.device_mesh if is_dtensor(p) else None), []).append(i)
        self.flat_grads: dict[tuple[torch.device, object], Tensor] = {}
        for key, indices in self._indices_by_buffer.items():
            local_params = [_local(self.params[i]) for i in indices]
            offsets, total = [], 0
            for p in local_params:
                offsets.append(total)
                total += -(-p.numel() // _ALIGN) * _ALIGN
            flat = torch.zeros(total, dtype=dtype, device=key[0])
            self.flat_grads[key] = flat
            for i, p, offset in zip(indices, local_params, offsets):
                # the param's own strides: autograd's grads come in the param's layout, so the kernels walk both flat
                main_grad = flat.as_strided(p.shape, p.stride(), offset) if dense(p) \
                    else flat[offset:offset + p.numel()].view(p.shape)
                param = self.params[i]
                if is_dtensor(param):  # this rank's shard of the main grad, laid out like the param's
                    main_grad = DTensor.from_local(main_grad, param.device_mesh, param.placements, run_check=False,
                                                   shape=param.shape, stride=param.stride())
                self.main_grads[i] = main_grad
        self._received = [False] * len(self.params)  # which params got a gradient since zero_()
        # held weakly: a GradAccumulator let go stops taking the grads (a later one, or a release optimizer, has them)
        self._hooks = [register_weak_hook(self, p, GradAccumulator._take_hooked_grad, i)
                       for i, p in enumerate(self.params)] if use_hooks else []
        remove_when_collected(self, self._hooks)
        # Gradient release (`release()`): the scale of the armed step, the params it has yet to step, each param's
        # stepping function (its optimizer's hook, as it last called, weakly), and whether the armed backward's end
        # has been asked to step the params it left.
        self._release_scale: Tensor | None = None
        self._armed: set[int] = set()
        self._steppers: dict[int, weakref.WeakMethod] = {}
        self._end_queued = False
        for i, p in enumerate(self.params):
            _accumulators[p] = (weakref.ref(self), i)  # a gradient_release optimizer's hook accumulates through us

    @torch.no_grad()
    def accumulate(self) -> None:
        """Adds every param's `.grad` into its main grad (one launch per device) and frees the `.grad`."""
        self._check_unfrozen("accumulate")
        for indices in self._indices_by_buffer.values():
            picked = [i for i in indices if self._pending(i)]
            if not picked:
                continue
            accumulate_grads([self.main_grads[i] for i in picked], [self.params[i].grad for i in picked],
                             backend=self.backend)
            for i in picked:
                self.params[i].grad = None
                self._received[i] = True

    def _pending(self, i: int) -> bool:
        """Whether param i holds a grad not yet in its main grad (after finalize, an fp32 param's grad *is* its main
        grad, which autograd may have added to directly)."""
        grad = self.params[i].grad
        return grad is not None and grad is not self.main_grads[i]

    def _take_hooked_grad(self, i: int, p: Tensor) -> None:
        """use_hooks' hook on param i: a newer GradAccumulator over the same param takes its grads instead (as a
        newer gradient_release optimizer's hooks do), though this one is still alive; once that one is gone, the
        param is this one's again."""
        owner = accumulator_of(p)
        if owner is None:
            _accumulators[p] = (weakref.ref(self), i)
        elif owner != (self, i):
            return
        self._accumulate_one(i, p)

    @torch.no_grad()
    def _accumulate_one(self, i: int, p: Tensor) -> None:
        if self._pending(i):
            accumulate_grads([self.main_grads[i]], [p.grad], backend=self.backend)
            p.grad = None
            self._received[i] = True

    def _check_unfrozen(self, method: str) -> None:
        """A param left out as frozen that has a grad now (unfrozen since, gradual unfreezing say) would keep the
        summed grad of the micro-batches, never divided by the token count: refused, not stepped from it."""
        for p in self._frozen:
            if p.grad is not None:
                raise RuntimeError(f"GradAccumulator.{method}(): a param that did not require grad when the "
                                   "accumulator was made has a grad now (unfrozen since?), which it would leave "
                                   "summed, not divided by the token count: make a new GradAccumulator after "
                                   "unfreezing params")

    def release(self, num_tokens: int | Tensor | None = None) -> None:
        """Arms gradient release for the step's last micro-batch: call it before that micro-batch's backward, with
        the step's total token count (the sum of `count_tokens` over all its micro-batches, known before the last
        backward). During that backward, as each param's gradient arrives, its gradient_release optimizer's hook
        adds it into the main grad, divides by `num_tokens`, steps the param from it and zeroes it: no `finalize()`,
        no `optimizer.step()`. In the earlier micro-batches' backwards the hook only accumulates. Single process
        only (the main grads would have to be all-reduced one param at a time); no clipping (a global norm needs
        every grad first)."""
        _check_num_tokens(num_tokens)
        self._check_unfrozen("release")
        if self._group() is not None:
            raise RuntimeError("GradAccumulator.release() is single-process only: distributed main grads are summed "
                               "over the ranks in finalize(), after every gradient is in")
        scale = None
        if num_tokens is not None and self.params:
            count = _count_tensor(num_tokens, self.params[0].device)
            scale = torch.where(count > 0, 1.0 / count, math.nan).to(torch.float32)
        self._release_scale = scale
        self._armed = set(range(len(self.params)))
        self._end_queued = False

    @torch.no_grad()
    def released_grad(self, i: int, p: Tensor, stepper: weakref.WeakMethod) -> Tensor | None:
        """For a gradient_release optimizer's hook `stepper` (held weakly) on param i: accumulates its new grad, and
        returns the main grad to step it with when `release()` armed this backward (divided by the token count),
        else None. The armed backward's end steps, through their hooks, the params that got a grad in an earlier
        micro-batch but none in it, as `finalize()` + `step()` would."""
        if i in self._armed and not self._end_queued and _in_compiled_autograd():  # before anything is taken
            raise RuntimeError("GradAccumulator.release() cannot step params in a backward that compiled autograd "
                               "runs: the end of that backward, where the params that got a grad in an earlier "
                               "micro-batch alone are stepped, is not called there. Run the last micro-batch's "
                               "backward without compiled autograd, or use finalize() and step()")
        self._accumulate_one(i, p)
        self._steppers[i] = stepper
        if i not in self._armed:
            return None
        if not self._end_queued and torch._C._current_graph_task_id() != -1:  # inside a backward
            torch.autograd.Variable._execution_engine.queue_callback(self._release_the_rest)
            self._end_queued = True
        self._armed.discard(i)
        main_grad = self.main_grads[i]
        if self._release_scale is not None:
            main_grad.mul_(self._release_scale.to(main_grad.device))
        return main_grad

    def _release_the_rest(self) -> None:
        """The end of the armed backward: the params it gave no grad but an earlier micro-batch did are stepped
        now (their hooks step from the main grad, as armed); the others are not stepped, as `step()` skips a
        param without a grad."""
        for i in sorted(self._armed):
            stepper = self._steppers[i]() if i in self._steppers else None
            if self._received[i] and stepper is not None:
                stepper(self.params[i])
        self._armed = set()
        self._end_queued = False

    def released(self, i: int) -> None:
        """After the optimizer stepped param i from its main grad: zero it for the next step."""
        self.main_grads[i].zero_()
        self._received[i] = False

    def _group(self) -> dist.ProcessGroup | None:
        """The process group to sum over, or None when not distributed (or alone)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    @torch.no_grad()
    def finalize(self, num_tokens: int | Tensor | None = None, max_norm: float | None = None,
                 norm_type: float = 2.0) -> Tensor | None:
        """Sums over ranks (when distributed), divides by the token count, clips, and hands the grads to the
        optimizer; a grad that the last backward left without an `accumulate()` is added first. No host sync:
        `num_tokens` may be a device tensor (`count_tokens`).

        Args:
            num_tokens: this rank's count of the tokens the summed losses were over; summed over the ranks when
                distributed. None: the grads stay sums. A Python number must be positive (ValueError otherwise);
                a device count of 0 makes the grads NaN, so that a step that checks for non-finite grads
                (`max_grad_norm=`, fused_optim.GradScaler) skips.
            max_norm: clip the normalised grads to this global `norm_type`-norm (as `clip_grad_norm_`; norm_type
                > 0 or inf). With a GradScaler the grads are still scaled here: clip in the optimizer instead
                (`AdamW(max_grad_norm=...)`), which clips the unscaled grads.

        Returns the global norm of the normalised grads before clipping (0-dim fp32 tensor on the first device),
        or None without `max_norm`.
        """
        group = self._group()
        _check_num_tokens(num_tokens, zero_allowed=group is not None)
        self._check_unfrozen("finalize")
        for name, value in (("max_norm", max_norm), ("norm_type", norm_type)):
            if value is not None and not _is_number(value):
                raise TypeError(f"GradAccumulator.finalize(): {name} must be a number, not {type(value).__name__}")
        if max_norm is not None and not norm_type > 0:  # refused before the grads are summed over the ranks
            raise ValueError(f"GradAccumulator.finalize(): norm_type must be positive or inf, got {norm_type}")
        releasing = next(filter(None, (stepper() for stepper in self._steppers.values())), None)
        if releasing is not None:  # its step() would change nothing: the run would not train, silently
            raise RuntimeError(f"GradAccumulator.finalize(): these params are stepped in backward by an optimizer "
                               f"with gradient_release=True ({type(releasing.__self__).__name__}), whose step() takes "
                               "no finalized grads; call release(num_tokens=...) before the last micro-batch's "
                               "backward instead of finalize() and step()")
        self.accumulate()  # a grad the last backward left without an accumulate() counts too
        flats = list(self.flat_grads.values())
        if not flats:
            return None if max_norm is None else torch.tensor(0.0)
        count = None if num_tokens is None else _count_tensor(num_tokens, flats[0].device)
        if group is not None:
            # DTensor grads are reduced already (FSDP2's reduce-scatter): only plain ones are summed here
            for (_, mesh), flat in self.flat_grads.items():
                if mesh is None:
                    dist.all_reduce(flat, group=group)
            self._received = [True] * len(self.params)  # another rank's gradient may be here now
        # FSDP2 hands out DTensor grads averaged over the data-parallel ranks (its default divide factor): times
        # the group's size they are sums, as the plain grads all-reduced above are. Folded into the one scale below,
        # unless plain grads share the step (rare: then the sharded ones are brought to sums first).
        sums_factor = 1.0
        if group is not None and any(mesh is not None for _, mesh in self.flat_grads):
            sums_factor = float(dist.get_world_size(group))
            if any(mesh is None for _, mesh in self.flat_grads):
                for (_, mesh), flat in self.flat_grads.items():
                    if mesh is not None:
                        flat.mul_(sums_factor)
                sums_factor = 1.0
        scale = None
        if count is not None:
            if group is not None:
                dist.all_reduce(count, group=group)
            # a count of 0 (on the device, where it cannot be refused without a sync) makes every grad NaN: the
            # step then skips as for any non-finite grad (max_grad_norm=, fused_optim.GradScaler)
            scale = torch.where(count > 0, sums_factor / count, math.nan).to(torch.float32)
        elif sums_factor != 1.0:
            scale = torch.full((), sums_factor, dtype=torch.float32, device=flats[0].device)  # (no host copy)
        norm = None
        factor = scale
        if max_norm is not None:
            # plain main grads as their flat buffers (padding adds nothing), DTensor ones as themselves: a global norm
            plain_flats = [flat for (_, mesh), flat in self.flat_grads.items() if mesh is None]
            sharded = [g for p, g in zip(self.params, self.main_grads) if is_dtensor(p)]
            norm = global_norm(plain_flats + sharded, norm_type, self.backend)
            if scale is not None:
                norm = norm * scale
            clip_coef = clip_coefficient(max_norm, norm)
            factor = clip_coef if scale is None else clip_coef * scale
        if factor is not None:
            for flat in flats:
                flat.mul_(factor.to(flat.device))
        for i, p in enumerate(self.params):
            if self._received[i]:
                p.main_grad = self.main_grads[i]
                if p.dtype == torch.float32:
                    p.grad = self.main_grads[i]
        return norm

    @torch.no_grad()
    def zero_(self) -> None:
        """Zeroes the main grads (one fill per device) and takes back the grads handed out by `finalize()`."""
        for flat in self.flat_grads.values():
            flat.zero_()
        for i, p in enumerate(self.params):
            if getattr(p, "main_grad", None) is self.main_grads[i]:
                p.main_grad = None
            if p.grad is self.main_grads[i]:
                p.grad = None
        self._received = [False] * len(self.params)
        self._armed = set()

    def remove_hooks(self) -> None:
        """Stops accumulating from autograd hooks (`use_hooks=True`)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()  # the list remove_when_collected holds
