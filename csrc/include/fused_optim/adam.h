// The math of one Adam/AdamW element, shared by the CUDA kernel (csrc/cuda/adam.cu) and the CPU kernel
// (csrc/cpu/adam.cpp), so the CPU tests exercise the exact arithmetic the GPU runs.
//
// Everything is fp32 whatever the parameter dtype (docs/design.md, the numerics contract). The order of operations follows
// torch.optim.Adam's single-tensor path (foreach=False), the reference torch's own tests use:
//   g  = grad / grad_scale, negated when maximizing; plus weight_decay * param for Adam's coupled (L2) decay
//   p  = p * (1 - lr * weight_decay)                     AdamW's decoupled decay (Loshchilov & Hutter, 2019)
//   m  = lerp(m, g, 1 - beta1)                           first moment
//   v  = beta2 * v + (1 - beta2) * g * g                  second moment
//   v̂  = max(v̂, v) when amsgrad                          (Reddi et al., 2018)
//   p  = p - (lr / (1 - beta1^t) * m) / (sqrt(v̂) / sqrt(1 - beta2^t) + eps)
// and the lr is a double until lr / (1 - beta1^t) and 1 - lr * weight_decay are rounded, as torch's Python float
// is. Each operation is rounded on its own (no FMA but the L2 term's; tests/test_adam.py checks the kernels bit
// for bit against that model). torch's CPU lerp and addcmul fuse a multiply-add, so its fp32 steps differ from
// these by an ulp in about 1 % of the elements.
#pragma once

#include <cmath>
#include <cstdint>

#include "fused_optim/macros.h"
#include "fused_optim/multiply_add.h"

namespace fused_optim {

// torch's lerp(start, end, weight) for a weight fixed for the tensor. torch takes start + weight * (end - start) below
// weight 0.5 and end - (end - start) * (1 - weight) from 0.5 on, each exact at its end of the range. Both are
// base + coefficient * (end - start), with the base and the coefficient chosen once (lerp_weight): x - y is x + (-y)
// and (-c) * d is -(c * d), exactly, so each form keeps its bits, and an element costs one product and a select of
// its base instead of both forms and a select of their results: up to 1.5 SASS instructions fewer an element in the
// CUDA AdamW kernels (benchmarks/sass_per_element.py), 5 fewer in the AVX-512 int8 loop's 64-element block.
struct LerpWeight {
  float weight;
  float coefficient;  // weight below 0.5, -(1 - weight) from 0.5 on
};

FO_HOST_DEVICE bool lerps_from_end(float weight) { return !(fabsf(weight) < 0.5f); }

FO_HOST_DEVICE LerpWeight lerp_weight(float weight) {
  return LerpWeight{weight, lerps_from_end(weight) ? -(1.0f - weight) : weight};
}

// The form is picked by a compare of the weight, not by a bool kept beside it: gcc vectorised no loop that selected
// on a bool member (every CPU Adam loop ran scalar, 2-3x slower).
FO_HOST_DEVICE float lerp(float start, float end, LerpWeight weight) {
  return (lerps_from_end(weight.weight) ? end : start) + weight.coefficient * (end - start);
}

// Hyper-parameters of one step, the same for every tensor of a group.
// Kept in double: 1 - beta and 1 - beta^t are rounded to fp32 only after the subtraction, as torch does with
// its Python-float hyper-parameters (fp32 0.999 is off by 1.3e-8, which is 1.3e-5 of 1 - 0.999).
struct AdamHyper {
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool decoupled_weight_decay;  // AdamW
  bool maximize;
};

// What one tensor's update needs, derived once per tensor (not per element) from the step count, the
// learning rate and the grad scale, all of which may live on the device.
struct AdamScalars {
  float grad_multiplier;        // 1 / grad_scale, negated when maximizing
  float l2_weight_decay;        // Adam's coupled decay; 0 for AdamW
  float param_decay;            // AdamW's 1 - lr * weight_decay; 1 for Adam
  LerpWeight first_moment_weight;  // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float step_size;              // lr / (1 - beta1^t)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  float inverse_bias_correction2_sqrt;  // its reciprocal, correctly rounded
  float eps;
};

// `step` is the count after this update (1 on the first). Bias corrections in double, as torch computes them
// from a Python float: fp32 powf loses ~1e-6 relative in 1 - beta2^t, enough to show after 100 steps. `lr` is the
// Python float's double, or a tensor lr's fp32 value.
FO_HOST_DEVICE AdamScalars adam_scalars(const AdamHyper& h, double lr, float step, float grad_scale) {
  AdamScalars s;
  const float inverse_scale = 1.0f / grad_scale;
  s.grad_multiplier = h.maximize ? -inverse_scale : inverse_scale;
  s.l2_weight_decay = h.decoupled_weight_decay ? 0.0f : static_cast<float>(h.weight_decay);
  s.param_decay = h.decoupled_weight_decay ? static_cast<float>(1.0 - lr * h.weight_decay) : 1.0f;
  s.first_moment_weight = lerp_weight(static_cast<float>(1.0 - h.beta1));
  s.beta2 = static_cast<float>(h.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  const double bias_correction1 = 1.0 - pow(h.beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - pow(h.beta2, static_cast<double>(step));
  s.step_size = static_cast<float>(lr / bias_correction1);
  s.bias_correction2_sqrt = static_cast<float>(sqrt(bias_correction2));
  s.inverse_bias_correction2_sqrt = 1.0f / s.bias_correction2_sqrt;
  s.eps = static_cast<float>(h.eps);
  return s;
}

// x / divisor correctly rounded, for x >= +0 (the root of a second moment), given `inverse`, 1 / divisor correctly
// rounded. The AVX-512 CPU kernels and the CUDA ones take Markstein's sequence, x * inverse corrected by its
// remainder, which an FMA computes exactly: correctly rounded as well (his theorem; the same bits as vdivps on all
// 2^23 mantissas of x, for 24000 divisors once and for 55 in tests/test_quotient_by_constant.py). On the CPU it is
// free of the vector divider, which the int8-moment step waits on: 4-7 % off that step with 512-bit vectors
// (docs/results.md); with 256-bit vectors, whose division costs less, it was slower. On a GPU it is 3 instructions
// where the IEEE division takes 9 and a branch to its slow path: 5.6-7.1 fewer SASS instructions an element in every
// AdamW kernel (benchmarks/sass_per_element.py).
// An infinite or NaN x has a NaN remainder: x * inverse is then x / divisor.
FO_HOST_DEVICE float quotient_by_constant(float x, float divisor, float inverse) {
#if defined(__AVX512F__) || defined(__CUDACC__)
  const float estimate = x * inverse;
  const float quotient = fmaf(fmaf(-estimate, divisor, x), inverse, estimate);
  return estimate < INFINITY ? quotient : estimate;
#else
  (void)inverse;
  return x / divisor;
#endif
}

// The larger of a and b, a NaN in either kept, as torch.maximum keeps it (torch's amsgrad, fused or not, holds a NaN
// second moment). Two compares and a select on every backend: fmaxf would drop the NaN, and gcc keeps fmaxf scalar,
// and so every amsgrad loop was (2.2-2.5x slower than with a vectorised max).
FO_HOST_DEVICE float larger_keeping_nan(float a, float b) { return (b > a) | (b != b) ? b : a; }

// One element. Returns the new parameter value (fp32, before any rounding to the parameter dtype) and updates
// the moments in place. Branches test per-group constants, so they are uniform across a warp or a vector loop.
template <bool kAmsgrad>
FO_HOST_DEVICE float adam_update(float param, float grad, float& exp_avg, float& exp_avg_sq, float& max_exp_avg_sq,
                                 const AdamScalars& s) {
  grad *= s.grad_multiplier;
  // rounded as torch's grad.add(param, alpha=weight_decay), once where an FMA is (multiply_add.h): where grad and
  // the decay nearly cancel, a second rounding would be most of the result's error. A select, not a branch: gcc
  // vectorises the CPU loop around a select of a group constant, and gave up on the branch in the bf16/fp16 loops.
  grad = s.l2_weight_decay != 0.0f ? multiply_add(s.l2_weight_decay, param, grad) : grad;
  param *= s.param_decay;
  exp_avg = lerp(exp_avg, grad, s.first_moment_weight);
  exp_avg_sq = exp_avg_sq * s.beta2 + s.one_minus_beta2 * grad * grad;
  float second_moment = exp_avg_sq;
  if (kAmsgrad) {
    max_exp_avg_sq = larger_keeping_nan(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  const float denom =
      quotient_by_constant(sqrtf(second_moment), s.bias_correction2_sqrt, s.inverse_bias_correction2_sqrt) + s.eps;
  // (step_size * m) / denom, in torch's order (its addcdiv and its fused kernels alike)
  return param - s.step_size * exp_avg / denom;
}

}  // namespace fused_optim
