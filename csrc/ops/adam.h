// The C++ signature of fused_optim::adam_step_ (schema in fused_optim/ops/adam.py), shared by the CPU and CUDA
// implementations and by csrc/registration.cpp, plus the argument checks both run before touching memory.
#pragma once

#include <optional>
#include <vector>

#include "ops/optimizer_checks.h"
#include "ops/torch_api.h"

#include "fused_optim/adam.h"

namespace fused_optim {

#define FUSED_OPTIM_ADAM_ARGS                                                                                 \
  TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,                           \
      TensorList max_exp_avg_sqs, TensorList master_params, TensorList steps, TensorList moment_scales,        \
      double lr,                                                                                              \
      const std::optional<Tensor>& lr_tensor, double beta1, double beta2, double eps, double weight_decay,     \
      bool decoupled_weight_decay, bool amsgrad, bool maximize, bool stochastic_rounding, int64_t seed,       \
      const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf

// The same arguments, forwarded (to check_adam_args).
#define FUSED_OPTIM_ADAM_ARG_NAMES                                                                            \
  params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps, moment_scales, lr, lr_tensor,     \
      beta1, beta2, eps, weight_decay, decoupled_weight_decay, amsgrad, maximize, stochastic_rounding, seed, grad_scale, found_inf

void adam_step_cpu(FUSED_OPTIM_ADAM_ARGS);
void adam_step_cuda(FUSED_OPTIM_ADAM_ARGS);
// moments="int8" on CUDA (csrc/cuda/adam_int8.cu), after adam_step_cuda's checks.
void adam_int8_step_cuda(FUSED_OPTIM_ADAM_ARGS, const std::vector<Tensor>& matched_grads);

// Checks every argument before any memory is touched (a bad call changes nothing), and returns the grads in their
// params' memory layout: the kernels walk param, grad and state as one flat array each, and autograd already
// hands out grads in the param's layout, so only a grad a user assigned with other strides is copied.
inline std::vector<Tensor> check_adam_args(FUSED_OPTIM_ADAM_ARGS) {
  const size_t n = params.size();
  FO_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
           "adam_step_: params, grads, exp_avgs, exp_avg_sqs and steps must have the same length");
  FO_CHECK(!amsgrad || max_exp_avg_sqs.size() == n, "adam_step_: amsgrad needs one max_exp_avg_sq per param");
  FO_CHECK(master_params.empty() || master_params.size() == n, "adam_step_: one master param per param, or none");
  FO_CHECK(!(stochastic_rounding && !master_params.empty()),
           "adam_step_: stochastic_rounding and master params are alternatives; pass one");
  if (n == 0) return {};
  const torch::stable::Device device = params[0].device();
  std::vector<Tensor> matched_grads(grads.begin(), grads.end());
  // int8 moments (with their scales): exp_avg signed, the others unsigned codes; else one float dtype for all
  const bool int8 = !moment_scales.empty();
  FO_CHECK(!int8 || moment_scales.size() == n, "adam_step_: int8 moments need one moment_scales tensor per param");
  const ScalarType signed_dtype = int8 ? kChar : exp_avgs[0].scalar_type();
  const ScalarType unsigned_dtype = int8 ? kByte : signed_dtype;
  for (size_t i = 0; i < n; ++i) {
    const TensorInfo p(params[i]);
    check_param("adam_step_", p, device);
    FO_CHECK(!stochastic_rounding || p.dtype == kBFloat16, "adam_step_: stochastic rounding is for bfloat16 params");
    const TensorInfo grad = check_grad("adam_step_", grads[i], p,
                                       "Adam does not support sparse gradients, please consider SparseAdam instead");
    check_moment("adam_step_", exp_avgs[i], p, "exp_avg", signed_dtype);
    check_moment("adam_step_", exp_avg_sqs[i], p, "exp_avg_sq", unsigned_dtype);
    if (amsgrad) check_moment("adam_step_", max_exp_avg_sqs[i], p, "max_exp_avg_sq", unsigned_dtype);
    if (int8) check_moment_scales("adam_step_", moment_scales[i], params[i], amsgrad ? 3 : 2);
    if (!master_params.empty()) check_master("adam_step_", master_params[i], p, master_params[0].scalar_type());
    check_step("adam_step_", steps[i], p);
    if (!grad.strides.equals(p.strides)) matched_grads[i] = copy_in_layout_of(params[i], grads[i]);
  }
  check_step_scalars("adam_step_", device, lr_tensor, grad_scale, found_inf);
  return matched_grads;
}

}  // namespace fused_optim
