// moments="int8": an optimizer moment stored as one byte an element, in blocks of kInt8Block elements that share a
// bf16 scale. The update dequantizes to fp32, updates in fp32 and requantizes in the same pass; every backend runs
// these formulas with the same fp32 operations in the same order (no operation here can fuse into an FMA), so the
// codes agree bit for bit (fused_optim/int8_moments.py is the torch twin).
//
// Companding spends the 8 bits where the values are: a block's scale is set by its largest element, and linear codes
// would round most of the others to zero. A signed moment (Adam's exp_avg, SGD's momentum, Lion's exp_avg) stores
// sqrt(|x| / scale) in 127 steps with its sign: the smallest non-zero code is 1/127^2 = 6e-5 of the scale. A
// non-negative one (exp_avg_sq, max_exp_avg_sq) is kept by its square root r = sqrt(x), which the update computes
// anyway: the block's scale is its largest r, and the code sqrt(r / scale) in 255 steps, so x's smallest non-zero
// value is 1/255^4 = 2e-10 of the largest. The update divides by sqrt(exp_avg_sq), so its small values matter most,
// and a non-zero one never becomes code 0 (the update would then divide by eps alone).
//
// The codes round stochastically (16 random bits an element, rounding.h's moment_bits), as bf16 moments do: a code
// is 1/127 of the block's range, and exp_avg_sq's 0.1 % steps would never move it when rounded to nearest.
// The scale is the block's largest magnitude rounded up to bf16, taken on the fp32 bit patterns with an integer
// max: exact, order-free, and a NaN (whose bits exceed inf's) makes the scale NaN, so the block dequantizes to NaN
// as an fp32 moment would stay NaN.
#pragma once

#include <cstdint>

#include "fused_optim/macros.h"
#include "fused_optim/rounding.h"

namespace fused_optim {

constexpr int kInt8Block = 64;  // elements per scale: 2 bytes of scale per 64 one-byte codes

// A block's magnitude key of x: its fp32 bits without the sign (ordered as |x| is, NaN above inf).
FO_HOST_DEVICE uint32_t magnitude_bits(float x) { return float_bits(x) & 0x7FFFFFFFu; }

// The bf16 scale of a block whose largest magnitude_bits is `largest`: rounded up, so every |x| / scale <= 1. A NaN
// counts as the quiet NaN 0x7FC00000: one whose bits exceed 0x7FFF0000 (CUDA's 0x7FFFFFFF, an fp16 NaN widened)
// would carry into the sign bit and make the scale -0, a block of zeros.
FO_HOST_DEVICE uint16_t int8_scale_bits(uint32_t largest) {
  const uint32_t capped = largest < 0x7FC00000u ? largest : 0x7FC00000u;
  return static_cast<uint16_t>((capped + 0xFFFFu) >> 16);
}

// What a block's |x| are multiplied by: 1 / scale (one division a block, not one an element). 0 for a block of zeros
// (scale 0) or one holding a NaN (scale NaN): its codes are then 0, but for a NaN's own, and a NaN block dequantizes
// to NaN whatever its codes, as an fp32 moment would stay NaN. 0 too for a block of subnormals alone (a moment
// decayed for thousands of steps without a grad), flushed to zeros as a flush-to-zero unit would: 1 / scale would
// overflow below 2^-128, and a NaN from 0 * inf would make every zero of the block a whole code, which Lion's sign
// then steps with (and from 2^-126 on, the GPUs' flushing of subnormals agrees).
FO_HOST_DEVICE float inverse_scale(uint16_t scale_bits) {
  const float scale = bf16_bits_to_float(scale_bits);
  return scale >= 0x1p-126f ? 1.0f / scale : 0.0f;
}

// sqrt(q) for q in [0, 1], where it sets a code: below 2^-60 q counts as 2^-60, whose code is 0 as q's own is
// (sqrt(2^-60) * 255 * 65536 = 2^-6: fixed_code truncates it away). On CUDA that keeps q in the range where
// sqrtf takes its fast path, MUFU.RSQ and two FMAs, which is all nvcc emits for it there: the same correctly rounded
// root, without the range check and the branch to the slow path that sqrtf wraps around it: 4 SASS instructions a
// root net of the clamp, two roots an element (tests/test_code_root_sass.py holds the two sequences side by side).
FO_HOST_DEVICE float code_root(float q) {
#if defined(__CUDA_ARCH__)
  q = fmaxf(q, 0x1p-60f);
  float estimate;  // 1 / sqrt(q), approximately: MUFU.RSQ, as sqrtf's fast path starts
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(estimate) : "f"(q));
  const float root = __fmul_rn(q, estimate);
  return __fmaf_rn(__fmaf_rn(-root, root, q), __fmul_rn(estimate, 0.5f), root);
#else
  return sqrtf(q);
#endif
}

// The code of |x| in kSteps steps as a fixed-point number with 16 fraction bits: s = sqrt(|x| / scale) * kSteps,
// which lies between the codes c = floor(s) and c + 1. A product |x| / scale just over 1 (|x| is the block's
// largest) and a NaN count as 1 (s = kSteps, no fraction).
template <int kSteps>
FO_HOST_DEVICE int32_t fixed_code(float x, float inverse) {
  const float q = fabsf(x) * inverse;
  return static_cast<int32_t>(code_root(q < 1.0f ? q : 1.0f) * static_cast<float>(kSteps * 65536));  // < 2^24
}

// A signed moment's code rounds so that the value it stands for is unbiased: up with probability p = (s^2 - c^2) /
// ((c + 1)^2 - c^2) = f (s + c) / (2c + 1), f = s - c. (Rounded up with probability f, the code was unbiased and
// its square too large on average: +3 % at 3e-4 of the block's largest, +12 % at 1e-4, 2.5x at 1e-5, and SGD's and
// Lion's updates, linear in the moment, with it.) The draw u = 1 - bits16 / 2^16 (2^-16 .. 1) rounds up where
// u < p, multiplied out so that no division is left: with probability within 2^-16 of p, never for bits16 = 0 and
// to the nearest value for bits16 = 2^15. The factors are exact in fp32 and the two products rounded, by 2^-24 of
// them, far below that grain.
FO_HOST_DEVICE int8_t quantize_signed(float x, float inverse, uint32_t bits16) {
  const int32_t fixed = fixed_code<127>(x, inverse);
  const float s = static_cast<float>(fixed);            // s 2^16 (< 2^23: the conversions are exact)
  const float c = static_cast<float>(fixed & ~0xFFFF);  // c 2^16
  const float draw = static_cast<float>(65536 - static_cast<int32_t>(bits16));  // u 2^16
  // (2c + 1) 2^16, f 2^16 and (s + c) 2^16 (< 2^24) are exact
  const int32_t code = (fixed >> 16) + (draw * ((c + c) + 65536.0f) < (s - c) * (s + c) ? 1 : 0);
  return static_cast<int8_t>(x < 0.0f ? -code : code);
}

// A non-negative moment's code from its square root `root` (the inverse scale is of the block's roots), rounded up
// with probability f, unbiased in the code: 16 random bits added below its integer part, then dropped, as a bf16
// is rounded (rounding.h). The value it stands for, c^4, is then too large on average for the smallest elements
// (3.6x the fp32 moment for grads at 1e-3 of the block's largest, in a 3000-step AdamW run), and on purpose: an
// update divides by sqrt(v), and the noise of a few codes makes 1/sqrt(v) too large on average; rounded unbiased in
// c^4 the mean update came out 1.1-1.6x fp32's there, unbiased in c 1.00-1.08x (docs/results.md). A non-zero
// moment never becomes code 0 (the update would then divide by eps alone).
FO_HOST_DEVICE uint8_t quantize_unsigned(float root, float inverse, uint32_t bits16) {
  const int32_t code = (fixed_code<255>(root, inverse) + static_cast<int32_t>(bits16)) >> 16;
  const int32_t least = root > 0.0f ? 1 : 0;  // a select and a compare: gcc vectorises neither && nor max here
  return static_cast<uint8_t>(code > least ? code : least);
}

// What a code is multiplied by (per block, once): scale / 127^2 (the value), scale / 255^2 (the root).
FO_HOST_DEVICE float signed_step(float scale) { return scale * (1.0f / 16129.0f); }
FO_HOST_DEVICE float unsigned_step(float scale) { return scale * (1.0f / 65025.0f); }

FO_HOST_DEVICE float dequantize_signed(int8_t code, float step) {
  const float c = static_cast<float>(code);
  return (c * fabsf(c)) * step;
}

FO_HOST_DEVICE float dequantize_unsigned(uint8_t code, float step) {
  const float c = static_cast<float>(code);
  const float root = (c * c) * step;
  return root * root;
}

}  // namespace fused_optim
