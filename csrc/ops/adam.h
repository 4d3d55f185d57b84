// The C++ signature of fused_optim::adam_step_ (schema in fused_optim/ops/adam.py), shared by the CPU and CUDA
// implementations and by csrc/registration.cpp, plus the argument checks both run before touching memory.
#pragma once

#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include "fused_optim/adam.h"

namespace fused_optim {

#define FUSED_OPTIM_ADAM_ARGS                                                                              \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,        \
      at::TensorList max_exp_avg_sqs, at::TensorList master_params, at::TensorList steps, double lr,      \
      const std::optional<at::Tensor>&lr_tensor, double beta1, double beta2, double eps, double weight_decay, \
      bool decoupled_weight_decay, bool amsgrad, bool maximize, bool stochastic_rounding, int64_t seed,      \
      const std::optional<at::Tensor>&grad_scale, const std::optional<at::Tensor>&found_inf

// The same arguments, forwarded (to check_adam_args).
#define FUSED_OPTIM_ADAM_ARG_NAMES                                                                              \
  params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, lr, lr_tensor, beta1, beta2, eps, \
      weight_decay, decoupled_weight_decay, amsgrad, maximize, stochastic_rounding, seed, grad_scale, found_inf

void adam_step_cpu(FUSED_OPTIM_ADAM_ARGS);
void adam_step_cuda(FUSED_OPTIM_ADAM_ARGS);

// Checks every argument before any memory is touched (a bad call changes nothing), and returns the grads in their
// params' memory layout: the kernels walk param, grad and state as one flat array each, and autograd already
// hands out grads in the param's layout, so only a grad a user assigned with other strides is copied.
inline std::vector<at::Tensor> check_adam_args(FUSED_OPTIM_ADAM_ARGS) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
              "adam_step_: params, grads, exp_avgs, exp_avg_sqs and steps must have the same length");
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == n, "adam_step_: amsgrad needs one max_exp_avg_sq per param");
  TORCH_CHECK(master_params.empty() || master_params.size() == n, "adam_step_: one master param per param, or none");
  TORCH_CHECK(!(stochastic_rounding && !master_params.empty()),
              "adam_step_: stochastic_rounding and master params are alternatives; pass one");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device() == params[0].device(), "adam_step_: all params must be on one device, got ",
                params[0].device(), " and ", p.device());
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "adam_step_: params must be dense");
    // Checked here, before any launch: a CUDA call of several launches must not apply part of a step and then fail.
    TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kBFloat16 || p.scalar_type() == at::kHalf,
                "adam_step_: params must be float32, bfloat16 or float16, got ", p.scalar_type());
    TORCH_CHECK(!stochastic_rounding || p.scalar_type() == at::kBFloat16,
                "adam_step_: stochastic rounding is for bfloat16 params");
    auto same_layout = [&](const at::Tensor& t, const char* what) {
      TORCH_CHECK(t.device() == p.device(), "adam_step_: ", what, " must be on the param's device");
      TORCH_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides(), "adam_step_: ", what,
                  " must have the param's shape and strides");
    };
    auto fp32_state = [&](const at::Tensor& t, const char* what) {
      same_layout(t, what);
      TORCH_CHECK(t.scalar_type() == at::kFloat, "adam_step_: ", what, " must be float32");
    };
    TORCH_CHECK(grads[i].layout() == at::kStrided,
                "Adam does not support sparse gradients, please consider SparseAdam instead");
    TORCH_CHECK(grads[i].device() == p.device() && grads[i].sizes() == p.sizes(),
                "adam_step_: a grad must have its param's shape and device");
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type() || grads[i].scalar_type() == at::kFloat,
                "adam_step_: a grad must have its param's dtype or float32");
    fp32_state(exp_avgs[i], "exp_avg");
    fp32_state(exp_avg_sqs[i], "exp_avg_sq");
    if (amsgrad) fp32_state(max_exp_avg_sqs[i], "max_exp_avg_sq");
    if (!master_params.empty()) fp32_state(master_params[i], "master param");
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat && steps[i].device() == p.device(),
                "adam_step_: each step must be a one-element float32 tensor on the param's device");
  }
  std::vector<at::Tensor> matched_grads(grads.begin(), grads.end());
  for (size_t i = 0; i < n; ++i) {
    if (grads[i].strides() != params[i].strides()) {
      matched_grads[i] = at::empty_like(params[i], grads[i].options()).copy_(grads[i]);
    }
  }
  for (const auto* scalar : {&lr_tensor, &grad_scale, &found_inf}) {
    if (scalar->has_value() && n > 0) {
      TORCH_CHECK((*scalar)->numel() == 1 && (*scalar)->scalar_type() == at::kFloat &&
                      (*scalar)->device() == params[0].device(),
                  "adam_step_: lr_tensor, grad_scale and found_inf must be one-element float32 tensors on the "
                  "params' device");
    }
  }
  return matched_grads;
}

}  // namespace fused_optim
