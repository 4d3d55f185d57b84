// The math of one SGD element, shared by the CUDA kernel (csrc/cuda/sgd.cu) and the CPU kernel (csrc/cpu/sgd.cpp),
// so the CPU tests exercise the same formulas in the same order, and the same roundings, as the GPU.
//
// Everything is fp32 whatever the parameter dtype, the momentum buffer included (docs/design.md, the numerics contract).
// The order of operations and the roundings follow torch.optim.SGD's single-tensor path (foreach=False), whose
// add(other, alpha=) is one FMA where the machine has one (multiply_add.h); so an fp32 step has torch's bits:
//   g   = grad / grad_scale, negated when maximizing
//   g   = g + weight_decay * p                       L2 decay, coupled into the gradient
//   buf = g on the first step, else momentum * buf + (1 - dampening) * g      heavy-ball momentum (Polyak, 1964)
//         (momentum * buf rounded, as torch's mul_, then the rest one FMA)
//   g   = g + momentum * buf when nesterov, else buf                          (Sutskever et al., 2013)
//   p   = p - lr * g
// Rounding the last line twice made the error against float64 1.1x torch's at lr 0.1 over 50 steps with momentum.
// "First step" is per tensor and read on the device (the step count is 0), so no host sync decides it.
#pragma once

#include <cmath>

#include "fused_optim/macros.h"
#include "fused_optim/multiply_add.h"

namespace fused_optim {

// What one tensor's update needs, derived once per tensor (not per element) from the lr, the grad scale and the
// step count, any of which may live on the device.
struct SgdScalars {
  float grad_multiplier;      // 1 / grad_scale, negated when maximizing
  float weight_decay;
  float momentum;
  float one_minus_dampening;  // rounded to fp32 after the subtraction, as torch's `alpha=1 - dampening`
  float lr;
  // the momentum buffer is unset: it becomes the gradient itself (1, else 0). 32 bits, not a bool: a byte in the
  // loop makes gcc try only byte-lane vector modes, and the CPU loops over 16-bit params ran scalar
  uint32_t first_step;
};

FO_HOST_DEVICE SgdScalars sgd_scalars(double momentum, double dampening, double weight_decay, bool maximize, float lr,
                                      float grad_scale, float step) {
  SgdScalars s;
  const float inverse_scale = 1.0f / grad_scale;
  s.grad_multiplier = maximize ? -inverse_scale : inverse_scale;
  s.weight_decay = static_cast<float>(weight_decay);
  s.momentum = static_cast<float>(momentum);
  s.one_minus_dampening = static_cast<float>(1.0 - dampening);
  s.lr = lr;
  s.first_step = step == 0.0f ? 1u : 0u;
  return s;
}

// One element. Returns the new parameter value (fp32, before any rounding to the parameter dtype) and updates the
// momentum buffer in place (read only after the first step: it may hold anything before). The branches test
// per-tensor constants, so they are uniform across a warp or a vector loop.
template <bool kMomentum, bool kNesterov>
FO_HOST_DEVICE float sgd_update(float param, float grad, float& momentum_buffer, const SgdScalars& s) {
  grad *= s.grad_multiplier;
  if (s.weight_decay != 0.0f) grad = multiply_add(s.weight_decay, param, grad);
  if (kMomentum) {
    momentum_buffer = s.first_step != 0u
                          ? grad
                          : multiply_add(s.one_minus_dampening, grad, momentum_buffer * s.momentum);
    grad = kNesterov ? multiply_add(s.momentum, momentum_buffer, grad) : momentum_buffer;
  }
  return multiply_add(-s.lr, grad, param);
}

}  // namespace fused_optim
