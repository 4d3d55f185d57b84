"""Fused losses with torch's signatures: `cross_entropy` (torch.nn.functional.cross_entropy) and
`linear_cross_entropy` (torch.nn.functional.linear_cross_entropy, torch 2.14), plus keyword options torch lacks:

- `z_loss`: coefficient of PaLM's auxiliary `log(sum(exp(logits)))**2` term (Chowdhery et al. 2022), added to the
  loss and reduced like it ("mean" averages it over the kept targets); `return_z_loss=True` also returns it
  (detached, for logging).
- `softcap`: logits soft-capped as `softcap * tanh(logits / softcap)` before the softmax (Gemma 2).
- `backend`: "auto" | "cuda" | "triton" | "cpu" | "torch" (default: $FUSED_OPTIM_BACKEND or "auto").

Class-index targets of fp32/bf16/fp16 logits run the fused kernels. Probability (float) targets and float64
logits run the same math in plain torch ops (torch's own cross-entropy plus the extras), with torch's autograd.
Like torch's, both dispatch `__torch_function__`, so torch.fx.symbolic_trace records a call to them and tensor
subclasses that override it see them. Bad input raises what torch raises for it (fused_optim/_loss_checks.py),
before anything is computed. A class index out of range raises IndexError on the CPU and a device-side assert on
CUDA, as torch's; the Triton kernels, which cannot raise, give that row a NaN loss.

Under torch.autocast the loss is float32, as torch's: the kernels compute it in fp32 from the logits as they come,
and it is not rounded to their dtype; their gradient keeps their dtype. `linear_cross_entropy` multiplies in
autocast's dtype there, as torch.nn.functional.linear would. The fused losses are differentiable once: a second
derivative through them (create_graph=True: Hessian-vector products, gradient penalties) raises
(fused_optim/autograd/differentiable_once.py).

Vocabulary-parallel (tensor-parallel) losses: logits that are a DTensor sharded on the class dim (`Shard(1)`, as
under torch's `loss_parallel()`), or a `linear_weight` sharded on its rows (`Shard(0)` of (V, H)), are taken shard by
shard: each rank reads only its shard and one small all-gather per call (per chunk of rows for the linear loss)
combines the rows' statistics (fused_optim/autograd/vocab_parallel.py). The loss is a DTensor replicated on the
mesh, as torch's; the gradient stays sharded.
"""

from __future__ import annotations

import math
import operator
import warnings

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function_variadic

from fused_optim import _backend, _loss_checks
from fused_optim.autograd import vocab_parallel
from fused_optim.autograd.cross_entropy import CrossEntropyFunction, autocast_enabled
from fused_optim.autograd.linear_cross_entropy import LinearCrossEntropyFunction, chunk_dtype, chunk_rows
from fused_optim.autograd.vocab_parallel import VocabShard
from fused_optim.ops._dtensor import is_dtensor
from fused_optim.ops._library import FLOAT_DTYPES

__all__ = ["cross_entropy", "linear_cross_entropy"]



def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                  label_smoothing=0.0, *, z_loss=0.0, softcap=None, return_z_loss=False, inplace_backward=False,
                  backend=None):
    """torch.nn.functional.cross_entropy, fused: one pass over the logits computes the loss and, when they need
    one, their gradient, which the backward only scales.

    `inplace_backward=True` writes that gradient over the logits (no second (N, V) buffer); the logits' version
    counter is bumped, so a graph that saved them elsewhere raises instead of computing a wrong gradient, but
    reading the logits yourself after the loss gives the gradient. It applies only to logits that are neither a
    leaf nor a view of one, nor one of several views an op returned (`chunk`, `split`) or a custom Function did (a
    module's full backward hook, and a DTensor's `to_local()`, whose shard a vocabulary-parallel loss reads): autograd
    forbids writing those in place. Other logits get a buffer of their own.

    Example:
        >>> import torch, fused_optim.functional as FF
        >>> logits = torch.randn(8, 1000, requires_grad=True)
        >>> target = torch.randint(0, 1000, (8,))
        >>> loss = FF.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-4)
        >>> loss.backward()
    """
    if has_torch_function_variadic(input, target, weight):  # torch.fx's proxies, tensor subclasses: as torch's
        return handle_torch_function(
            cross_entropy, (input, target, weight), input, target, weight=weight, size_average=size_average,
            ignore_index=ignore_index, reduce=reduce, reduction=reduction, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, return_z_loss=return_z_loss, inplace_backward=inplace_backward,
            backend=backend)
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    reduction = _current_reduction(reduction)
    softcap = _check_extras(z_loss, softcap)
    backend = backend if backend is not None else _backend.default_backend()
    _loss_checks.check_cross_entropy(input, target, weight, reduction, label_smoothing, ignore_index)
    ignore_index, label_smoothing = operator.index(ignore_index), _smoothing(label_smoothing)  # (an int tensor, say)
    if is_dtensor(input):
        return _vocab_parallel_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                                             softcap, return_z_loss, inplace_backward, backend)
    if (target.is_floating_point() or input.dtype not in FLOAT_DTYPES or torch.compiler.is_exporting()
            or _transformed(input)):
        # (torch.export keeps a graph's forward ops alone: the fused op's gradient would be lost, torch's ops keep it)
        loss, z = _cross_entropy_composite(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                                           softcap)
        return (loss, z.detach()) if return_z_loss else loss

    num_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    if input.dim() == 1:  # (C,) with a () target
        logits, rows_shape = input.unsqueeze(0), ()
    elif input.dim() == 2:
        logits, rows_shape = input, target.shape
    else:  # (N, C, d1, ...): classes last, one row per position (a copy, which the gradient may then reuse)
        logits, rows_shape = input.movedim(1, -1).reshape(target.numel(), num_classes), target.shape
    logits = _kernel_layout(logits)
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    inplace = inplace_backward and needs_grad and _may_write_gradient_over(logits)
    _refuse_compiled_gradients("cross_entropy", needs_grad)
    loss, z = CrossEntropyFunction.apply(logits, _index_target(target), _class_weight(weight),
                                         reduction, ignore_index, label_smoothing, float(z_loss), softcap,
                                         needs_grad, inplace, backend)
    if reduction == "none":
        loss, z = loss.view(rows_shape), z.view(rows_shape)
    return (loss, z) if return_z_loss else loss


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=None, label_smoothing=0.0, options=None, z_loss=0.0, softcap=None,
                         return_z_loss=False, backend=None):
    """torch.nn.functional.linear_cross_entropy (torch 2.14), fused and chunked: the (N, C) logits are never
    held in full, only one chunk of rows at a time (fused_optim/autograd/linear_cross_entropy.py).

    `options` (a torch.nn.LinearCrossEntropyOptions) is honoured for its `batch_chunk_size`, `chunking_method` and
    `allow_retain_graph`; the chunked path is always taken, accumulating in fp32. A (C, d1, ..., in_features)
    `linear_weight` runs torch's reference path.

    Example:
        >>> import torch, fused_optim.functional as FF
        >>> hidden = torch.randn(64, 32, requires_grad=True)
        >>> lm_head = torch.randn(1000, 32, requires_grad=True)
        >>> loss = FF.linear_cross_entropy(hidden, lm_head, torch.randint(0, 1000, (64,)))
        >>> loss.backward()
    """
    tensors = (input, linear_weight, target, linear_bias, weight)
    if has_torch_function_variadic(*tensors):  # torch.fx's proxies, tensor subclasses: as torch's
        return handle_torch_function(
            linear_cross_entropy, tensors, input, linear_weight, target, linear_bias=linear_bias, weight=weight,
            reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, options=options,
            z_loss=z_loss, softcap=softcap, return_z_loss=return_z_loss, backend=backend)
    _loss_checks.check_linear_cross_entropy(input, linear_weight, linear_bias, target, ignore_index)
    options_type = getattr(torch.nn, "LinearCrossEntropyOptions", None)  # torch 2.14 on
    if options is not None and options_type is not None and not isinstance(options, options_type):
        raise TypeError(f"options must be a torch.nn.LinearCrossEntropyOptions or None, not {type(options).__name__}")
    _check_acc_dtype(options, input, linear_weight, target, reduction, label_smoothing)
    reduction = _current_reduction(reduction)
    batch_chunk_size = _options_chunk_size(options, input.shape[0] if input.dim() > 1 else 1, input.shape[-1],
                                           linear_weight.shape[0] if linear_weight.dim() > 0 else 1)
    allow_retain_graph = getattr(options, "allow_retain_graph", False)
    ignore_index = -100 if ignore_index is None else ignore_index
    softcap = _check_extras(z_loss, softcap)
    backend = backend if backend is not None else _backend.default_backend()
    logits_shape = (*input.shape[:-1], *linear_weight.shape[:-1])
    # the checks of the logits this would give, on an expanded scalar: their shape, dtype and device, no memory
    _loss_checks.check_cross_entropy(input.new_empty(()).expand(logits_shape), target, weight, reduction,
                                     label_smoothing, ignore_index)
    ignore_index, label_smoothing = operator.index(ignore_index), _smoothing(label_smoothing)
    if is_dtensor(linear_weight):
        return _vocab_parallel_linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction,
                                                    ignore_index, label_smoothing, z_loss, softcap, return_z_loss,
                                                    batch_chunk_size, allow_retain_graph, backend)
    if (target.is_floating_point() or input.dtype not in FLOAT_DTYPES or linear_weight.dim() != 2
            or torch.compiler.is_exporting() or _transformed(input, linear_weight, linear_bias)):
        # (C, d1, ..., in_features) weights give (N, C, d1, ...) logits, torch.export keeps the forward ops alone,
        # and torch.func's transforms need torch's: torch's reference path
        flat_bias = linear_bias.reshape(-1) if linear_bias is not None else None
        logits = F.linear(input, linear_weight.reshape(-1, linear_weight.shape[-1]), flat_bias).view(logits_shape)
        loss, z = _cross_entropy_composite(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                                           softcap)
        return (loss, z.detach()) if return_z_loss else loss
    rows_shape = target.shape if input.dim() > 1 else ()  # unbatched: a () loss for a () or (1,) target, as torch's
    input, linear_weight, linear_bias = _autocast_linear(input, linear_weight, linear_bias)
    x = input.unsqueeze(0) if input.dim() == 1 else input
    num_classes = linear_weight.shape[0]
    dtype = chunk_dtype(x.dtype, x.device)
    chunking = chunk_rows(x.shape[0], num_classes, dtype, x.device, batch_chunk_size), dtype
    _refuse_compiled_gradients("linear_cross_entropy", _any_grad(x, linear_weight, linear_bias))
    loss, z = LinearCrossEntropyFunction.apply(x.contiguous(), linear_weight.contiguous(), linear_bias,
                                               _index_target(target), _class_weight(weight), reduction,
                                               ignore_index, label_smoothing, float(z_loss), softcap, chunking,
                                               torch.is_grad_enabled(), backend, None, allow_retain_graph)
    if reduction == "none":
        loss, z = loss.view(rows_shape), z.view(rows_shape)
    return (loss, z) if return_z_loss else loss


def _kernel_layout(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) logits as the kernels read them: unit column stride, and rows that do not overlap (an expanded (1, V)
    would have every row's gradient written over one row); a copy where they are not so already."""
    rows_overlap = logits.stride(0) < logits.shape[1]
    if logits.shape[1] == 1 and logits.stride(-1) != 1 and not rows_overlap:  # any column stride is unit stride
        return logits.as_strided(logits.shape, (logits.stride(0), 1))
    if logits.stride(-1) != 1 or rows_overlap:
        return logits.contiguous()
    return logits


def _vocab_parallel_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                                  return_z_loss, inplace_backward, backend):
    """Logits sharded on the class dim (autograd/vocab_parallel.py): each rank reads its shard; the loss is a DTensor
    replicated on the mesh, the logits' gradient a DTensor sharded like them. float64 logits, and logits every rank
    holds whole (replicated), run torch's own ops on the DTensor, as torch's dispatch does."""
    if input.dtype not in FLOAT_DTYPES or all(p.is_replicate() for p in input.placements):
        target, weight = vocab_parallel.replicated_like(target, input), vocab_parallel.replicated_like(weight, input)
        loss, z = _cross_entropy_composite(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                                           softcap)
        return (loss, z.detach()) if return_z_loss else loss
    if input.dim() != 2 or target.is_floating_point():
        raise ValueError("a vocabulary-parallel cross_entropy takes (N, V) logits and class index targets; flatten "
                         "the batch dims first.")
    shard = VocabShard.of(input, 1, "cross_entropy's input")
    target = _index_target(vocab_parallel.replicated_local(target, "target"))
    weight = vocab_parallel.replicated_local(weight, "weight")
    logits = _kernel_layout(input.to_local())  # differentiable: its gradient becomes a DTensor like the input
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    _refuse_compiled_gradients("cross_entropy", needs_grad)
    loss, z = CrossEntropyFunction.apply(logits, target, _class_weight(weight), reduction,
                                         ignore_index, label_smoothing, float(z_loss), softcap, needs_grad,
                                         inplace_backward and needs_grad and _may_write_gradient_over(logits),
                                         backend, shard)
    loss, z = shard.replicated(loss), shard.replicated(z)
    return (loss, z) if return_z_loss else loss


def _vocab_parallel_linear_cross_entropy(input, linear_weight, target, linear_bias, weight, reduction, ignore_index,
                                         label_smoothing, z_loss, softcap, return_z_loss, batch_chunk_size,
                                         allow_retain_graph, backend):
    """An lm-head weight sharded on its rows (Shard(0) of (V, H)): each rank multiplies by its rows only; the
    input's gradient is summed over the ranks (one all-reduce in the backward). float64, and an lm head every rank
    holds whole (replicated): torch's own ops on DTensors, as torch's dispatch runs them."""
    if input.dtype not in FLOAT_DTYPES or linear_weight.dtype not in FLOAT_DTYPES \
            or all(p.is_replicate() for p in linear_weight.placements):
        x, bias = (vocab_parallel.replicated_like(t, linear_weight) for t in (input, linear_bias))
        return _vocab_parallel_cross_entropy(F.linear(x, linear_weight, bias), target, weight, ignore_index,
                                             reduction, label_smoothing, z_loss, softcap, return_z_loss, False,
                                             backend)
    if input.dim() != 2 or linear_weight.dim() != 2 or target.is_floating_point():
        raise ValueError("a vocabulary-parallel linear_cross_entropy takes (N, H) inputs, a (V, H) weight and class "
                         "index targets.")
    shard = VocabShard.of(linear_weight, 0, "linear_cross_entropy's linear_weight")
    if linear_bias is not None and not (is_dtensor(linear_bias) and linear_bias.placements == linear_weight.placements):
        raise ValueError("linear_bias of a vocabulary-parallel linear_cross_entropy must be a DTensor sharded as "
                         "linear_weight is.")
    input, linear_weight, linear_bias = _autocast_linear(input, linear_weight, linear_bias)
    x = vocab_parallel.input_for_sharded_weight(input, shard)
    target = _index_target(vocab_parallel.replicated_local(target, "target"))
    weight = vocab_parallel.replicated_local(weight, "weight")
    local_weight = linear_weight.to_local()
    local_bias = linear_bias.to_local() if linear_bias is not None else None
    # chunks sized by the largest shard's width, not this rank's: every rank must run as many chunks (each gathers)
    dtype = chunk_dtype(x.dtype, x.device)
    chunking = chunk_rows(x.shape[0], shard.widest_shard, dtype, x.device, batch_chunk_size), dtype
    _refuse_compiled_gradients("linear_cross_entropy", _any_grad(x, local_weight, local_bias))
    loss, z = LinearCrossEntropyFunction.apply(x.contiguous(), local_weight.contiguous(), local_bias, target,
                                               _class_weight(weight), reduction, ignore_index, label_smoothing,
                                               float(z_loss), softcap, chunking, torch.is_grad_enabled(), backend,
                                               shard, allow_retain_graph)
    loss, z = shard.replicated(loss), shard.replicated(z)
    return (loss, z) if return_z_loss else loss


def _transformed(*tensors: torch.Tensor | None) -> bool:
    """Whether a loss runs under torch.func's transforms (vmap, grad, jvp) or forward-mode AD (a dual tensor among
    its inputs): there it takes torch's own ops, which these transforms know, as torch's loss would. The fused op
    makes its gradient in the forward, for one reverse-mode backward."""
    return torch._C._are_functorch_transforms_active() or any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _current_reduction(reduction):
    """"elementwise_mean" is "mean", as torch still takes it, with its warning."""
    if reduction == "elementwise_mean":
        warnings.warn("reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.",
                      stacklevel=3)
        return "mean"
    return reduction


def _check_acc_dtype(options, input, linear_weight, target, reduction, label_smoothing) -> None:
    """torch's RuntimeError for an `acc_dtype` its chunked path cannot accumulate in (fp32 for fp16/bf16 inputs,
    else the inputs' own dtype), where its options would take that path. Ours accumulates in fp32 whatever the
    options ask, which is at least as exact as any dtype torch takes."""
    acc_dtype = getattr(options, "acc_dtype", None)
    if acc_dtype is None or acc_dtype == input.dtype:
        return
    if (input.dtype in (torch.float16, torch.bfloat16) and acc_dtype == torch.float32) or linear_weight.dim() != 2:
        return
    probabilities = (target.dtype == input.dtype and reduction != "none"
                     and not (target.requires_grad and torch.is_grad_enabled()))
    chunked = (reduction in ("mean", "sum", "none") and _smoothing(label_smoothing) == 0.0
               and (target.dtype == torch.int64 or probabilities))
    if chunked:
        raise RuntimeError(f"linear_cross_entropy supports float32 acc_dtype with float16/bfloat16 inputs, but got "
                           f"{acc_dtype} acc_dtype and {input.dtype} inputs.")


def _smoothing(label_smoothing) -> float:
    """torch applies label smoothing only when it is > 0: a negative or NaN one is none."""
    label_smoothing = float(label_smoothing)
    return label_smoothing if label_smoothing > 0 else 0.0


def _check_extras(z_loss, softcap) -> float:
    if not z_loss >= 0:
        raise ValueError(f"z_loss must be a non-negative float, got {z_loss}.")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or a positive float, got {softcap}.")
    # 0.0: no capping, which an infinite cap is (softcap * tanh(x / softcap) tends to x)
    return float(softcap) if softcap is not None and softcap != math.inf else 0.0


def _index_target(target: torch.Tensor) -> torch.Tensor:
    """Class indices as the kernels read them: one contiguous int64 row (N,) (torch also takes uint8 ones, and any
    strides, e.g. a column of a (N, 2) tensor)."""
    return target.reshape(-1).to(torch.int64).contiguous()


def _autocast_linear(input, linear_weight, linear_bias):
    """Under torch.autocast, the lm head's operands in autocast's dtype, as torch.nn.functional.linear takes them there
    (the loss from those logits is then fp32, as torch's cross-entropy is under autocast); otherwise as they are. The
    casts are differentiable: each gradient comes back in its own tensor's dtype."""
    device_type = input.device.type
    if not autocast_enabled(device_type):
        return input, linear_weight, linear_bias
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.dtype in FLOAT_DTYPES else t
                 for t in (input, linear_weight, linear_bias))


# torch.compile before torch 2.12 hands these losses' backward their gradient buffers as they were before the forward
# filled them in place: zero gradients (measured under 2.11; 2.12, 2.13 and 2.14 give eager's).
_COMPILED_GRADIENTS_ARE_ZERO = _backend._release(torch.__version__) < (2, 12)


def _may_write_gradient_over(logits: torch.Tensor) -> bool:
    """Whether the logits' gradient may be written over their memory: never a leaf's (nor a view of one: a view of
    a parameter is not itself a leaf), nor a view autograd forbids writing in place, nor under torch.compile. A
    compiled graph keeps no version counter to catch a second reader of the overwritten logits (another loss on
    them), which eager then refuses at the backward and a graph would compute from the gradient; it takes a buffer
    of its own, whose memory the compiler may reuse once the logits are dead."""
    return not logits.is_leaf and not torch.compiler.is_compiling() and not (
        logits._base is not None and (logits._base.is_leaf or not _writable_view(logits)))


def _writable_view(view: torch.Tensor) -> bool:
    """Whether autograd lets a view be written in place: not one of several views an op returned (chunk, split,
    unbind) nor one a custom Function returned (a module's full backward hook), whose backward would then fail. Read
    from autograd's own record of how the view was made; without it (another torch), no view is."""
    creation_meta = getattr(torch._C._autograd, "_get_creation_meta", None)
    return creation_meta is not None and creation_meta(view) == torch._C._autograd.CreationMeta.DEFAULT


def _options_chunk_size(options, num_rows: int, in_features: int, num_classes: int) -> int | None:
    """The rows per chunk LinearCrossEntropyOptions asks for: its batch_chunk_size, or what its chunking_method
    gives ("aspect_ratio[:k]": the power of two at or above N / ceil(V / d), over k: torch's rule), with torch's
    ValueError where both are given and differ; None for ours (a budget of bytes per chunk)."""
    size = getattr(options, "batch_chunk_size", None)
    method = getattr(options, "chunking_method", None)
    if method in (None, "auto"):
        return size
    factor = int(method.split(":", 1)[1]) if ":" in method else 1
    target = -(-num_rows // -(-num_classes // max(1, in_features)))
    from_method = max(1, min((1 << (target - 1).bit_length()) // factor, num_rows))
    if size is not None and size != from_method:
        raise ValueError(f"batch_chunk_size (={size}) and chunking_method ('{method}') give different chunk sizes "
                         f"({size} vs {from_method}); pass only one.")
    return from_method


def _refuse_compiled_gradients(name: str, needs_grad: bool) -> None:
    if _COMPILED_GRADIENTS_ARE_ZERO and needs_grad and torch.compiler.is_compiling():
        raise RuntimeError(f"fused_optim's {name} cannot be differentiated inside torch.compile under torch "
                           f"{torch.__version__} (its compiled backward gives zero gradients; torch 2.12 and later "
                           "do not): call it outside the compiled region, or upgrade torch.")


def _any_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _class_weight(weight: torch.Tensor | None) -> torch.Tensor | None:
    # (C,), or any shape of C values that torch takes for K-dimensional logits (e.g. (C, 1))
    return None if weight is None else weight.detach().reshape(-1).to(torch.float32).contiguous()


def _cross_entropy_composite(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """The same loss from torch's own ops (probability targets, float64 logits): returns (loss, z-loss)."""
    logits = softcap * torch.tanh(input / softcap) if softcap else input
    loss = F.cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    class_dim = 1 if logits.dim() > 1 else 0
    # no z-loss: zeros, not 0 * lse^2 (a row whose lse is infinite would give 0 * inf = NaN)
    rows_shape = logits.shape[:class_dim] + logits.shape[class_dim + 1:]  # (no select: there may be no class)
    z_rows = z_loss * torch.logsumexp(logits, dim=class_dim) ** 2 if z_loss else logits.new_zeros(
        rows_shape, dtype=loss.dtype)
    if not target.is_floating_point():
        kept = target != ignore_index
        z_rows = torch.where(kept, z_rows, 0.0)
        count = kept.sum()
    else:
        count = z_rows.numel()
    if reduction == "none":
        z = z_rows
    else:
        z = z_rows.sum() / count if reduction == "mean" else z_rows.sum()
    return (loss + z if z_loss else loss), z  # without a z-loss torch's loss as it is (a -0 stays -0)
