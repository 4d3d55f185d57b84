"""The `fused_optim` torch.library namespace (every op schema of the package is defined in it) and the helpers the
ops share."""

from typing import Callable, Iterator

import torch

from fused_optim import _backend
from fused_optim._chunks import chunks
from fused_optim.int8_moments import BLOCK, blocks_of, memory_order, scale_count
from fused_optim.master_remainder import are_remainders, join_master, store_split
from fused_optim.rounding import bf16_stochastic_round

lib = torch.library.Library("fused_optim", "DEF")

# The dtypes the kernels read and write (params, grads, logits); their math is fp32.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill one block of memory without gaps or overlaps, in any dimension order
    (the kernels walk it as a flat array)."""
    expected_stride = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda dim: dim[1]):
        if size != 1:
            if stride != expected_stride:
                return False
            expected_stride *= size
    return True


# Each op's name per concrete backend, by the name of its C++ op (define_op).
_OP_NAMES: dict[str, dict[str, str]] = {}


def define_op(name: str, schema: str, *, fake: Callable, torch_impl: Callable, triton_impl: Callable,
              sparse_message: str | None = None) -> None:
    """Defines op `name` (the C++ extensions register its CPU and CUDA kernels) and its two twins with the same
    schema: `<name>_triton` (the Triton kernels, on CUDA tensors, and CPU ones under TRITON_INTERPRET=1) and
    `<name>_torch` (torch's own ops); an in-place op's trailing underscore stays last (`adam_step_triton_`). Every
    one gets the fake impl; with `sparse_message`, a sparse grad reaching the kernels raises it."""
    stem, inplace = (name[:-1], "_") if name.endswith("_") else (name, "")
    names = {"cpu": name, "cuda": name, "triton": f"{stem}_triton{inplace}", "torch": f"{stem}_torch{inplace}"}
    for op_name in (name, names["triton"], names["torch"]):
        lib.define(op_name + schema)
        torch.library.register_fake(f"fused_optim::{op_name}", fake, lib=lib)
        # no op has a derivative: its outputs do not require grad whatever its inputs do (autograd's fallback for an
        # op with no autograd kernel would mark them, and a backward through them would give None with a warning)
        lib.impl(op_name, torch.library.fallthrough_kernel, "Autograd")
    lib.impl(names["torch"], _without_autograd(torch_impl), "CompositeExplicitAutograd")
    lib.impl(names["triton"], _on_the_tensors_device(triton_impl), "CUDA")
    lib.impl(names["triton"], triton_impl, "CPU")  # CPU tensors only under TRITON_INTERPRET=1 (checked in _backend)
    if sparse_message is not None:
        refuse_sparse_grads((name, names["triton"]), sparse_message)
    _OP_NAMES[name] = names


def _first_tensor(args) -> torch.Tensor | None:
    """The first tensor among an op's arguments, or in its first non-empty tensor list."""
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg
        if isinstance(arg, (list, tuple)) and arg and isinstance(arg[0], torch.Tensor):
            return arg[0]
    return None


def _on_the_tensors_device(triton_impl: Callable) -> Callable:
    """Triton launches on the current CUDA device, with its current stream: a call on tensors of another device
    (cuda:1 while the current device is 0) runs with theirs made current, as the C++ launchers' DeviceGuard does."""
    def launch(*args, **kwargs):
        tensor = _first_tensor((*args, *kwargs.values()))
        if tensor is None:  # (nothing to step: the op only checks its arguments)
            return triton_impl(*args, **kwargs)
        with torch.cuda.device(tensor.device):
            return triton_impl(*args, **kwargs)
    return launch


def count_writes(params) -> None:
    """A step writes its params in place: their version counters are bumped, as torch's optimizers' in-place ops
    bump them, so autograd refuses a backward that would read a param stepped since it was saved (gradient release
    stepping it while a later node of the same backward still needs it, or a step between two backwards of a
    retained graph), where it would silently compute with the new values. Done here, once per step, not by an
    ADInplaceOrView kernel of the ops, which would pass all of their tensor lists through Python on every call."""
    torch.autograd.graph.increment_version(params)


def _without_autograd(torch_impl: Callable) -> Callable:
    """A torch twin runs its torch ops without recording them: its outputs are not differentiable, as the kernels'
    are not (no op has an autograd formula), whether or not its inputs require grad, eager or compiled."""

    def run(*args, **kwargs):
        with torch.no_grad():
            return torch_impl(*args, **kwargs)

    return run


@torch.compiler.assume_constant_result  # torch.compile: run while tracing, not traced through the backend lookup
def op_name(name: str, backend: str, device_type: str) -> str:
    """The name of op `name`'s twin that `backend` ("auto", "cuda", ...) runs on tensors of `device_type`."""
    return _OP_NAMES[name][_backend.resolve(backend, device_type)]


def resolve_op(name: str, backend: str, device_type: str) -> torch._ops.OpOverload:
    """Op `name`'s twin that `backend` runs on tensors of `device_type` (see op_name)."""
    return getattr(torch.ops.fused_optim, op_name(name, backend, device_type)).default


def refuse_sparse_grads(op_names: tuple[str, ...], message: str) -> None:
    """A sparse grad sends a call of these ops to the sparse dispatch keys: raise `message` there (the optimizer's
    own sentence) rather than the dispatcher's "no kernel" error."""

    def refuse(*args, **kwargs):
        raise RuntimeError(message)

    for name in op_names:
        for dispatch_key in ("SparseCPU", "SparseCUDA"):
            lib.impl(name, refuse, dispatch_key)


def real_views(lists: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """`lists` (params first, then their grads and state) with complex tensors as real ones with a trailing (re, im)
    dim (torch.view_as_real: no copy), others unchanged. An elementwise update treats a complex number as its two
    parts, as torch's Adam does and torch's SGD's arithmetic amounts to, so complex64 params run the fp32 kernels.
    Without a complex param the lists are returned as they are, each tensor not looked at again (a thousand tensors
    a list): a real param's grad and state are real, or the op refuses their dtypes."""
    for p in lists[0]:
        if p.is_complex():
            return [[torch.view_as_real(t) if t.is_complex() else t for t in tensors] for tensors in lists]
    return lists


def split_wide(lists: list[list[torch.Tensor]]) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """`lists` (params first, each list empty or one tensor per param) split into the float64 params' lists and
    the others': the kernels are fp32/bf16/fp16, so float64 params run torch's own implementation."""
    params = lists[0]
    wide = [i for i, p in enumerate(params) if p.dtype == torch.float64]
    if not wide:
        return [[] for _ in lists], lists
    narrow = [i for i in range(len(params)) if params[i].dtype != torch.float64]

    def pick(indices):
        return [[tensors[i] for i in indices] if tensors else [] for tensors in lists]

    return pick(wide), pick(narrow)


def grad_multiplier_and_skip(maximize: bool, grad_scale, found_inf):
    """For the torch twins of the optimizer ops: what each grad is multiplied by (1 / grad_scale in its dtype: fp32
    as the kernels form it, fp64 for fp64 params; negated when maximizing) and the device-side "skip this step" flag
    (None without found_inf)."""
    grad_multiplier = -1.0 if maximize else 1.0
    if grad_scale is not None:
        grad_multiplier = grad_multiplier * grad_scale.reciprocal()
    return grad_multiplier, (found_inf != 0 if found_inf is not None else None)


def step_scalars(device: torch.device, lr, grad_scale, found_inf, wide: bool = False):
    """An optimizer op's (lr, lr_tensor, grad_scale, found_inf) for a group on `device`: a tensor lr becomes
    lr_tensor (read on the device; lr is then 0.0), and GradScaler's tensors, kept on its own device, are copied to
    this one where they differ. grad_scale is fp32 for the kernels and fp64 for the torch ops' fp64 params (`wide`):
    a step's guard makes it fp64, clip factor and all, where the clipping norm counts fp64 or complex grads. No host
    sync either way.

    lr_tensor is fp32, or fp64 where the lr is (the kernels read it exactly, as torch's fused CPU Adam does). Under
    torch.compile a float lr becomes an fp64 lr_tensor: an op's float argument is a constant of the graph, so a
    scheduler's changing lr would compile the step again per value, and as a tensor computed from it dynamo makes
    it an input of the graph after its first change, as it does for torch's optimizers (`0 + lr`: torch.tensor(lr)
    would still make it a constant). The kernels read both the same, so compiled and eager steps stay bit-identical."""
    lr_tensor = None
    if isinstance(lr, torch.Tensor):
        # 0-dim, as torch reads a one-element lr of any shape: the torch backend broadcasts it against the params
        lr_tensor = lr.to(device=device, dtype=torch.float64 if lr.dtype == torch.float64 else torch.float32,
                          non_blocking=True).reshape(())
        lr = 0.0
    elif torch.compiler.is_compiling():
        lr_tensor = torch.zeros((), dtype=torch.float64, device=device).add(lr)
        lr = 0.0
    if grad_scale is not None:
        grad_scale = grad_scale.to(device, torch.float64 if wide else torch.float32, non_blocking=True)
    if found_inf is not None and found_inf.device != device:
        found_inf = found_inf.to(device, non_blocking=True)
    return lr, lr_tensor, grad_scale, found_inf


def param_masters(params, master_params) -> tuple[list, list]:
    """Per param, its master copy and its master remainder (None each where there is none): an op's master list is
    one or the other (float_io.h's WriteBack)."""
    remainders = are_remainders(master_params)
    none = [None] * len(params)
    if not master_params:
        return none, none
    return (none, list(master_params)) if remainders else (list(master_params), none)


def pieces(params) -> Iterator[tuple[int, slice]]:
    """(index, part) of each piece of the params: a param's elements in memory order, CHUNK at a time
    (fused_optim/_chunks.py). The torch twins of the optimizer ops update a piece at a time, so that their fp32 copies
    and int64 random bits stay near a hundred MB however large a param; a piece rounds with its elements' own random
    bits (rounding.py's `start`)."""
    for i, p in enumerate(params):
        for part in chunks(p.numel()):
            yield i, part


def piece(t: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    """The elements `part` of t in memory order: a flat view, which writes through (None for None)."""
    return None if t is None else memory_order(t)[part]


def piece_scales(scales: torch.Tensor, part: slice) -> torch.Tensor:
    """A param's int8 scale rows (moments, blocks) for the blocks of `part`: a view."""
    return scales[:, blocks_of(part)]


def update_start(param: torch.Tensor, master, remainder) -> torch.Tensor:
    """The value an update in torch ops starts from (float_io.h's load_param): a bf16 param joined with its
    remainder, its fp32 master copy, or the param itself in fp32 (fp64 for fp64 params)."""
    if remainder is not None:
        return join_master(param, remainder)
    if master is not None:
        return master
    return param.to(torch.promote_types(param.dtype, torch.float32))


def store_update(param: torch.Tensor, master, remainder, updated: torch.Tensor, skip, stochastic=None,
                 start: int = 0) -> None:
    """An update's result written back in torch ops (float_io.h's write_param): split into the bf16 param and its
    remainder, or into the master copy and the param rounded to nearest, or (`stochastic`: the (seed, index, step)
    of the param's random stream; `start`: the first element's place in it) the param rounded stochastically. Where
    `skip` (a found_inf) is true, nothing changes."""
    if remainder is not None:
        store_split([param], [remainder], [updated], skip)
        return
    if master is not None:
        master.copy_(updated if skip is None else torch.where(skip, master, updated))
    if stochastic:
        rounded = bf16_stochastic_round(updated.float(), *stochastic, start=start)
    else:
        rounded = updated.to(param.dtype)
    param.copy_(rounded if skip is None else torch.where(skip, param, rounded))


def grad_dtype_fits(grad_dtype: torch.dtype, param_dtype: torch.dtype) -> bool:
    """Whether the ops read a grad of `grad_dtype` for a param of `param_dtype` as it is: the param's dtype or fp32,
    or bf16/fp16 beside an fp32 param (torch's `grad_dtype`; csrc/ops/dispatch.h) or an fp64 one (the torch twins,
    which step fp64 params, widen it a piece at a time)."""
    return grad_dtype in (param_dtype, torch.float32) or (
        param_dtype in (torch.float32, torch.float64) and grad_dtype in (torch.bfloat16, torch.float16))


def check_step_lists(op: str, params, grads, steps, state_lists, stochastic_rounding: bool, scalars, dtypes,
                     sparse_message: str, master_params=(), bf16_moment_lists: int = 0,
                     int8_moments=((), ())) -> list[torch.Tensor]:
    """What the Python twins of the optimizer ops check alike (csrc/ops/optimizer_checks.h), for non-empty lists of
    equal length: params of `dtypes`, dense, on one device; grads of their param's shape, dense (else `sparse_message`),
    of a dtype the kernels read (grad_dtype_fits); each of `state_lists` in its param's shape and strides, fp32 (fp64
    for fp64 params) or, for the first `bf16_moment_lists` of them, all bf16 (moments="bf16"); `master_params` (if any)
    the same, or all int16 (int8) remainders of bf16 params (rounding.h); one-element fp32 step counts and `scalars`.
    `int8_moments`: (moment_scales, signed) where the first len(signed) state lists may be int8 moments (int8 where
    signed, else uint8): then every param has its bf16 scales, one contiguous row per moment (int8_moments.py). Returns
    the grads in their params' memory layout.
    Whole-list comparisons rather than a loop over tensors: a step of a thousand tensors pays this every time."""
    if not params:
        return []
    shapes, strides = [p.shape for p in params], [p.stride() for p in params]
    if any(grad.is_sparse for grad in grads):
        raise RuntimeError(sparse_message)
    param_dtypes = [p.dtype for p in params]
    if not set(param_dtypes) <= set(dtypes):
        raise RuntimeError(f"{op}: params must be {', '.join(map(str, dtypes))}, got {set(param_dtypes)}")
    if stochastic_rounding and set(param_dtypes) != {torch.bfloat16}:
        raise RuntimeError(f"{op}: stochastic rounding is for bfloat16 params")
    if not all(map(grad_dtype_fits, [g.dtype for g in grads], param_dtypes)):
        raise RuntimeError(f"{op}: a grad must have its param's dtype or float32 (or bfloat16 or float16 for a "
                           "float32 or float64 param)")
    remainders = are_remainders(master_params)
    if any(m.dtype != master_params[0].dtype for m in master_params):
        raise RuntimeError(f"{op}: master params must be all float32 copies, all int16 remainders or all int8 "
                           "remainders, not a mix")
    if remainders and set(param_dtypes) != {torch.bfloat16}:
        raise RuntimeError(f"{op}: a master remainder is for a bfloat16 param")
    state_lists = [*state_lists, master_params] if master_params else state_lists
    devices = {t.device for tensors in [params, grads, steps, *state_lists] for t in tensors}
    if len(devices) != 1:
        raise RuntimeError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if [g.shape for g in grads] != shapes:
        raise RuntimeError(f"{op}: a grad must have its param's shape")
    if not all(p.is_contiguous() or dense(p) for p in params):
        raise RuntimeError(f"{op}: params must be dense")
    # The kernels read these through raw pointers as one fp32 value each.
    if any(step.numel() != 1 or step.dtype != torch.float32 for step in steps):
        raise RuntimeError(f"{op}: each step must be a one-element float32 tensor on the param's device")
    # (lr_tensor, grad_scale, found_inf): lr_tensor may be fp64 (a compiled step's float lr, read exactly), and
    # grad_scale beside fp64 params alone (step_scalars), which the torch ops unscale in fp64
    fp64_scale = set(param_dtypes) == {torch.float64}
    if any(t is not None and (t.numel() != 1 or t.device not in devices or not (
            t.dtype == torch.float32 or (t.dtype == torch.float64 and (index == 0 or (index == 1 and fp64_scale)))))
           for index, t in enumerate(scalars)):
        raise RuntimeError(f"{op}: lr_tensor, grad_scale and found_inf must be one-element float32 tensors on the "
                           "params' device (lr_tensor may be float64; grad_scale too beside float64 params)")
    state_dtypes = [torch.float64 if dtype == torch.float64 else torch.float32 for dtype in param_dtypes]
    bf16_moments = bf16_moment_lists > 0 and state_lists[0][0].dtype == torch.bfloat16
    moment_scales, signed = int8_moments
    if (bf16_moments or moment_scales) and torch.float64 in param_dtypes:
        raise RuntimeError(f"{op}: bfloat16 and int8 moments are for float32, bfloat16 and float16 params")
    if moment_scales:
        check_scales(op, params, moment_scales, len(signed), devices)
    for index, tensors in enumerate(state_lists):
        if remainders and tensors is master_params:
            expected_dtypes = [master_params[0].dtype] * len(params)
        elif moment_scales and index < len(signed):
            expected_dtypes = [torch.int8 if signed[index] else torch.uint8] * len(params)
        elif bf16_moments and index < bf16_moment_lists:
            expected_dtypes = [torch.bfloat16] * len(params)
        else:
            expected_dtypes = state_dtypes
        if [t.shape for t in tensors] != shapes or [t.stride() for t in tensors] != strides or [
            t.dtype for t in tensors
        ] != expected_dtypes:
            raise RuntimeError(f"{op}: state tensors must have their param's shape and strides, float32 (float64 "
                               "for float64 params; moments all float32, all bfloat16, or int8 codes with scales)")
    matched_grads = list(grads)
    for i, grad in enumerate(grads):
        if grad.stride() != strides[i]:
            matched_grads[i] = torch.empty_like(params[i], dtype=grad.dtype).copy_(grad)
    return matched_grads


def check_scales(op: str, params, moment_scales, moments: int, devices) -> None:
    """int8 moments' scales: per param a contiguous bf16 (moments, ceil(numel / 64)) tensor on the params' device."""
    if len(moment_scales) != len(params):
        raise RuntimeError(f"{op}: int8 moments need one moment_scales tensor per param")
    expected = [(moments, scale_count(p.numel())) for p in params]
    if ([tuple(s.shape) for s in moment_scales] != expected or any(s.dtype != torch.bfloat16 for s in moment_scales)
            or not all(s.is_contiguous() for s in moment_scales) or {s.device for s in moment_scales} - devices):
        raise RuntimeError(f"{op}: moment_scales must be contiguous bfloat16 tensors of shape (moments, "
                           f"ceil(numel / {BLOCK})) on the params' device, one per param")
