"""Triton SGD over a packed pointer table: one launch per group (per param/grad dtype pair), as triton/adam.py.

The table holds, for each tensor, the addresses of its param, grad, momentum buffer, master and step count, and
its size,
then where each tensor's programs start in the grid. Each program finds its tensor by binary search over those
starts, reads whether this is the tensor's first step from its step count on the device, and updates BLOCKS
consecutive blocks of BLOCK elements: unmasked (and, when the host saw every address 16-byte aligned, with 16-byte
loads) for whole blocks, masked for the last one. The element math mirrors csrc/include/fused_optim/sgd.h line for
line. Tables are cached by their contents (triton/_table.py), so a step usually copies nothing to the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_optim.triton._exact_math import multiply_add
from fused_optim.triton._table import (DTYPES, EXACT_ARITHMETIC, addresses, all_aligned, device_table,
                                      increment_steps, load_pointer, locate_block, numels, pack, search_steps)
from fused_optim.triton.adam import (INT8_BLOCK, STOCHASTIC, _dequantize, _grad_multiplier, _moment_bits, _quantize,
                                    _store_moment, _stream_key, load_param, param_pointers, store_param, write_back)

BLOCK = 1024  # 4 warps x 32 threads x 8 elements: one 16-byte load of bf16, two of fp32, per array and thread
NUM_WARPS = 4  # benchmarks/gpu_triton_launch.py times other BLOCK, NUM_WARPS and BLOCKS on a GPU
# Blocks of one tensor a program and registers a thread at most, as triton/adam.py's (one until a GPU has timed four)
BLOCKS, MAX_REGISTERS = 1, None
COLUMNS = 7  # param, grad, momentum_buffer, master, step, moment_scales, numel
STEP_COLUMN = 4


@triton.jit
def _param_and_grad(param_ptr, master_ptr, grad_ptr, offsets, mask, grad_multiplier, weight_decay,
                    WRITE: tl.constexpr):
    """The param (or its master) and its grad in fp32, the grad unscaled (1 / grad_scale, negated when maximizing)
    and with the L2 weight decay."""
    p = load_param(param_ptr, master_ptr, offsets, mask, WRITE)
    g = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32) * grad_multiplier
    if weight_decay != 0.0:
        g = multiply_add(weight_decay, p, g)  # one rounding, as torch's grad.add(param, alpha=weight_decay)
    return p, g


@triton.jit
def _step_param(param_ptr, master_ptr, offsets, mask, p, g, buffer, momentum, lr, stream, PARAM_DTYPE: tl.constexpr,
                NESTEROV: tl.constexpr, WRITE: tl.constexpr):
    """The param moved along the buffer (Nesterov: along g + momentum * buffer), stored by WRITE (store_param)."""
    if NESTEROV:
        g = multiply_add(momentum, buffer, g)
    else:
        g = buffer
    store_param(param_ptr, master_ptr, offsets, mask, multiply_add(-lr, g, p), stream, PARAM_DTYPE, WRITE)


@triton.jit
def _update_block(param_ptr, grad_ptr, buffer_ptr, master_ptr, offsets, mask, grad_multiplier, weight_decay,
                  momentum, one_minus_dampening, lr, first_step, stream, PARAM_DTYPE: tl.constexpr,
                  BUFFER_DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, WRITE: tl.constexpr):
    p, g = _param_and_grad(param_ptr, master_ptr, grad_ptr, offsets, mask, grad_multiplier, weight_decay, WRITE)
    buffer = g  # without momentum the step is along the grad
    if MOMENTUM:
        if first_step:  # the buffer is unset: it becomes the gradient itself
            buffer = g
        else:
            old_buffer = tl.load(buffer_ptr + offsets, mask=mask).to(tl.float32)
            buffer = multiply_add(one_minus_dampening, g, old_buffer * momentum)
        bits = 0
        if BUFFER_DTYPE == tl.bfloat16:  # moments="bf16": rounded stochastically (rounding.h's to_moment)
            bits = _moment_bits(stream, offsets, 0)
        _store_moment(buffer_ptr, offsets, mask, buffer, bits, BUFFER_DTYPE)
    _step_param(param_ptr, master_ptr, offsets, mask, p, g, buffer, momentum, lr, stream, PARAM_DTYPE, NESTEROV,
                WRITE)


@triton.jit
def _update_block_int8(param_ptr, grad_ptr, codes_ptr, master_ptr, scales_ptr, start, numel, grad_multiplier,
                       weight_decay, momentum, one_minus_dampening, lr, first_step, stream, PARAM_DTYPE: tl.constexpr,
                       NESTEROV: tl.constexpr, WRITE: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr):
    """moments="int8": BLOCK elements as (BLOCK / 64, 64) tiles, one row per scale (triton/adam.py's
    _update_block_int8); FULL: the block lies inside the tensor, nothing masked."""
    groups: tl.constexpr = BLOCK // INT8_BLOCK
    scale_offsets = start // INT8_BLOCK + tl.arange(0, groups)
    offsets = scale_offsets[:, None] * INT8_BLOCK + tl.arange(0, INT8_BLOCK)[None, :]
    mask = None
    scale_mask = None
    if not FULL:
        mask = offsets < numel
        scale_mask = scale_offsets < (numel + INT8_BLOCK - 1) // INT8_BLOCK
    scales_ptr = scales_ptr.to(tl.pointer_type(tl.uint16))
    p, g = _param_and_grad(param_ptr, master_ptr, grad_ptr, offsets, mask, grad_multiplier, weight_decay, WRITE)
    if first_step:  # the buffer is unset: it becomes the gradient itself
        buffer = g
    else:
        scales = tl.load(scales_ptr + scale_offsets, mask=scale_mask).to(tl.bfloat16, bitcast=True)
        old_buffer = _dequantize(tl.load(codes_ptr + offsets, mask=mask), scales, True)
        buffer = multiply_add(one_minus_dampening, g, old_buffer * momentum)
    _quantize(codes_ptr, scales_ptr, offsets, mask, scale_offsets, scale_mask, buffer,
              _moment_bits(stream, offsets, 0) & 0xFFFF, True)
    _step_param(param_ptr, master_ptr, offsets, mask, p, g, buffer, momentum, lr, stream, PARAM_DTYPE, NESTEROV,
                WRITE)


@triton.jit
def _step_block(param_ptr, grad_ptr, buffer_ptr, master_ptr, scales_ptr, block_start, numel, grad_multiplier,
                weight_decay, momentum, one_minus_dampening, lr, first_step, stream, PARAM_DTYPE: tl.constexpr,
                BUFFER_DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, WRITE: tl.constexpr,
                BLOCK: tl.constexpr):
    """The block of BLOCK elements from block_start (inside the tensor): whole, or the tensor's partial last one."""
    offsets = block_start + tl.arange(0, BLOCK)
    if BUFFER_DTYPE == tl.int8:  # moments="int8" (always with momentum)
        if block_start + BLOCK <= numel:
            _update_block_int8(param_ptr, grad_ptr, buffer_ptr, master_ptr, scales_ptr, block_start, numel,
                               grad_multiplier, weight_decay, momentum, one_minus_dampening, lr, first_step, stream,
                               PARAM_DTYPE, NESTEROV, WRITE, BLOCK, True)
        else:
            _update_block_int8(param_ptr, grad_ptr, buffer_ptr, master_ptr, scales_ptr, block_start, numel,
                               grad_multiplier, weight_decay, momentum, one_minus_dampening, lr, first_step, stream,
                               PARAM_DTYPE, NESTEROV, WRITE, BLOCK, False)
    elif block_start + BLOCK <= numel:  # a whole block: no mask, so the loads can be 16 bytes wide
        _update_block(param_ptr, grad_ptr, buffer_ptr, master_ptr, offsets, None, grad_multiplier, weight_decay,
                      momentum, one_minus_dampening, lr, first_step, stream, PARAM_DTYPE, BUFFER_DTYPE, MOMENTUM,
                      NESTEROV, WRITE)
    else:
        _update_block(param_ptr, grad_ptr, buffer_ptr, master_ptr, offsets, offsets < numel, grad_multiplier,
                      weight_decay, momentum, one_minus_dampening, lr, first_step, stream, PARAM_DTYPE, BUFFER_DTYPE,
                      MOMENTUM, NESTEROV, WRITE)


@triton.jit
def _sgd_kernel(
    table_ptr,  # (num_tensors * COLUMNS + num_tensors + 1,) int64: the rows, then the block starts
    lr, lr_ptr, grad_scale_ptr, found_inf_ptr,  # the *_ptr read only when the matching HAS_ flag is set
    momentum, one_minus_dampening, weight_decay, seed, first_tensor_index, num_tensors,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, BUFFER_DTYPE: tl.constexpr, MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, WRITE: tl.constexpr, HAS_LR_TENSOR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr, SEARCH_STEPS: tl.constexpr, COLUMNS: tl.constexpr, BLOCK: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0.0  # a skipped step: touch nothing
    if not skip:
        tensor, start = locate_block(table_ptr, num_tensors, COLUMNS, SEARCH_STEPS, BLOCKS * BLOCK)
        row = table_ptr + tensor * COLUMNS
        param_ptr, master_ptr = param_pointers(row, 0, 3, PARAM_DTYPE, WRITE, ALIGNED)
        grad_ptr = load_pointer(row, 1, GRAD_DTYPE, ALIGNED)
        buffer_ptr = load_pointer(row, 2, BUFFER_DTYPE, ALIGNED)
        numel = tl.load(row + 6)

        # The tensor's scalars (sgd.h, sgd_scalars)
        first_step = False
        stream = 0
        if MOMENTUM or WRITE == STOCHASTIC:
            step = tl.load(load_pointer(row, 4, tl.float32, False))
            if MOMENTUM:
                first_step = step == 0.0
            if WRITE == STOCHASTIC or BUFFER_DTYPE == tl.bfloat16 or BUFFER_DTYPE == tl.int8:
                stream = _stream_key(seed, first_tensor_index + tensor, step + 1.0)  # of the count after this step
        if HAS_LR_TENSOR:
            lr = tl.load(lr_ptr).to(tl.float32)  # an fp64 lr_tensor rounds once, as the float lr does
        grad_multiplier = _grad_multiplier(grad_scale_ptr, HAS_GRAD_SCALE, MAXIMIZE)

        scales_ptr = row  # unused but for moments="int8", whose scales' address is in column 5
        if BUFFER_DTYPE == tl.int8:
            scales_ptr = load_pointer(row, 5, tl.uint16, False)
        if BLOCKS == 1:  # (no loop: the code as it was before BLOCKS, which the H200 timed)
            _step_block(param_ptr, grad_ptr, buffer_ptr, master_ptr, scales_ptr, start, numel, grad_multiplier,
                        weight_decay, momentum, one_minus_dampening, lr, first_step, stream, PARAM_DTYPE,
                        BUFFER_DTYPE, MOMENTUM, NESTEROV, WRITE, BLOCK)
        else:  # BLOCKS blocks of the tensor, one after another: the search and scalars above paid once for all
            for k in range(BLOCKS):
                if start + k * BLOCK < numel:  # (else the tensor ended in an earlier block of this program)
                    _step_block(param_ptr, grad_ptr, buffer_ptr, master_ptr, scales_ptr, start + k * BLOCK, numel,
                                grad_multiplier, weight_decay, momentum, one_minus_dampening, lr, first_step, stream,
                                PARAM_DTYPE, BUFFER_DTYPE, MOMENTUM, NESTEROV, WRITE, BLOCK)


def sgd_step_triton(params, grads, momentum_buffers, master_params, steps, moment_scales, lr, lr_tensor, momentum,
                    dampening, weight_decay, nesterov, maximize, stochastic_rounding, seed, grad_scale,
                    found_inf) -> None:
    """The fused_optim::sgd_step_triton_ op (schema and argument checks in fused_optim/ops/sgd.py)."""
    # Consecutive tensors of one (param dtype, grad dtype) pair share a launch.
    start = 0
    for end in range(1, len(params) + 1):
        if end == len(params) or (params[end].dtype, grads[end].dtype) != (params[start].dtype, grads[start].dtype):
            _launch(params[start:end], grads[start:end], momentum_buffers[start:end], master_params[start:end],
                    steps[start:end], moment_scales[start:end], start, lr, lr_tensor, momentum, dampening,
                    weight_decay, nesterov, maximize, stochastic_rounding, seed, grad_scale, found_inf)
            start = end


def _launch(params, grads, momentum_buffers, master_params, steps, moment_scales, first_tensor_index, lr, lr_tensor,
            momentum, dampening, weight_decay, nesterov, maximize, stochastic_rounding, seed, grad_scale,
            found_inf) -> None:
    has_momentum = momentum != 0
    absent = [0] * len(params)  # the column of an array the call has not
    columns = [addresses(params), addresses(grads), addresses(momentum_buffers) if has_momentum else absent,
               addresses(master_params) if master_params else absent, addresses(steps) if steps else absent,
               addresses(moment_scales) if moment_scales else absent, numels(params)]
    entries, num_programs = pack(columns, BLOCKS * BLOCK)
    # 16-byte loads need every array address (the first four columns; steps are read alone) 16-byte aligned.
    aligned = all_aligned(*columns[:4])
    table = device_table(entries, params[0].device)
    num_tensors = len(params)
    unused = table  # a valid pointer for the *_ptr arguments whose HAS_ flag is off
    if num_programs > 0:
        _sgd_kernel[(num_programs,)](
            table, lr, unused if lr_tensor is None else lr_tensor, unused if grad_scale is None else grad_scale,
            unused if found_inf is None else found_inf, momentum, 1.0 - dampening, weight_decay, seed,
            first_tensor_index, num_tensors, PARAM_DTYPE=DTYPES[params[0].dtype], GRAD_DTYPE=DTYPES[grads[0].dtype],
            BUFFER_DTYPE=tl.int8 if moment_scales else DTYPES[momentum_buffers[0].dtype if has_momentum
                                                              else torch.float32],
            MOMENTUM=has_momentum, NESTEROV=nesterov, MAXIMIZE=maximize,
            WRITE=write_back(stochastic_rounding, master_params), HAS_LR_TENSOR=lr_tensor is not None,
            HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, ALIGNED=aligned,
            SEARCH_STEPS=search_steps(num_tensors), COLUMNS=COLUMNS, BLOCK=BLOCK, BLOCKS=BLOCKS, num_warps=NUM_WARPS,
            maxnreg=MAX_REGISTERS, **EXACT_ARITHMETIC,
        )
    if steps:
        increment_steps(table, num_tensors, COLUMNS, STEP_COLUMN, found_inf)
