// The C++ signature of fused_optim::sgd_step_ (schema in fused_optim/ops/sgd.py), shared by the CPU and CUDA
// implementations and by the registrations, plus the argument checks both run before touching memory.
#pragma once

#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include "fused_optim/sgd.h"

namespace fused_optim {

// momentum_buffers and steps are empty when momentum is 0 (torch keeps no state then), else one per param.
#define FUSED_OPTIM_SGD_ARGS                                                                                  \
  at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList steps,          \
      double lr, const std::optional<at::Tensor>&lr_tensor, double momentum, double dampening,                \
      double weight_decay, bool nesterov, bool maximize, const std::optional<at::Tensor>&grad_scale,          \
      const std::optional<at::Tensor>&found_inf

// The same arguments, forwarded (to check_sgd_args).
#define FUSED_OPTIM_SGD_ARG_NAMES                                                                             \
  params, grads, momentum_buffers, steps, lr, lr_tensor, momentum, dampening, weight_decay, nesterov, maximize, \
      grad_scale, found_inf

void sgd_step_cpu(FUSED_OPTIM_SGD_ARGS);
void sgd_step_cuda(FUSED_OPTIM_SGD_ARGS);

// Checks every argument before any memory is touched (a bad call changes nothing), and returns the grads in their
// params' memory layout (the kernels walk param, grad and buffer as one flat array each).
inline std::vector<at::Tensor> check_sgd_args(FUSED_OPTIM_SGD_ARGS) {
  const size_t n = params.size();
  const bool has_momentum = momentum != 0.0;
  TORCH_CHECK(grads.size() == n, "sgd_step_: params and grads must have the same length");
  TORCH_CHECK(has_momentum ? momentum_buffers.size() == n && steps.size() == n
                           : momentum_buffers.empty() && steps.empty(),
              "sgd_step_: with momentum, one momentum buffer and one step per param; without, none");
  TORCH_CHECK(!nesterov || (momentum > 0.0 && dampening == 0.0),
              "sgd_step_: Nesterov momentum requires a momentum and zero dampening");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device() == params[0].device(), "sgd_step_: all params must be on one device, got ",
                params[0].device(), " and ", p.device());
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "sgd_step_: params must be dense");
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kBFloat16 || p.scalar_type() == at::kHalf,
                "sgd_step_: params must be float32, bfloat16 or float16, got ", p.scalar_type());
    TORCH_CHECK(grads[i].layout() == at::kStrided, "sgd_step_: sparse gradients are not supported");
    TORCH_CHECK(grads[i].device() == p.device() && grads[i].sizes() == p.sizes(),
                "sgd_step_: a grad must have its param's shape and device");
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type() || grads[i].scalar_type() == at::kFloat,
                "sgd_step_: a grad must have its param's dtype or float32");
    if (has_momentum) {
      const at::Tensor& buffer = momentum_buffers[i];
      TORCH_CHECK(buffer.device() == p.device() && buffer.sizes() == p.sizes() && buffer.strides() == p.strides() &&
                      buffer.scalar_type() == at::kFloat,
                  "sgd_step_: a momentum buffer must be float32 with its param's shape, strides and device");
      TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat && steps[i].device() == p.device(),
                  "sgd_step_: each step must be a one-element float32 tensor on the param's device");
    }
  }
  for (const auto* scalar : {&lr_tensor, &grad_scale, &found_inf}) {
    if (scalar->has_value() && n > 0) {
      TORCH_CHECK((*scalar)->numel() == 1 && (*scalar)->scalar_type() == at::kFloat &&
                      (*scalar)->device() == params[0].device(),
                  "sgd_step_: lr_tensor, grad_scale and found_inf must be one-element float32 tensors on the "
                  "params' device");
    }
  }
  std::vector<at::Tensor> matched_grads(grads.begin(), grads.end());
  for (size_t i = 0; i < n; ++i) {
    if (grads[i].strides() != params[i].strides()) {
      matched_grads[i] = at::empty_like(params[i], grads[i].options()).copy_(grads[i]);
    }
  }
  return matched_grads;
}

}  // namespace fused_optim
