"""What every fused_optim optimizer shares around its own update: the backend, the step guard (max_grad_norm,
GradScaler's inf/NaN check, skipped_steps, last_grad_norm: optim/_guard.py), one device per param group, the cached
per-group plans, gradient release (each param stepped by an autograd hook inside backward), the stochastic-rounding
seed of each group, and pickling of our extra settings."""

from __future__ import annotations

import contextlib
import numbers
import operator
import sys
import warnings
import weakref
import zlib
from collections import Counter, OrderedDict
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _device_dtype_check_for_fused
from torch.utils.weak import WeakIdKeyDictionary

from fused_optim import _backend
from fused_optim._weak_hooks import register_weak_hook, remove_when_collected
from fused_optim.accumulate import accumulator_of
from fused_optim.int8_moments import code_dtype, dequantize, quantize, scale_count
from fused_optim.master_remainder import REMAINDER_DTYPES, join_master, split_master
from fused_optim.ops._dtensor import (DTensor, is_dtensor, largest_shard_numel, layout, local_rows, on_local_shards,
                                      rank_rows, same_layouts)
from fused_optim.ops._library import grad_dtype_fits
from fused_optim.optim._guard import StepGuard, grad_of
from fused_optim.optim._plan import Plan


# Params the kernels step in fp32 with fp32 state; others keep state of their own dtype, as torch's optimizers do
# (float64 runs torch's own update; complex params run the kernels on their real views).
LOW_PRECISION = (torch.bfloat16, torch.float16)
PARAM_DTYPES = (torch.float32, *LOW_PRECISION, torch.float64, torch.complex64, torch.complex128)
# params whose value and a master remainder make the fp32 master: a bf16 param, or a wider one that holds its value
# (`model.float()` after steps, or a bf16 checkpoint loaded into an fp32 model)
JOINS_REMAINDERS = (torch.bfloat16, torch.float32, torch.float64)


def state_dtype(p: Tensor, group: dict[str, Any]) -> torch.dtype:
    """The dtype of a param's optimizer state: fp32 for fp32, bf16 and fp16 params (ours), the param's own for
    float64 and complex params and for every param of a differentiable group (torch's)."""
    return torch.float32 if p.dtype in (torch.float32, *LOW_PRECISION) and not group.get("differentiable") else p.dtype


def beta_value(value: float | Tensor, index: int) -> float:
    """A beta given as a tensor, read once (a host read, never again in a step): the kernels take numbers."""
    if not isinstance(value, Tensor):
        return value
    if value.numel() != 1:
        raise ValueError(f"Tensor betas[{index}] must be 1-element")
    return float(value.item())


def is_dense(t: Tensor) -> bool:
    """Whether a tensor (a DTensor's local shard) fills one block of memory, its dimensions in any order: what the
    kernels, which walk a param and its state as flat arrays, can step."""
    local = t.to_local() if is_dtensor(t) else t
    if local.numel() == 0:  # nothing to walk, whatever the strides
        return True
    expected = 1
    for size, stride in sorted(zip(local.shape, local.stride()), key=lambda pair: pair[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors of one shape (or two DTensors' local shards) lay their elements out in the same order."""
    return (a.to_local() if is_dtensor(a) else a).stride() == (b.to_local() if is_dtensor(b) else b).stride()


MOMENTS = ("fp32", "bf16", "int8")  # the storage of an optimizer's moments: `moments=`
ALTERNATIVES = ("master_weights", "stochastic_rounding")  # a group takes one of them at most


def check_moments(moments: str) -> None:
    """The constructors' check of `moments`."""
    if moments not in MOMENTS:
        raise ValueError(f"moments must be {' or '.join(map(repr, MOMENTS))}, not {moments!r}")


def int8_moments(p: Tensor, group: dict[str, Any]) -> bool:
    """Whether a param's moments are 8-bit (moments="int8", where our state would be fp32: fp32, bf16, fp16 params)."""
    return option(group, "moments") == "int8" and state_dtype(p, group) == torch.float32


def moment_dtype(p: Tensor, group: dict[str, Any], signed: bool = True) -> torch.dtype:
    """The dtype of a param's moment where our state would be fp32: bf16 with moments="bf16", int8 (`signed`) or
    uint8 with moments="int8"; else state_dtype."""
    dtype = state_dtype(p, group)
    if dtype != torch.float32:
        return dtype
    return {"bf16": torch.bfloat16, "int8": code_dtype(signed)}.get(option(group, "moments"), dtype)


def init_int8_scales(p: Tensor, state: dict[str, Tensor], count: int) -> None:
    """`moment_scales`: the bf16 block scales of a param's `count` int8 moments (fused_optim/int8_moments.py), one row
    each in the order of the optimizer's moment keys; a DTensor's are its local shard's, a plain tensor."""
    local = p.to_local() if is_dtensor(p) else p
    state["moment_scales"] = torch.zeros(count, scale_count(local.numel()), dtype=torch.bfloat16, device=p.device)


def check_master_weights(master_weights: bool | int) -> None:
    """The check of `master_weights`: False, True (exact fp32 masters) or 24 (24-bit masters)."""
    # not 1, 1.0 or 24.0 either
    if not (isinstance(master_weights, bool) or (type(master_weights) is int and master_weights == 24)):
        raise ValueError(f"master_weights must be True (exact fp32 masters), 24 (24-bit masters: a bfloat16 param and "
                         f"an 8-bit remainder) or False, not {master_weights!r}")


def check_group_options(group: dict[str, Any]) -> None:
    """Our options of a param group (the constructor's defaults, or a group's own: a dict among the params or
    add_param_group), each checked as the constructor checks it."""
    if "moments" in group:
        check_moments(group["moments"])
    if "stochastic_rounding" in group and not isinstance(group["stochastic_rounding"], bool):
        raise ValueError(f"stochastic_rounding must be True or False, not {group['stochastic_rounding']!r}")
    if "master_weights" in group:
        check_master_weights(group["master_weights"])
        if all(group.get(key) for key in ALTERNATIVES):
            raise ValueError("master_weights and stochastic_rounding are alternatives: choose one")


def differentiable_problem(group: dict[str, Any], max_grad_norm: float | None) -> str | None:
    """What a differentiable group cannot take (torch's own update steps it), in one sentence; None if nothing."""
    if not group.get("differentiable"):
        return None
    if max_grad_norm is not None:
        return ("max_grad_norm does not take differentiable=True: a differentiable step runs torch's own update, "
                "which has no clipping")
    if group.get("moments") in ("bf16", "int8"):
        return (f"moments={group['moments']!r} does not take differentiable=True: a differentiable step runs torch's "
                "own update, which keeps its moments in its params' dtype")
    if group.get("master_weights"):
        return ("master_weights does not take differentiable=True: a differentiable step runs torch's own update, "
                "which updates the params themselves, not a master weight")
    if group.get("stochastic_rounding"):
        return ("stochastic_rounding does not take differentiable=True: a differentiable step runs torch's own "
                "update, which rounds to nearest")
    return None


def group_seed(index: int, params: list[Tensor], distributed: bool) -> int:
    """The stochastic-rounding seed of an optimizer's param group `index` over `params`: a hash of torch's initial
    seed (what torch.manual_seed set: a seeded run draws the same bits), the group's index and its params' shapes
    (optimizers over params of other shapes draw differently; over params of the same shapes, alike, unless their
    groups give seeds of their own). Nothing is drawn from torch's generator, so the
    training script's own random numbers (dropout, data order) stay what they are with torch's optimizer.

    Under torch.distributed torch's seed is left out: scripts often seed each rank differently (dropout, data), and
    replicas (DDP, HSDP) must round alike to stay equal; each shard's own seed is ops/_dtensor.py's rank_seed."""
    shapes = ",".join(str(tuple(p.shape)) for p in params)
    torch_seed = "distributed" if distributed else torch.initial_seed()
    return zlib.crc32(f"{torch_seed} {index} {shapes}".encode()) % (2**31 - 1)


def remainder_dtype(master_weights: bool | int) -> torch.dtype:
    """The dtype of a bf16 param's master remainder: int16 (the exact fp32 master) or, with master_weights=24, int8."""
    return torch.int8 if master_weights == 24 else torch.int16


def init_master(p: Tensor, state: dict[str, Tensor], master_weights: bool | int) -> None:
    """A low-precision param's master weight, equal to the param at first: a bf16 param's as a remainder beside it
    (`master_remainder`: int16, 2 bytes, the exact fp32 master; int8, 1 byte, with master_weights=24 a 24-bit one:
    fused_optim/master_remainder.py), an fp16 param's as an fp32 copy (`master_param`: an fp16 param and 16 more
    bits cannot hold every fp32 value)."""
    if p.dtype == torch.bfloat16:
        state["master_remainder"] = torch.zeros_like(p, dtype=remainder_dtype(master_weights),
                                                     memory_format=torch.preserve_format)
    else:
        state["master_param"] = p.detach().float()


def master_of(state: dict[str, Tensor], kind: str) -> Tensor | None:
    """A param's entry in its op call's master list: its remainder, its fp32 copy, or None (no master)."""
    if kind.startswith("remainder"):
        return state["master_remainder"]
    return state["master_param"] if kind == "master" else None


def check_torch_flags(params: list[Tensor], group: dict[str, Any]) -> None:
    """torch's first-step check of `fused=True` (floating-point params on a device with fused kernels), in torch's
    words: we accept the flag, and refuse what torch's fused optimizers refuse."""
    if group["fused"]:
        for p in params:
            _device_dtype_check_for_fused(p)


# What a param's state may hold besides its optimizer's moments.
_STATE_KEYS = ("step", "moment_scales", "master_param", "master_remainder")

# Our group options at the values that step as torch's optimizers do. A group holds none of them at its neutral value
# (`drop_neutral_options`; read them with `option`): a group of such settings is torch's key for key, and so is its
# state_dict(), which a distributed checkpoint (DCP) of torch's optimizer then loads into, and ours into torch's;
# DCP's flattened form (flatten_optimizer_state_dict, torchtitan's) asks a saved group for every key of the group it
# loads into.
NEUTRAL_OPTIONS = {"master_weights": False, "moments": "fp32", "stochastic_rounding": False}


def option(group: dict[str, Any], key: str) -> Any:
    """The group's setting of our option `key` (NEUTRAL_OPTIONS), which it holds only where not neutral."""
    return group.get(key, NEUTRAL_OPTIONS[key])


def drop_neutral_options(group: dict[str, Any]) -> None:
    """Takes our options at their neutral values out of `group` (NEUTRAL_OPTIONS)."""
    for key, neutral in NEUTRAL_OPTIONS.items():
        if key in group and group[key] == neutral:
            del group[key]


# Gradient release: the optimizer whose hook steps each param inside backward (optim/_base.py), weakly: a newer
# gradient_release optimizer over the same param takes it over.
_release_owners: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _release_owner(p: Tensor) -> FusedOptimizer | None:
    """The live gradient_release optimizer that steps `p` in backward, or None."""
    owner = _release_owners.get(p)
    return owner() if owner is not None else None


def _multi_process() -> bool:
    """Whether torch.distributed runs more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _check_single_process(name: str) -> None:
    """Gradient release steps each param with its local grad the moment autograd has it: under DDP that is before
    the all-reduce, so every rank would train on its own grads, silently."""
    if _multi_process():
        raise RuntimeError(f"{name}: gradient_release=True is single-process only: it steps each param with its local "
                           "grad inside backward, before DDP (or any all-reduce) could average it over the ranks")


def _constructing_zero_group() -> dist.ProcessGroup | None:
    """The process group of the torch.distributed.optim.ZeroRedundancyOptimizer that is constructing this optimizer,
    if one is (it hands each rank's optimizer one partition of the params, so a global grad norm must sum the
    partitions' squares over its group; without that group each partition would be clipped by its own norm)."""
    if not _multi_process():
        return None
    from torch.distributed.optim import ZeroRedundancyOptimizer

    frame = sys._getframe(1)
    while frame is not None:
        if isinstance(frame.f_locals.get("self"), ZeroRedundancyOptimizer):
            return frame.f_locals["self"].process_group
        frame = frame.f_back
    return None


# The frame in which autograd runs a custom Function's backward (torch/autograd/function.py). A hook with it below
# on the stack runs inside a backward that such a backward started: a reentrant one.
_FUNCTION_BACKWARD = getattr(getattr(torch.autograd.function, "BackwardCFunction", None), "apply", None)


def _check_not_reentrant(name: str) -> None:
    """Gradient release steps a param each time autograd accumulates its grad. A reentrant backward (started inside a
    Function's backward: torch.utils.checkpoint(use_reentrant=True), and the checkpoint wrappers built like it)
    accumulates its segment's grads by itself, so a param used both in it and outside it (or in two segments, a
    tied embedding, a shared layer) would be stepped twice in one backward, each time with part of its grad."""
    if _FUNCTION_BACKWARD is None:
        return
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _FUNCTION_BACKWARD.__code__:
            raise RuntimeError(f"{name}: gradient_release=True cannot step a param inside a reentrant backward "
                               "(torch.utils.checkpoint with use_reentrant=True): it accumulates a param's grad once "
                               "per segment, so a param used in two places would be stepped twice; pass "
                               "use_reentrant=False")
        frame = frame.f_back


# The autograd graph task of the latest backward from a loss that fused_optim.GradScaler scaled, or None: amp.py's
# hook on the scaled loss sets it, and autograd runs that hook before it accumulates any param's grad.
_scaled_graph_task: int | None = None


def note_scaled_backward(grad: Tensor) -> None:
    """A tensor hook on a scaled loss (fused_optim.GradScaler.scale): the backward now running is of a scaled loss."""
    global _scaled_graph_task
    _scaled_graph_task = torch._C._current_graph_task_id()


def _check_not_scaled(name: str) -> None:
    """Gradient release would step a param with its grad still scaled, before any inf/NaN check: refused in the
    backward itself, at its first param, so that no param changes (GradScaler.step refuses too, but only after)."""
    if _scaled_graph_task is not None and torch._C._current_graph_task_id() == _scaled_graph_task:
        raise RuntimeError(f"{name}: gradient_release=True cannot step a param in the backward of a loss that "
                           "GradScaler scaled: its grad is still scaled and unchecked for inf/NaN; use bf16 (no "
                           "scaler) or drop gradient_release")


def _own_entries(p: Tensor, group: dict[str, Any], place: int) -> dict[str, Any]:
    """Gradient release's entries of `p` that its one-param view of `group` overrides: the param itself and, for
    stochastic rounding, the seed that makes its stream (rounding.h's stream_key(seed, place, step)) that of the
    `place`-th tensor of the group's op call, as stream_key(own seed, 0, step)."""
    own: dict[str, Any] = {"params": [p]}
    if "seed" in group:
        own["seed"] = (group["seed"] + 0x9E3779B9 * place) % 2**32
    return own


_PLAIN_TENSORS = frozenset({Tensor, torch.nn.Parameter})
_DTYPE, _DEVICE, _IS_SPARSE = (operator.attrgetter(name) for name in ("dtype", "device", "is_sparse"))


def _grads_fit(params: list[Tensor], grads: list[Tensor]) -> bool:
    """Whether every grad passes `_check_grads`: dense, of its param's shape, device and layout (all plain tensors, or
    all DTensors with their params' meshes and placements), and of a dtype the kernels read (grad_dtype_fits).
    Decided in C-level loops over the lists (a thousand grads took 1.7-1.9 ms on a Zen 1 core, against 2.9-3.1 for
    the checks one grad at a time), so only a grad that does not fit is looked for one at a time. The shapes are
    compared a pair at a time, not as two lists: a torch.Size is an object Python's garbage collector tracks, and two
    thousand alive at once set off its collections, about three a step. Not under torch.compile, which traces the
    loop."""
    types = set(map(type, params)) | set(map(type, grads))
    dtypes, grad_dtypes = list(map(_DTYPE, params)), list(map(_DTYPE, grads))
    return ((_PLAIN_TENSORS.issuperset(types) or (types == {DTensor} and same_layouts(grads, params)))
            and not any(map(_IS_SPARSE, grads))
            and all(map(operator.eq, map(Tensor.size, grads), map(Tensor.size, params)))
            and list(map(_DEVICE, grads)) == list(map(_DEVICE, params))
            and (grad_dtypes == dtypes or all(map(grad_dtype_fits, grad_dtypes, dtypes))))


def _with_grads_for_torch(lists: list[list[Tensor]]) -> list[list[Tensor]]:
    """`_gather`'s "torch" lists (params, grads, ...) for torch's own update, which reads a dense grad in its param's
    dtype: a narrower grad of an fp32 or fp64 param (bf16/fp16, or fp32 beside fp64), which the ops read as it is
    (grad_dtype_fits), widened."""
    params, grads = lists[0], lists[1]
    widened = [g.to(p.dtype) if g.dtype != p.dtype and p.dtype in (torch.float32, torch.float64) and not g.is_sparse
               else g for p, g in zip(params, grads)]
    return [params, widened, *lists[2:]]


class FusedOptimizer(Optimizer):
    """A torch Optimizer stepped by fused_optim kernels; subclasses run torch's own argument checks first.

    Groups with `differentiable=True` (and, for SGD, params with sparse grads) are stepped by torch's own
    single-tensor implementation (`torch.optim.adam.adam`, `torch.optim.sgd.sgd`) on the same state: what they ask
    for is autograd through the update, which our in-place kernels do not record."""

    # fused_optim.GradScaler leaves the inf/NaN check of the grads to our step (optim/_guard.py).
    _checks_grads_in_step = True
    # The optimizer's moment state keys, in the order of the rows of an int8 `moment_scales`.
    _moment_keys: tuple[str, ...] = ()
    # Whether torch's own optimizer keeps a step count per param (its SGD keeps none): torch_state_dict's form.
    _torch_keeps_counts = True

    def __init__(self, params: ParamsT, defaults: dict[str, Any], *, max_grad_norm: float | None,
                 backend: str | None, gradient_release: bool = False,
                 grad_norm_group: dist.ProcessGroup | None = None) -> None:
        check_group_options(defaults)
        if defaults.get("fused"):  # torch's checks (we take both flags, and run our kernels either way)
            if defaults.get("differentiable"):
                raise RuntimeError("`fused` does not support `differentiable`")
            if defaults.get("foreach"):
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
        problem = differentiable_problem(defaults, max_grad_norm)
        if problem is not None:
            raise ValueError(problem)
        if gradient_release and max_grad_norm is not None:
            raise ValueError("gradient_release=True updates each param inside backward, before the other grads exist, "
                             "so it cannot clip by their global norm: pass max_grad_norm or gradient_release, not both")
        self.max_grad_norm = max_grad_norm
        # ZeRO: the ranks whose optimizers hold the other params (ZeroRedundancyOptimizer's own group when it is the
        # one constructing us and none was given)
        if grad_norm_group is None and max_grad_norm is not None:
            grad_norm_group = _constructing_zero_group()
        self.grad_norm_group = grad_norm_group
        self._torch_layout: dict[str, bool] | None = None  # inside torch_layout(): torch_state_dict's arguments
        self.backend = backend if backend is not None else _backend.default_backend()
        _backend.check_backend_name(self.backend)
        # the lists a step hands the kernels, kept between steps: per group by its index (torch 2.11's torch.compile
        # cannot trace id() of a dict), per param when gradient release steps it alone
        self._plans: dict[int | Tensor, Any] = {}
        # the seeds of groups drawn from this process's torch seed before torch.distributed ran (_settle_seeds)
        self._local_seeds: dict[int, int] = {}
        # gradient release: each param's own one-param view of its group, and its hook's handle (add_param_group)
        self.gradient_release = gradient_release
        self._new_release_hooks()
        try:
            super().__init__(params, defaults)
            if gradient_release:  # after the groups' own checks: FSDP2's DTensor params are refused as such
                _check_single_process(type(self).__name__)
        except BaseException:  # a later group refused: the earlier groups' hooks go too (nothing is left behind)
            self._unhook(list(self._release_hooks))
            raise
        self._take_over(list(self._release_hooks))  # only now: a refused constructor takes nothing from the older one
        self._guard = StepGuard(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "_plans"):  # not yet during Optimizer.__init__
            self._plans.clear()
        super().add_param_group(param_group)
        problem = self._group_problem(self.param_groups[-1])
        if problem is None:
            try:
                betas = self.param_groups[-1].get("betas")
                if betas is not None:  # a group's own tensors read as the constructor reads them
                    self.param_groups[-1]["betas"] = tuple(beta_value(beta, i) for i, beta in enumerate(betas))
            except ValueError as error:
                problem = str(error)
        if problem is not None:
            self.param_groups.pop()
            raise ValueError(f"{type(self).__name__}: {problem}.")
        group, index = self.param_groups[-1], len(self.param_groups) - 1
        drop_neutral_options(group)
        self._seed_group(group, index)
        if self.gradient_release:
            hooked = self._hook_group(self.param_groups[-1], take_over=True)
            if hasattr(self, "_guard"):  # after the constructor (which takes its params over once it has them all)
                self._take_over(hooked)

    def _seed_group(self, group: dict[str, Any], index: int) -> None:
        """Each group's own seed for stochastic rounding (of bf16 params or moments), saved with the state_dict so a
        resumed run draws the same; given where the group rounds so and has none (added, or its options set by
        hand since)."""
        if (group.get("stochastic_rounding") or group.get("moments") in ("bf16", "int8")) and "seed" not in group:
            distributed = _multi_process()
            group["seed"] = group_seed(index, group["params"], distributed)
            if not distributed:
                self._local_seeds[index] = group["seed"]

    def _group_problem(self, group: dict[str, Any]) -> str | None:
        """Why this optimizer cannot step `group` (its params and options, added or loaded), in one sentence; None if
        it can."""
        params = group["params"]
        devices = {p.device for p in params}
        if len(devices) > 1:
            return f"all params of a group must be on one device, got {', '.join(sorted(map(str, devices)))}"
        if len({is_dtensor(p) for p in params}) > 1:
            return "a group's params must be all DTensors or all plain tensors, not a mix"
        if group.get("master_weights") == 24 and any(p.dtype != torch.bfloat16 for p in params):
            return ("master_weights=24 keeps a bfloat16 param's master as an 8-bit remainder beside it: every param "
                    "of its group must be bfloat16 (master_weights=True keeps an exact fp32 master for any dtype)")
        if group.get("stochastic_rounding") and any(p.dtype == torch.float16 for p in params):
            return ("stochastic_rounding=True rounds bfloat16 params: an fp16 param would be rounded to nearest, its "
                    "small updates lost (master_weights=True keeps an exact fp32 master for it)")
        if self.gradient_release and any(is_dtensor(p) for p in params):
            return ("gradient_release=True does not take DTensor params: FSDP2 hands out their grads after its own "
                    "reduce-scatter, past autograd's hook")
        try:
            check_group_options(group)
        except ValueError as error:
            return str(error)
        return differentiable_problem(group, self.max_grad_norm)

    def _kind(self, p: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> str:
        """Which op call of its group steps `p` (`_gather`'s kinds): decided by its state, or before its first step
        by its dtype and the group's options, as `_init_state` will make its state."""
        if group["differentiable"]:
            return "torch"
        if "master_remainder" in state:  # int16 and int8 remainders: one op call each
            return "remainder" if state["master_remainder"].dtype == torch.int16 else "remainder24"
        if "master_param" in state:
            return "master"
        if not state and option(group, "master_weights") and p.dtype in LOW_PRECISION:
            if p.dtype != torch.bfloat16:
                return "master"
            return "remainder24" if option(group, "master_weights") == 24 else "remainder"
        if option(group, "stochastic_rounding") and p.dtype == torch.bfloat16:
            return "stochastic"
        if option(group, "moments") != "fp32" and state_dtype(p, group) != torch.float32:
            return "wide"  # an fp64 or complex param keeps its moments whole: an op call without compact moments
        return "plain"

    def _new_release_hooks(self) -> None:
        """Gradient release's per-param (own entries, live group) pairs, which each release makes its one-param view
        of, and hook handles, empty; the hooks go when the optimizer does."""
        self._release_views: dict[Tensor, tuple[dict[str, Any], dict[str, Any], torch.dtype]] = {}
        self._release_hooks: dict[Tensor, Any] = {}
        # how often each param was stepped in backward since the last step(): twice is a framework's own gradient
        # accumulation, which knows nothing of gradient release, and step() warns of it
        self._release_counts: Counter = Counter()
        remove_when_collected(self, self._release_hooks.values())

    def _hook_group(self, group: dict[str, Any], take_over: bool = False) -> list[Tensor]:
        """Gradient release: every param of `group` that takes grads is stepped by `_release` as soon as autograd
        has accumulated its grad; returns the params hooked here for the first time. Its view is a one-param group
        made at each release from its own entries and `group`'s live settings (an lr scheduler's changes included),
        so `_gather` and `_update` serve it as they serve whole groups. A param frozen since it was hooked keeps a
        live view too (a resume while it is frozen makes new group dicts). A param that another live optimizer
        steps is hooked here too only with `take_over` (add_param_group; `_take_over` then lets the other one go);
        otherwise (step(), load_state_dict) it stays the newer optimizer's.

        Each view's seed makes it draw the random bits the ordinary step would: that step's op call numbers its
        tensors by their place among the group's params of the same kind that have a grad, here taken as those that
        require one (the same whenever every trainable param gets a grad)."""
        places: Counter = Counter()  # per kind, the params of the group so far that take grads
        hooked = []
        for p in group["params"]:
            known = p in self._release_hooks
            if not (known or p.requires_grad):
                continue
            owner = _release_owner(p)
            if not (known or take_over or owner is None or owner is self):
                continue
            state = self.state.get(p, {})
            if state:  # made for a dtype or layout p has left (cast since): made again first, as the ordinary step
                self._follow_param(p, state, group)  # does before it sorts the params by kind
            kind = self._kind(p, state, group)
            # (re)pointed at the live group; the dtype its place was counted for (a param cast since moves kind)
            self._release_views[p] = (_own_entries(p, group, places[kind]), group, p.dtype)
            if p.requires_grad:
                places[kind] += 1
            if not known:
                self._release_hooks[p] = register_weak_hook(self, p, type(self)._release)
                hooked.append(p)
        return hooked

    def _take_over(self, params: list[Tensor]) -> None:
        """`params`, just hooked, are ours: an older optimizer that stepped them in backward lets them go."""
        for p in params:
            owner = _release_owner(p)
            if owner is not None and owner is not self:
                owner._unhook([p])
            _release_owners[p] = weakref.ref(self)

    def _unhook(self, params: list[Tensor]) -> None:
        """Gradient release stops for `params`: their hooks are removed, so backward leaves their grads."""
        for p in params:
            self._release_hooks.pop(p).remove()
            self._release_views.pop(p, None)
            if _release_owner(p) is self:
                del _release_owners[p]

    def _release(self, p: Tensor) -> None:
        """Steps `p` alone with the grad autograd has just accumulated, then frees that grad: the full set of grads
        is never alive at once (gradient release). No global norm, no GradScaler: both need every grad first."""
        if torch.is_grad_enabled():  # backward(create_graph=True); else backward has grad mode off already, and
            with torch.no_grad():  # @torch.no_grad() would cost 13-18 us a param here, a tenth of the release
                return self._release(p)
        entry = accumulator_of(p)
        grad = p.grad
        try:
            _check_single_process(type(self).__name__)  # torch.distributed may have started since the constructor
            _check_not_reentrant(type(self).__name__)
            _check_not_scaled(type(self).__name__)
            if entry is not None:  # a GradAccumulator's param: step only in the backward its release() armed
                accumulator, index = entry
                grad = accumulator.released_grad(index, p, weakref.WeakMethod(self._release))
        except RuntimeError:
            p.grad = None  # the refused backward's (scaled, or a segment's part): a later step() would step with it
            raise
        if grad is None:
            return
        own, group, dtype = self._release_views[p]
        if p.dtype != dtype:  # cast since it was hooked (a model's layers to bf16): its group is numbered again
            self._hook_group(group)
            own, group, _ = self._release_views[p]
        self._step_alone(p, grad, own, group)
        p.grad = None
        self._release_counts[p] += 1
        if entry is not None:
            accumulator.released(index)

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step (one fused launch per group, or per kind of write-back in a group).

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        if self.gradient_release:
            if closure is not None:
                raise ValueError(f"{type(self).__name__}: gradient_release=True steps each param inside the backward "
                                 "you run, and step() does nothing more, so it takes no closure (a framework that "
                                 "always passes one, such as Lightning, needs gradient_release=False)")
            self._release_unhooked()
            self._release_left_grads()
            self._warn_of_repeated_releases()
            return None  # every param with a grad was stepped in backward (or just now), and its grad is gone
        if self._local_seeds and not torch.compiler.is_compiling():
            self._settle_seeds()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # every grad checked before any group gathers (and creates state): a bad grad anywhere changes nothing
        group_grads = [[grad_of(p) for p in group["params"]] for group in self.param_groups]
        self._check_grads([p for group, grads in zip(self.param_groups, group_grads)
                           for p, grad in zip(group["params"], grads) if grad is not None],
                          [grad for grads in group_grads for grad in grads if grad is not None])
        known = len(self.state)
        try:
            gathered = [(group, self._gather(group, grads, index))
                        for index, (group, grads) in enumerate(zip(self.param_groups, group_grads))]
            # torch's GradScaler sets both on the optimizer for its step (grad_scale None once unscale_ ran)
            if ((getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None)
                    and any(kind == "torch" for _, calls in gathered for kind, _ in calls)):
                raise RuntimeError(f"{type(self).__name__}: a GradScaler does not step differentiable groups (or "
                                   "SGD's sparse grads): torch's own update, which runs them, takes none")
        except BaseException:  # a group refused its first step, or the step: the state earlier ones made goes too
            for p in list(self.state)[known:]:
                del self.state[p]
            self._plans.clear()
            raise
        # (a param held twice in a group: its grad counted once)
        grads = [grad for _, calls in gathered for (_, call), lists in calls.items() if call == 0
                 for grad in lists[1]]
        grad_scale, found_inf = self._guard.prepare(grads, self.max_grad_norm, self.backend, self.grad_norm_group)
        for group, calls in gathered:
            for (kind, _), lists in calls.items():
                if kind != "torch":
                    self._update(group, kind, lists, grad_scale, found_inf)
                    continue
                # the optimizer's flag, not the group's, as torch's _use_grad_for_differentiable reads it
                with torch.set_grad_enabled(self.defaults["differentiable"]):
                    self._update_with_torch(group, _with_grads_for_torch(lists))
        return loss

    def _settle_seeds(self) -> None:
        """An optimizer built before torch.distributed started hashed each rank's own torch seed into its groups'
        seeds (group_seed), and DDP replicas would round apart: once it runs, those seeds become the distributed
        ones (a seed loaded since stays)."""
        if not _multi_process():
            return
        for index, seed in self._local_seeds.items():
            group = self.param_groups[index]
            if group.get("seed") == seed:
                group["seed"] = group_seed(index, group["params"], distributed=True)
        self._local_seeds.clear()
        self._plans.clear()

    def _warn_of_repeated_releases(self) -> None:
        """Gradient release's step() ends a step: if backward stepped a param twice since the last one, the caller
        meant its grads to add up (micro-batches, several losses) and each backward was an optimizer step instead."""
        repeated = [count for count in self._release_counts.values() if count > 1]
        if repeated:
            warnings.warn(f"{type(self).__name__}: gradient_release=True stepped {len(repeated)} params more than "
                          f"once in backward since the last step() (up to {max(repeated)} times): each backward is "
                          "an optimizer step of its own. To accumulate micro-batches use fused_optim.GradAccumulator "
                          "(its release() arms the last backward), not a framework's own gradient accumulation, "
                          "which steps every micro-batch here",
                          stacklevel=5)  # the caller of step(): past it, torch's no_grad and its step-hook wrappers
        self._release_counts.clear()

    def _release_unhooked(self) -> None:
        """Gradient release's step(): a param that began to take grads after its group was hooked (unfrozen since)
        is hooked from now on, and the grad this backward gave it is stepped here."""
        for group in self.param_groups:
            if any(p.requires_grad and p not in self._release_hooks for p in group["params"]):
                hooked = self._hook_group(group)
                self._take_over(hooked)  # none of them another optimizer's: _hook_group left those
                for p in hooked:
                    if p.grad is not None:
                        self._release(p)

    def _release_left_grads(self) -> None:
        """Gradient release's step(): a param holding a grad that no backward hook took is stepped with it here, as
        step() would without gradient release: a hooked one's grad set by hand (say from torch.autograd.grad, or
        left from before the optimizer was made), or a frozen one's (frozen when its group was hooked, so it has no
        hook). A GradAccumulator's param is left to the accumulator. An ordinary step would number a frozen param's
        random bits by its place among the params holding grads, which backward has freed by now: they are
        numbered after every place the group's hooked params take, so no two tensors of the group share them."""
        for group in self.param_groups:
            first_free_place = len(group["params"])
            for index, p in enumerate(group["params"]):
                if p.grad is None or accumulator_of(p) is not None:
                    continue
                if p in self._release_hooks:
                    self._release(p)
                elif not p.requires_grad:
                    _check_single_process(type(self).__name__)
                    self._step_alone(p, p.grad, _own_entries(p, group, first_free_place + index), group)
                    p.grad = None

    def _step_alone(self, p: Tensor, grad: Tensor, own: dict[str, Any], group: dict[str, Any]) -> None:
        """Steps `p` alone with `grad`: a one-param group of its own entries `own` over its live `group`."""
        self._check_grads([p], [grad])
        view = {**group, **own}  # a dict, not a ChainMap: its dozen lookups cost a tenth
        for (kind, _), lists in self._gather(view, [grad], p).items():
            if kind == "torch":
                with torch.set_grad_enabled(self.defaults["differentiable"]):
                    self._update_with_torch(view, _with_grads_for_torch(lists))
            else:
                self._update(view, kind, lists, None, None)

    def _gather(self, group: dict[str, Any], grads: list[Tensor | None],
                key: int | Tensor) -> dict[tuple[str, int], list[list[Tensor]]]:
        """The group's params that have a grad (`grads`: each param's, or None), their grads and state, as the lists
        the update op takes ([params, grads, *state lists]), by kind of update and call (one op call each; the call
        is 0 but for a param the group holds twice: optim/_plan.py). The kinds: "torch" (a differentiable group),
        "remainder" / "remainder24" (a bf16 param's int16 / int8 master remainder), "master" (an fp32 master copy),
        "stochastic" (bf16 stochastic rounding), "wide" (an fp64 or complex param in a group of bf16 or int8 moments,
        whose own are whole) or "plain".

        Host time matters at a thousand tensors a step, so the lists are kept between steps (optim/_plan.py) and
        only the grads are read again. Everything that can be wrong with a first step is checked before any state
        is created, as torch does; the op checks the grads themselves (shape, dtype, layout) before writing."""
        has_grad = [grad is not None for grad in grads]
        options = self._plan_options(group)
        plan = self._kept_plan(key, group, has_grad, options)
        if plan is not None:
            return plan.with_grads(grads)
        # a group's option set by hand since it was checked ("INT8", "yes", stochastic rounding of fp16 params):
        # refused as the constructor would
        problem = self._group_problem(group)
        if problem is not None:
            raise ValueError(f"{type(self).__name__}: {problem}.")
        if isinstance(key, int) and not torch.compiler.is_compiling():  # (not a param's view under release)
            self._seed_group(group, key)
        with_grads = [(index, p, grad) for index, (p, grad) in enumerate(zip(group["params"], grads))
                      if grad is not None]
        self._check_dense([p for _, p, _ in with_grads])
        self._check_first_step(group, [(p, grad) for _, p, grad in with_grads])
        for _, p, _ in with_grads:
            _backend.resolve(self.backend, p.device.type)
        plan = Plan(group, self.state, has_grad, options)
        for index, p, _ in with_grads:
            state = self.state[p]
            if len(state) == 0:
                self._init_state(p, state, group)
            else:
                self._follow_param(p, state, group)
            kind = self._kind(p, state, group)
            plan.add(kind, index, p, self._state_tensors(group, state, kind))
        self._keep_plan(key, plan)
        return plan.with_grads(grads)

    def _check_dense(self, params: list[Tensor]) -> None:
        """The kernels walk a param and its state as flat arrays: a param must fill one block of memory (checked as
        a plan is made, before any state is created or any group stepped)."""
        for p in params:
            if not is_dense(p):
                raise RuntimeError(f"{type(self).__name__} steps dense params (one block of memory, in any order of "
                                   f"dimensions), not a view of shape {tuple(p.shape)} with strides {p.stride()}: "
                                   "make the param from a .contiguous() tensor")

    def _follow_param(self, p: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> None:
        """A param whose memory layout or dtype changed since its state was made (`model.to(memory_format=...)`,
        `model.to(torch.bfloat16)` or `model.float()` after a step or a load), or whose group's storage options did:
        its state is made again in the form they now ask for (the kernels walk state in the param's layout), as a
        load of it would make it. Values stay; int8 moments are coded again (their blocks run along memory), rounded
        to nearest; a master is kept, joined or started as `_restore_master` says. torch's optimizers fail on a
        param whose dtype changed under their state."""
        if _state_fits(p, state, group, self._moment_keys):
            return
        # a sparse momentum buffer (SGD's, from torch's update of a sparse grad) made dense for the kernels
        held = {key: value.to_dense() if isinstance(value, Tensor) and value.is_sparse else value
                for key, value in state.items()}
        for key in (*self._moment_keys, "moment_scales"):
            state.pop(key, None)
        restore_moments(p, state, held, group, self._moment_keys)
        _restore_master(p, state, held, group)

    def _kept_plan(self, key: int | Tensor, group: dict[str, Any], has_grad: list[bool], options: tuple
                   ) -> Plan | None:
        """The plan kept for the group `key` names, if `Plan.fits` says it is still the one it was made for. None
        while dynamo traces the step: the compiled graph's guards on the params, state and options do what `fits`
        does, and torch 2.11's dynamo cannot trace fits' identity tests of dicts."""
        if torch.compiler.is_compiling():
            return None
        plan = self._plans.get(key)
        return plan if plan is not None and plan.fits(group, self.state, has_grad, options) else None

    def _keep_plan(self, key: int | Tensor, plan: Plan) -> None:
        """Keeps `plan` for the group `key` names (its index, or its param under gradient release), but not one made
        while dynamo traces (`_kept_plan` reads none there)."""
        if torch.compiler.is_compiling():
            return
        plan.remember_state()  # the state the plan created counts as known
        self._plans[key] = plan

    def _plan_options(self, group: dict[str, Any]) -> tuple:
        """The group's options that decide its op calls: a plan made under others is made again."""
        return (option(group, "moments"), option(group, "master_weights"), option(group, "stochastic_rounding"),
                group["differentiable"])

    def _check_first_step(self, group: dict[str, Any], params_and_grads: list[tuple[Tensor, Tensor]]) -> None:
        """What `_gather` refuses before creating any state (sparse grads, param dtypes), in the optimizer's words."""
        raise NotImplementedError

    def _init_state(self, p: Tensor, state: dict[str, Tensor], group: dict[str, Any]) -> None:
        """A param's state before its first step."""
        raise NotImplementedError

    def _state_tensors(self, group: dict[str, Any], state: dict[str, Tensor], kind: str) -> list[Tensor | None]:
        """A param's entry in each state list of its op call (None where that list stays empty)."""
        raise NotImplementedError

    def _update(self, group: dict[str, Any], kind: str, lists: list[list[Tensor]], grad_scale: Tensor | None,
                found_inf: Tensor | None) -> None:
        """One fused update of `lists` (from `_gather`) with the group's hyper-parameters."""
        raise NotImplementedError

    def _update_with_torch(self, group: dict[str, Any], lists: list[list[Tensor]]) -> None:
        """torch's own single-tensor update of `lists` (`_gather`'s "torch" kind) with the group's hyper-parameters."""
        raise NotImplementedError

    # torch's error for a sparse grad, where the kernels take dense ones only (None: the optimizer steps them)
    _sparse_grad_message: str | None = None

    def _check_grads(self, params: list[Tensor], grads: list[Tensor]) -> None:
        """The kernels' own check of each grad against its param, run over every group before any group gathers
        its state or is stepped (and before the guard counts anything), so that a bad grad anywhere changes
        nothing. `grads[i]` is `params[i]`'s: two lists, not a list of pairs, whose thousand tuples a step would
        set off the garbage collector (as `_grads_fit` says)."""
        if not params or (not torch.compiler.is_compiling() and _grads_fit(params, grads)):
            return
        for p, grad in zip(params, grads):  # which grad does not fit, and how, in words
            if grad.is_sparse and self._sparse_grad_message is not None:
                raise RuntimeError(self._sparse_grad_message)
            if grad.shape != p.shape or grad.device != p.device or not grad_dtype_fits(grad.dtype, p.dtype):
                raise RuntimeError(
                    f"{type(self).__name__}: a grad must have its param's shape and device, and its param's dtype or "
                    f"float32 (or bfloat16 or float16 for a float32 or float64 param); got {tuple(grad.shape)} "
                    f"{grad.dtype} on {grad.device} for a param of {tuple(p.shape)} {p.dtype} on {p.device}"
                )
            if layout(grad) != layout(p):
                raise RuntimeError(
                    f"{type(self).__name__}: a DTensor param's grad must be a DTensor with its mesh and placements "
                    f"(and a plain param's grad a plain tensor); got {_describe_layout(grad)} for a param with "
                    f"{_describe_layout(p)}"
                )

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict, but for a DTensor param's int8 moment scales: those of its local shard's blocks,
        saved as a DTensor whose row r is rank r's (ops/_dtensor.py's rank_rows), so that a distributed checkpoint
        (DCP) keeps every rank's own; `load_state_dict` takes them back. Such a checkpoint loads on the sharding it
        was saved from; `torch_state_dict()` (fp32 moments) reshards, and is what this returns inside
        `torch_layout()`. The post hooks (`register_state_dict_post_hook`) see it last, as torch's do."""
        if self._torch_layout is not None:
            return self.torch_state_dict(**self._torch_layout)
        return self._with_state_dict_post_hooks(self._codes_with_a_unit_dim(self._own_state_dict()))

    def _codes_with_a_unit_dim(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """`state_dict` with its int8 moments' codes as views of one more dim, of size 1: DCP loads a checkpoint into
        the tensors of the dict the loading optimizer gives, and would cast codes into an fp32 or bf16 optimizer's
        moments of the param's shape without a word (its groups and state have no `moments` or `moment_scales` to
        take); of another shape, its size check refuses them. `load_state_dict` takes either shape."""
        for index, state in state_dict["state"].items():
            if "moment_scales" in state:
                state_dict["state"][index] = {**state, **{key: state[key].unsqueeze(-1) for key in self._moment_keys
                                                          if key in state}}
        return state_dict

    @contextlib.contextmanager
    def torch_layout(self, master_weights: bool = True) -> Iterator[None]:
        """Inside, `state_dict()` returns `torch_state_dict(master_weights)`: the form of torch's own optimizer, which
        DCP's `get_state_dict` then reads. A distributed checkpoint saved so reshards (fp32 moments, DTensors
        sharded as the params); one of torch's optimizer (or saved so) loads into bf16 or int8 moments in one step,
        with the dict got inside as the one `dcp.load` fills, since `set_state_dict`'s `load_state_dict` takes
        torch's form and converts it. A checkpoint of torch's optimizer has no master weights: load it with
        `master_weights=False`, and each master starts from its param as loaded."""
        before = self._torch_layout
        self._torch_layout = {"master_weights": master_weights}
        try:
            yield
        finally:
            self._torch_layout = before

    def _with_state_dict_post_hooks(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """`state_dict` after the post hooks, each given the last one's result (torch's state_dict's ending)."""
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _own_state_dict(self) -> dict[str, Any]:
        """`state_dict` before its post hooks, which may renumber its params (by name, say). Its groups hold our
        options only where not neutral (NEUTRAL_OPTIONS), as ours do, so a group of torch's settings saves torch's
        keys alone; `load_state_dict` gives a saved group without one of them the setting of the loading optimizer's
        group in its place (`_with_own_options`)."""
        with _held_back(self, "_optimizer_state_dict_post_hooks"):
            state_dict = super().state_dict()
        for group in state_dict["param_groups"]:  # (torch's copies of the groups) a neutral one set by hand, say
            drop_neutral_options(group)
        numbered = self._numbered_params()
        for index, state in state_dict["state"].items():
            param = numbered[index][0]
            if "moment_scales" in state and is_dtensor(param):
                width = scale_count(largest_shard_numel(param))
                state_dict["state"][index] = {**state, "moment_scales": rank_rows(state["moment_scales"], param,
                                                                                  width)}
        return state_dict

    def _numbered_params(self) -> list[tuple[Tensor, dict[str, Any]]]:
        """(param, its group) for every param, in the order torch's state_dict numbers them."""
        return [(p, group) for group in self.param_groups for p in group["params"]]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load_state_dict, after checking everything it will use (check_saved_state: else ValueError or
        TypeError, and nothing changes); state comes back in its dtype (moment_dtype) on the param's device whatever
        dtype it was saved in (the saved tensor itself where it is that already, as torch's loader keeps it), and a
        DTensor param's int8 scales as its rank's own (`state_dict`). The hooks run as torch runs them: the pre hooks
        first (the dict one returns is the one loaded), the post hooks last (what they set stays)."""
        if isinstance(state_dict, dict):
            state_dict = state_dict.copy()  # the pre hooks may change the dict they get: torch gives them a copy
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = self._with_codes_and_local_scales(self._with_own_options(_without_absent_state(state_dict)))
        check_saved_state(self, state_dict, self._moment_keys)
        self._plans.clear()
        before = {"state": self.state, "param_groups": self.param_groups}  # torch's loader makes both anew
        try:
            with _held_back(self, "_optimizer_load_state_dict_pre_hooks"), \
                    _held_back(self, "_optimizer_load_state_dict_post_hooks"):
                # the groups alone: torch's loader would cast every saved tensor to its param's dtype (int8 codes to
                # floats), copies that _restore_saved_state would throw away
                super().load_state_dict({**state_dict, "state": {}})
            for group in self.param_groups:  # a checkpoint may hold them (one saved before they were left out)
                drop_neutral_options(group)
            self._restore_saved_state(state_dict)
            _unshare_state(self)
        except BaseException:  # a load that fails part way, past what check_saved_state knew to check: no change
            self.__setstate__(before)
            raise
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _with_own_options(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """`state_dict` with each saved group given the options it left out (our neutral ones, which `state_dict()`
        leaves out, and the rounding seed, which torch's form does) from this optimizer's group of its place: a group
        built with fp32 moments in an optimizer of int8 ones loads back as fp32, not as the optimizer's default. But
        master weights and stochastic rounding are alternatives: a group saved with one left the other out at its
        neutral value, and keeps it so."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if not isinstance(groups, list) or len(groups) != len(self.param_groups) or not all(
                isinstance(group, dict) for group in groups):
            return state_dict  # check_saved_state (or torch) says what is wrong
        merged = []
        for group, saved in zip(self.param_groups, groups):
            options = {key: group[key] for key in (*NEUTRAL_OPTIONS, "seed") if key in group}
            if any(saved.get(key) for key in ALTERNATIVES):  # the other one was saved off, and left out
                options.update({key: NEUTRAL_OPTIONS[key] for key in ALTERNATIVES})
            merged.append({**options, **saved})
        return {**state_dict, "param_groups": merged}

    def _required_state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """What a param's saved state must hold, where it holds anything, for this group's update to step it."""
        return ()

    def _with_codes_and_local_scales(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """`state_dict` with each param's saved int8 codes in its shape (`_codes_with_a_unit_dim`; a dict saved
        before that holds them so already), and each DTensor param's saved int8 scales (a rank_rows DTensor) as this
        rank's plain rows."""
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict):
            return state_dict  # check_saved_state says what is wrong
        saved_ids = [i for group in state_dict.get("param_groups", []) for i in group.get("params", [])]
        state = dict(state_dict["state"])
        for param_id, (p, _) in zip(saved_ids, self._numbered_params()):
            saved = state.get(param_id)
            if not isinstance(saved, dict):
                continue
            saved = {**saved, **{key: saved[key].squeeze(-1) for key in self._moment_keys
                                 if _is_codes_with_a_unit_dim(saved.get(key), p, "moment_scales" in saved)}}
            if is_dtensor(saved.get("moment_scales")) and is_dtensor(p):
                width = scale_count(p.to_local().numel())
                saved["moment_scales"] = local_rows(saved["moment_scales"], p, width)
            state[param_id] = saved
        return {**state_dict, "state": state}

    def _restore_saved_state(self, state_dict: dict[str, Any]) -> None:
        """After torch's load_state_dict: our state's own dtypes, devices and forms (restore_saved_state)."""
        restore_saved_state(self, state_dict, self._moment_keys)

    def torch_state_dict(self, master_weights: bool = True) -> dict[str, Any]:
        """The state_dict in the form torch's own optimizer (and an fp32-master trainer) reads: each bf16 param's
        master remainder joined with the param into its fp32 master, `master_param` (with `master_weights=False`,
        no masters, as torch's own optimizer keeps); bf16 and int8 moments
        (moments="bf16", "int8") as fp32, without their scales; the rest as `state_dict()` gives it (step counts, but
        where torch's optimizer keeps none: `_torch_keeps_counts`).
        Its groups hold torch's keys alone: without our options and rounding seed, which `load_state_dict` then
        takes from the optimizer it loads into (so DCP, which asks for every key of the dict it fills, loads a
        checkpoint of torch's optimizer into it). `state_dict()` itself saves remainders and moments as they are;
        `load_state_dict` takes either form back. The state_dict post hooks see it last, as `state_dict()`'s."""
        state_dict = self._own_state_dict()
        for group in state_dict["param_groups"]:
            for key in (*NEUTRAL_OPTIONS, "seed"):
                group.pop(key, None)
        numbered = self._numbered_params()
        for index, state in state_dict["state"].items():
            param, group = numbered[index]
            state = dict(state)  # the state_dict's entries are the optimizer's own dicts' tensors: copy the dict
            if not master_weights:
                state.pop("master_remainder", None)
                state.pop("master_param", None)
            if "master_remainder" in state:
                state["master_param"] = on_local_shards(join_master, param.detach(), state.pop("master_remainder"))
            if "moment_scales" in state:
                local = param.to_local() if is_dtensor(param) else param
                scales = local_rows(state.pop("moment_scales"), param, scale_count(local.numel()))
                state.update({key: on_local_shards(lambda codes, row=row: dequantize(codes, scales[row]), state[key])
                              for row, key in enumerate(self._moment_keys) if key in state})
            elif option(group, "moments") != "fp32":
                state.update({key: value.float() for key, value in state.items()
                              if key != "step" and isinstance(value, Tensor) and value.dtype == torch.bfloat16})
            if not self._torch_keeps_counts:
                state.pop("step", None)
            state_dict["state"][index] = state
        # as torch's optimizer keeps no entry for a param without state
        state_dict["state"] = {index: state for index, state in state_dict["state"].items() if state}
        return self._with_state_dict_post_hooks(state_dict)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Whether torch's GradScaler hands our step grad_scale and found_inf rather than unscaling and checking the
        grads itself: with `fused=True`, as torch's fused optimizers (the step takes both on the device, no extra
        pass), and whenever a param is stepped from a GradAccumulator main grad, which torch's own unscale (of
        `.grad` alone) would leave scaled. Not otherwise: frameworks read the flag as "the optimizer unscales, so
        nothing may clip before it" (Lightning refuses `gradient_clip_val` then, even under bf16 with no scaler at
        all). fused_optim.GradScaler folds the unscale and the inf check into the step either way (it asks for
        `_checks_grads_in_step`)."""
        return bool(self.defaults.get("fused")) or self._guard.reads_main_grads()

    @property
    def skipped_steps(self) -> Tensor:
        """How many steps were skipped for inf/NaN grads: a 0-dim float32 tensor on the params' device."""
        return self._guard.skipped_steps

    @property
    def may_have_skipped(self) -> bool:
        """False until a step has checked its grads for inf/NaN (max_grad_norm, a GradScaler): until then no step
        can have been skipped, and `skipped_steps` is 0 without reading it."""
        return self._guard.may_have_skipped

    @property
    def last_grad_norm(self) -> Tensor | None:
        """With max_grad_norm (or fused_optim.GradScaler), the global norm of the unscaled grads of the last step,
        before clipping: a 0-dim tensor on the device, float32 (float64 where some grad is float64 or complex, or the
        ranks' parts are summed: grad_norm_group). None before the first such step."""
        return self._guard.last_grad_norm

    def __getstate__(self) -> dict[str, Any]:
        # the release hooks are the live params' own: a copy or an unpickled optimizer registers its own
        return {**super().__getstate__(), "backend": self.backend, "max_grad_norm": self.max_grad_norm,
                "gradient_release": self.gradient_release, "local_seeds": self._local_seeds}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch pickles only defaults, state and param_groups; the rest is ours to restore (deepcopy, pickle).
        # torch's load_state_dict calls this too, with neither: the backend chosen at construction stays.
        self.backend = state.pop("backend", None) or getattr(self, "backend", None) or _backend.default_backend()
        if "max_grad_norm" in state or not hasattr(self, "max_grad_norm"):
            self.max_grad_norm = state.pop("max_grad_norm", None)
        self.grad_norm_group = getattr(self, "grad_norm_group", None)  # a process group is not pickled: none
        self._torch_layout = getattr(self, "_torch_layout", None)
        if "local_seeds" in state or not hasattr(self, "_local_seeds"):
            self._local_seeds = dict(state.pop("local_seeds", {}))
        super().__setstate__(state)
        if not hasattr(self, "_guard"):
            self._guard = StepGuard(self)
        self._plans = {}
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key != "params" and key not in NEUTRAL_OPTIONS:  # a group without one of ours holds it neutral
                    group.setdefault(key, value)
        if "gradient_release" in state or not hasattr(self, "gradient_release"):  # a copy or an unpickling
            self.gradient_release = state.get("gradient_release", False)
            self._new_release_hooks()
        if self.gradient_release:  # load_state_dict made new group dicts: the views follow them
            for group in self.param_groups:
                self._take_over(self._hook_group(group))  # none of them another optimizer's: _hook_group left those


@contextlib.contextmanager
def _held_back(optimizer: Optimizer, hooks: str) -> Iterator[None]:
    """Within the block, torch's methods find none of the optimizer's `hooks` (the name of one of its hook dicts):
    ours run them themselves, where torch would, around work of their own."""
    held = getattr(optimizer, hooks)
    setattr(optimizer, hooks, OrderedDict())
    try:
        yield
    finally:
        setattr(optimizer, hooks, held)


def _without_absent_state(state_dict: Any) -> Any:
    """`state_dict` without what it holds of nothing: None state values (torch's SGD saves a momentum buffer not yet
    made as None) and empty dicts (torch.distributed.checkpoint's flattened form unflattens a key of the live state
    that the checkpoint lacks as {}: our SGD's count, which its state_dict leaves out), as if never saved, a param's
    state left empty so, and the state of ids that no saved group lists (torch's loader would keep it under its bare
    id, where no param steps it and our state_dict could not number it)."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) or not isinstance(
            state_dict.get("param_groups"), list):
        return state_dict  # check_saved_state says what is wrong
    listed = {param_id for group in state_dict["param_groups"] if isinstance(group, dict)
              for param_id in group.get("params", ())}
    state = {}
    for param_id, saved in state_dict["state"].items():
        if isinstance(saved, dict):
            saved = {key: value for key, value in saved.items() if value is not None and not _empty_dict(value)}
            if not saved:
                continue
        if param_id in listed:
            state[param_id] = saved
    return {**state_dict, "state": state}


def _empty_dict(value: Any) -> bool:
    return isinstance(value, dict) and not value


def _describe_layout(t: Tensor) -> str:
    return f"placements {tuple(t.placements)} on {t.device_mesh}" if is_dtensor(t) else "a plain tensor"


def check_saved_state(optimizer: FusedOptimizer, state_dict: dict[str, Any], moment_keys: dict[str, bool]) -> None:
    """Everything load_state_dict will use from `state_dict`, checked before anything is loaded (ValueError or
    TypeError, and nothing changes): torch's own group checks, in its words; each saved group's options with this
    optimizer's params, as add_param_group checks them; then each param's saved state: a dict of this optimizer's
    keys only, holding every one its group's update reads, whose moments (`moment_keys`, key -> signed) and master
    weights are tensors of the param's shape, int8 moments codes of their kind beside their scales, whose master
    remainder is int16 or int8 beside a bf16 param, and whose `step` is a number or a 1-element tensor."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError("loaded state dict must be a dict with 'state' and 'param_groups'")
    groups, saved_groups = optimizer.param_groups, state_dict["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
        raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
    name = type(optimizer).__name__
    for index, (saved_group, group) in enumerate(zip(saved_groups, groups)):
        problem = optimizer._group_problem({**saved_group, "params": group["params"]})
        if problem is not None:
            raise ValueError(f"{name}: loaded state dict's param group {index}: {problem}.")
        required = optimizer._required_state_keys(saved_group)
        for param_id, p in zip(saved_group["params"], group["params"]):
            saved = state_dict["state"].get(param_id, {})
            if not isinstance(saved, dict):
                raise TypeError(f"loaded state dict's state of param {param_id} is a {type(saved).__name__}, not a dict")
            foreign = [key for key in saved if key not in (*moment_keys, *_STATE_KEYS)]
            if foreign:
                raise ValueError(f"loaded state dict's state of param {param_id} holds {foreign[0]!r}, which {name} "
                                 "does not keep: is it another optimizer's state?")
            missing = [key for key in required if key not in saved]
            if saved and missing:
                raise ValueError(f"loaded state dict's state of param {param_id} has no {missing[0]!r}, which "
                                 f"{name}'s update reads")
            for key in (*moment_keys, "master_param", "master_remainder"):
                value = saved.get(key)
                if value is None:
                    continue
                if not isinstance(value, Tensor):
                    raise TypeError(f"loaded state dict's {key!r} of param {param_id} is a {type(value).__name__}, "
                                    "not a tensor")
                if value.shape != p.shape:
                    raise ValueError(f"loaded state dict's {key!r} of param {param_id} has shape "
                                     f"{tuple(value.shape)}, but the param has shape {tuple(p.shape)}")
                if is_dtensor(value) != is_dtensor(p) or (is_dtensor(p) and value.device_mesh != p.device_mesh):
                    raise ValueError(f"loaded state dict's {key!r} of param {param_id} is {_sharding(value)}, but the "
                                     f"param is {_sharding(p)}: load a state saved on the param's mesh (any "
                                     "placements; torch.distributed.checkpoint reshards one saved on another)")
            _check_saved_codes(saved, param_id, p, moment_keys)
            remainder = saved.get("master_remainder")
            if remainder is not None and (remainder.dtype not in REMAINDER_DTYPES or p.dtype not in JOINS_REMAINDERS):
                raise TypeError(f"loaded state dict's 'master_remainder' of param {param_id} is {remainder.dtype} for "
                                f"a {p.dtype} param; a master remainder is int16 or int8, beside a bfloat16 param (or "
                                "an fp32 or fp64 one holding its value, which takes the master they make)")
            step = saved.get("step")
            if step is not None and not (isinstance(step, numbers.Real) or (isinstance(step, Tensor)
                                                                            and step.numel() == 1)):
                raise TypeError(f"loaded state dict's 'step' of param {param_id} must be a number or a one-element "
                                f"tensor, not {step!r}")


def _sharding(t: Tensor) -> str:
    """How t is laid out over the ranks, in words: its mesh's ranks (a 2-D mesh as rows), or none."""
    return f"a DTensor on the mesh of ranks {t.device_mesh.mesh.tolist()}" if is_dtensor(t) else "a plain tensor"


def _is_codes_with_a_unit_dim(saved: Any, p: Tensor, beside_scales: bool) -> bool:
    """Whether `saved` is int8 codes of p's shape and one more dim of size 1 (FusedOptimizer._codes_with_a_unit_dim):
    int8 or uint8, or any dtype beside int8 scales (codes cast, which check_saved_state then refuses as such)."""
    return (isinstance(saved, Tensor) and (beside_scales or saved.dtype in (torch.int8, torch.uint8))
            and saved.dim() == p.dim() + 1 and saved.shape[-1] == 1)


def _check_saved_codes(saved: dict[str, Any], param_id: Any, p: Tensor, moment_keys: dict[str, bool]) -> None:
    """A param's saved int8 moments (moments="int8") are codes of their kind (int8 signed, uint8 not), all of them,
    beside their bf16 `moment_scales`, one row per moment."""
    held = [key for key in moment_keys if key in saved]
    coded = [key for key in held if saved[key].dtype in (torch.int8, torch.uint8)]
    scales = saved.get("moment_scales")
    if not coded and scales is None:
        return
    for key in held:
        dtype, codes = saved[key].dtype, code_dtype(moment_keys[key])
        if key in coded and dtype != codes:
            raise TypeError(f"loaded state dict's {key!r} of param {param_id} holds {dtype} codes, where {key}'s "
                            f"codes are {codes}")
        if key not in coded:
            raise TypeError(f"loaded state dict's {key!r} of param {param_id} is {dtype} beside int8 'moment_scales': "
                            f"an int8 moment loads as its codes ({codes} for {key}), and a cast makes values of them")
    local = p.to_local() if is_dtensor(p) else p
    expected = (len(held), scale_count(local.numel()))
    if not isinstance(scales, Tensor) or scales.dtype != torch.bfloat16 or tuple(scales.shape) != expected:
        raise TypeError(f"loaded state dict's int8 moments of param {param_id} need their 'moment_scales': a bfloat16 "
                        f"tensor of shape {expected}, got {scales if scales is None else (scales.dtype, tuple(scales.shape))}")


def saved_states(optimizer: Optimizer, saved: dict[str, Any]) -> Iterator[tuple[Tensor, dict[str, Any], dict[str, Any]]]:
    """(param, its group, its saved state) for each param that `saved` holds a state of."""
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        for p, param_id in zip(group["params"], saved_group["params"]):
            saved_state = saved["state"].get(param_id)
            if saved_state:
                yield p, group, saved_state


def restore_saved_state(optimizer: Optimizer, saved: dict[str, Any], moment_keys: dict[str, bool]) -> None:
    """Each param's state from its saved one, after torch's loader has loaded the groups: its moments
    (restore_moments), its master weight (_restore_master), and a float32 `step` on its device (0 where the saved
    state has none)."""
    for p, group, saved_state in saved_states(optimizer, saved):
        state = optimizer.state[p]
        restore_moments(p, state, saved_state, group, moment_keys)
        _restore_master(p, state, saved_state, group)
        state["step"] = torch.as_tensor(saved_state.get("step", 0.0)).to(device=p.device, dtype=torch.float32,
                                                                         copy=True)


def _unshare_state(optimizer: Optimizer) -> None:
    """After a load: a state tensor whose memory another one already holds (one saved tensor under two params or two
    keys, which torch.load keeps as one) becomes a copy, so that each param steps its own state. (torch's loader
    shares it where it need not cast it, and casts it apart where it must: neither would step right for both.)"""
    held = set()
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, Tensor) and value.numel() and not value.is_sparse:  # (no data pointer)
                address = (value.to_local() if is_dtensor(value) else value).data_ptr()
                if address in held:
                    state[key] = value.clone(memory_format=torch.preserve_format)
                held.add(address)


def _taken(value: Tensor, p: Tensor, dtype: torch.dtype) -> Tensor:
    """`value` as state of `p` in `dtype`: the saved tensor itself where it is that already (on the param's device,
    in its layout, a DTensor of its placements), as torch's loader keeps it, so a resume holds no copy of the state
    beside the checkpoint's; else a copy in that form. Like torch's, a state loaded from a live optimizer's
    `state_dict()` then shares its tensors. A tensor that requires grad (another model's weight, say) is copied."""
    if value.is_sparse:  # an SGD buffer torch's own update made for sparse grads, and reads: kept sparse, as torch does
        return value.to(device=p.device, dtype=dtype)
    if (value.dtype == dtype and value.device == p.device and same_layout(value, p) and not value.requires_grad
            and not isinstance(value, torch.nn.Parameter) and is_dtensor(value) == is_dtensor(p)
            and (not is_dtensor(p) or (value.device_mesh, value.placements) == (p.device_mesh, p.placements))):
        return value
    return torch.empty_like(p, dtype=dtype).copy_(value)


def _state_fits(p: Tensor, state: dict[str, Any], group: dict[str, Any], moment_keys: dict[str, bool]) -> bool:
    """Whether a param's state is in the form its memory layout, its dtype and its group's options ask for: what
    `_init_state` would make (`moment_keys`: key -> signed)."""
    if not all(same_layout(value, p) for value in state.values()
               if isinstance(value, Tensor) and value.shape == p.shape):
        return False
    if any(isinstance(state.get(key), Tensor) and state[key].dtype != moment_dtype(p, group, signed)
           for key, signed in moment_keys.items()):
        return False
    master_weights = option(group, "master_weights") if p.dtype in LOW_PRECISION else False
    if p.dtype == torch.bfloat16 and master_weights:
        remainder = state.get("master_remainder")
        return ("master_param" not in state and remainder is not None
                and remainder.dtype == remainder_dtype(master_weights))
    if master_weights:  # an fp16 param's fp32 copy
        return "master_remainder" not in state and "master_param" in state
    return not state.keys() & {"master_param", "master_remainder"}


def restore_moments(p: Tensor, state: dict[str, Tensor], saved_state: dict[str, Any], group: dict[str, Any],
                     moment_keys: dict[str, bool]) -> None:
    """A param's moments after a load, from the saved values (`moment_keys`: key -> signed), in the param's memory
    layout (which the kernels walk state in) and in this group's storage: saved int8 codes with their scales as they
    are into an int8 group where they have the param's layout, else dequantized; any other saved moment converted to
    ours, rounded to nearest (to int8 codes with new scales)."""
    saved_scales = saved_state.get("moment_scales")
    keys = [key for key in moment_keys if key in saved_state]
    codes_saved = saved_scales is not None and all(saved_state[key].dtype in (torch.int8, torch.uint8) for key in keys)
    if int8_moments(p, group) and codes_saved and all(same_layout(saved_state[key], p) for key in keys):
        for key in keys:
            state[key] = _taken(saved_state[key], p, saved_state[key].dtype)
        state["moment_scales"] = saved_scales.to(p.device).contiguous()  # the kernels read each row as one array
        return
    int8 = int8_moments(p, group)
    local_scales = []
    for row, (key, signed) in enumerate(moment_keys.items()):
        if key not in saved_state:
            continue
        value = saved_state[key]
        if value.dtype in (torch.int8, torch.uint8):
            value = on_local_shards(lambda codes, row=row: dequantize(codes, saved_scales[row].to(codes.device)),
                                    value.to(p.device))
        value = _taken(value, p, torch.float32 if int8 else moment_dtype(p, group))
        if int8:  # coded one moment at a time: a load holds one fp32 moment at most
            value = value.to_dense() if value.is_sparse else value
            codes, scales = quantize(value.to_local() if is_dtensor(p) else value, signed)
            value = on_local_shards(lambda _, codes=codes: codes, value)
            local_scales.append(scales)
        state[key] = value
    if local_scales:
        state["moment_scales"] = torch.stack(local_scales)


@torch.no_grad()
def _restore_master(p: Tensor, state: dict[str, Tensor], saved_state: dict[str, Any], group: dict[str, Any]) -> None:
    """A param's master weight after a load, in its own form (init_master): an fp32 copy for an fp16 param, a
    remainder for a bf16 one. A saved fp32 master of a bf16 param (torch_state_dict's, or an fp32 copy) is split:
    the param takes its rounding and the remainder the rest, so the master comes back exactly; an fp32 (or wider)
    param takes it whole and keeps none. A bf16 or fp16 param in a group without master weights keeps none either,
    and stays as loaded (the group's choice, stochastic rounding say, holds). A state saved without a master
    (torch's, say) starts it from the param where the group keeps master weights, at the param's next step. A saved
    remainder is kept as it is where the group keeps that kind (int16 for `master_weights=True`, int8 for 24) beside a
    bf16 param; else the fp32 master it makes with the param (as loaded: a bf16 value, in a wider dtype too) is taken
    as a saved fp32 one (an fp16 param starts a master of its own, if its group keeps one, at its next step)."""
    state.pop("master_param", None)  # the master of the state made again (_follow_param): re-taken below
    state.pop("master_remainder", None)
    if "master_remainder" in saved_state:
        remainder = saved_state["master_remainder"]
        master_weights = option(group, "master_weights")
        if master_weights and p.dtype == torch.bfloat16 and remainder.dtype == remainder_dtype(master_weights):
            state["master_remainder"] = _taken(remainder, p, remainder.dtype)
            return
        saved_state = {key: value for key, value in saved_state.items() if key != "master_remainder"}
        if p.dtype in JOINS_REMAINDERS:  # (an fp16 one's rounding lost the bf16 param the remainder was split from)
            param = p.detach().to(torch.bfloat16)
            saved_state["master_param"] = on_local_shards(join_master, param, _taken(remainder, param, remainder.dtype))
    if "master_param" in saved_state and p.dtype not in LOW_PRECISION:  # a param as wide as its master: the master
        p.copy_(saved_state["master_param"])
    elif not option(group, "master_weights"):
        return
    elif "master_param" in saved_state and p.dtype == torch.bfloat16:
        bits = 24 if option(group, "master_weights") == 24 else 32
        master = saved_state["master_param"].to(device=p.device, dtype=torch.float32)
        param, remainder = on_local_shards(lambda shard: split_master(shard, bits), master)
        p.copy_(param)
        state["master_remainder"] = _taken(remainder, p, remainder.dtype)
    elif "master_param" in saved_state:
        state["master_param"] = _taken(saved_state["master_param"], p, torch.float32)
    elif p.dtype == torch.bfloat16:  # a zero remainder: the master is the param, whatever it holds at the step
        init_master(p, state, option(group, "master_weights"))
    # (an fp16 param's fp32 copy is started at its next step, `_follow_param`, from the param as it is then: a copy
    # taken now would undo the model's weights loaded after the optimizer's state, a torch checkpoint's say)
