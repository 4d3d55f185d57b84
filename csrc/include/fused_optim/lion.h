// The math of one Lion element (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"), shared by the
// CUDA kernel (csrc/cuda/lion.cu) and the CPU kernel (csrc/cpu/lion.cpp).
//
// Everything is fp32 whatever the parameter dtype (docs/design.md, the numerics contract), in the paper's order:
//   g = grad / grad_scale, negated when maximizing
//   p = p * (1 - lr * weight_decay)                 decoupled weight decay
//   c = beta1 * m + (1 - beta1) * g                 the update direction: only its sign is used
//   p = p - lr * sign(c)                            sign as torch.sign: 0 for 0 and for NaN
//   m = beta2 * m + (1 - beta2) * g                 the one moment, with its own beta
// The lr is a double until lr * weight_decay is rounded, as a Python float is.
#pragma once

#include "fused_optim/macros.h"

namespace fused_optim {

// What one tensor's update needs, derived once per tensor (not per element) from the lr and the grad scale, either
// of which may live on the device.
struct LionScalars {
  float grad_multiplier;  // 1 / grad_scale, negated when maximizing
  float param_decay;      // 1 - lr * weight_decay
  float lr;
  float beta1;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
};

FO_HOST_DEVICE LionScalars lion_scalars(double beta1, double beta2, double weight_decay, bool maximize, double lr,
                                        float grad_scale) {
  LionScalars s;
  const float inverse_scale = 1.0f / grad_scale;
  s.grad_multiplier = maximize ? -inverse_scale : inverse_scale;
  s.param_decay = static_cast<float>(1.0 - lr * weight_decay);
  s.lr = static_cast<float>(lr);
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  return s;
}

// One element. Returns the new parameter value (fp32, before any rounding to the parameter dtype) and updates the
// moment in place. Selects rather than branches, so a CPU loop over it vectorises.
FO_HOST_DEVICE float lion_update(float param, float grad, float& exp_avg, const LionScalars& s) {
  grad *= s.grad_multiplier;
  param *= s.param_decay;
  const float direction = s.beta1 * exp_avg + s.one_minus_beta1 * grad;
  const float sign = static_cast<float>(direction > 0.0f) - static_cast<float>(direction < 0.0f);
  exp_avg = s.beta2 * exp_avg + s.one_minus_beta2 * grad;
  return param - s.lr * sign;
}

}  // namespace fused_optim
