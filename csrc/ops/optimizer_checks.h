// The argument checks every optimizer op shares (adam_step_, sgd_step_, lion_step_), run before any memory is
// touched so that a bad call changes nothing. Each op keeps its own list-length checks and state list.
#pragma once

#include <optional>

#include "ops/torch_api.h"

#include "fused_optim/moment_int8.h"

namespace fused_optim {

// A param: on the group's device, dense, of a kernel dtype (checked before any launch: a CUDA call of several
// launches must not apply part of a step and then fail).
inline void check_param(const char* op, const TensorInfo& p, const torch::stable::Device& device) {
  FO_CHECK(p.device == device, op, ": all params must be on one device, got ", device_name(device), " and ",
           device_name(p.device));
  FO_CHECK(is_non_overlapping_and_dense(p), op, ": params must be dense");
  FO_CHECK(p.dtype == kFloat || p.dtype == kBFloat16 || p.dtype == kHalf, op,
           ": params must be float32, bfloat16 or float16, got ", p.dtype);
}

// A grad: dense (else `sparse_message`), its param's shape and device, its param's dtype or float32 (or, beside a
// float32 param, bfloat16 or float16: dispatch_param_grad_types).
inline TensorInfo check_grad(const char* op, const Tensor& grad, const TensorInfo& p, const char* sparse_message) {
  FO_CHECK(grad.layout() == torch::headeronly::kStrided, sparse_message);
  const TensorInfo g(grad);
  FO_CHECK(g.device == p.device && g.sizes.equals(p.sizes), op, ": a grad must have its param's shape and device");
  FO_CHECK(g.dtype == p.dtype || g.dtype == kFloat || (p.dtype == kFloat && (g.dtype == kBFloat16 || g.dtype == kHalf)),
           op, ": a grad must have its param's dtype or float32 (or bfloat16 or float16 for a float32 param)");
  return g;
}

// A state tensor the kernels walk beside the param: the param's shape, strides and device.
inline TensorInfo check_state_layout(const char* op, const Tensor& t, const TensorInfo& p, const char* what) {
  const TensorInfo state(t);
  FO_CHECK(state.device == p.device, op, ": ", what, " must be on the param's device");
  FO_CHECK(state.same_layout(p), op, ": ", what, " must have the param's shape and strides");
  return state;
}

inline void check_fp32_state(const char* op, const Tensor& t, const TensorInfo& p, const char* what) {
  FO_CHECK(check_state_layout(op, t, p, what).dtype == kFloat, op, ": ", what, " must be float32");
}

// An optimizer moment (or momentum buffer): float32, bfloat16 (moments="bf16") or int8 codes (moments="int8": int8
// for a signed moment, uint8 for a non-negative one), of the dtype `expected` for its kind in the call (the kernels
// take one moment type per launch).
inline void check_moment(const char* op, const Tensor& t, const TensorInfo& p, const char* what, ScalarType expected) {
  const ScalarType dtype = check_state_layout(op, t, p, what).dtype;
  FO_CHECK(dtype == expected && (dtype == kFloat || dtype == kBFloat16 || dtype == kChar || dtype == kByte), op, ": ",
           what, " must be float32, bfloat16 or int8 codes, the dtype of every moment of its kind in the call");
}

// int8 moments' block scales (moment_int8.h): a contiguous bfloat16 (moments, ceil(numel / 64)) tensor on the
// param's device.
inline void check_moment_scales(const char* op, const Tensor& scales, const Tensor& param, int64_t moments) {
  const int64_t blocks = (param.numel() + kInt8Block - 1) / kInt8Block;
  FO_CHECK(scales.scalar_type() == kBFloat16 && scales.device() == param.device() && scales.dim() == 2 &&
               scales.size(0) == moments && scales.size(1) == blocks && scales.is_contiguous(),
           op, ": moment_scales must be contiguous bfloat16 tensors of shape (moments, ceil(numel / ", kInt8Block,
           ")) on the params' device, one per param");
}

// A master param: an fp32 copy (check_fp32_state), or the int16 (int8) low bits of a bfloat16 param's fp32 (24-bit)
// master (rounding.h) in the param's shape and strides. Every master of one call has the first one's dtype.
inline void check_master(const char* op, const Tensor& t, const TensorInfo& p, ScalarType first_dtype) {
  FO_CHECK(t.scalar_type() == first_dtype, op,
           ": master params must be all float32 copies, all int16 remainders or all int8 remainders, not a mix");
  if (first_dtype != ScalarType::Short && first_dtype != ScalarType::Char) {
    check_fp32_state(op, t, p, "master param");
    return;
  }
  FO_CHECK(p.dtype == kBFloat16, op, ": a master remainder is for a bfloat16 param, got ", p.dtype);
  check_state_layout(op, t, p, "a master remainder");
}

// A step count: one float32 value on the param's device (the kernels read it through a raw pointer).
inline void check_step(const char* op, const Tensor& step, const TensorInfo& p) {
  FO_CHECK(step.numel() == 1 && step.scalar_type() == kFloat && step.device() == p.device, op,
           ": each step must be a one-element float32 tensor on the param's device");
}

// lr_tensor, grad_scale and found_inf, where given: one value each on the params' device, float32, or float64 for
// lr_tensor (a compiled step's float lr, ops/_library.py's step_scalars, which the kernels read exactly).
inline void check_step_scalars(const char* op, const torch::stable::Device& device,
                               const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                               const std::optional<Tensor>& found_inf) {
  const auto fits = [&](const std::optional<Tensor>& t, bool may_be_double) {
    return !t.has_value() || (t->numel() == 1 && t->device() == device &&
                              (t->scalar_type() == kFloat || (may_be_double && t->scalar_type() == kDouble)));
  };
  FO_CHECK(fits(lr_tensor, true) && fits(grad_scale, false) && fits(found_inf, false), op,
           ": lr_tensor, grad_scale and found_inf must be one-element float32 tensors on the params' device "
           "(lr_tensor may be float64)");
}

}  // namespace fused_optim
