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

// The bf16 scale of a block whose largest magnitude_bits is `largest`: rounded up, so every |x| / scale <= 1.
FO_HOST_DEVICE uint16_t int8_scale_bits(uint32_t largest) { return static_cast<uint16_t>((largest + 0xFFFFu) >> 16); }

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
// (sqrt(2^-60) * 255 * 65536 = 2^-6: magnitude_code truncates it away). On CUDA that keeps q in the range where
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

// The code of |x| in `steps` steps, sqrt(|x| / scale) * steps, as a fixed-point number with 16 fraction bits, rounded
// stochastically as a bf16 is (rounding.h): 16 random bits added below the integer part, then dropped, round it up
// with probability equal to its fraction. Integer ops in place of a floor, a compare and a select took 16 % off the
// CPU loop (docs/results.md). A product |x| / scale just over 1 (|x| is the block's largest) and a NaN count as 1.
template <int kSteps>
FO_HOST_DEVICE int32_t magnitude_code(float x, float inverse, uint32_t bits16) {
  const float q = fabsf(x) * inverse;
  const float fixed = code_root(q < 1.0f ? q : 1.0f) * static_cast<float>(kSteps * 65536);  // < 2^24: exact in int32
  return (static_cast<int32_t>(fixed) + static_cast<int32_t>(bits16)) >> 16;
}

FO_HOST_DEVICE int8_t quantize_signed(float x, float inverse, uint32_t bits16) {
  const int32_t code = magnitude_code<127>(x, inverse, bits16);
  return static_cast<int8_t>(x < 0.0f ? -code : code);
}

// A non-negative moment's code from its square root `root` (the inverse scale is of the block's roots).
FO_HOST_DEVICE uint8_t quantize_unsigned(float root, float inverse, uint32_t bits16) {
  const int32_t code = magnitude_code<255>(root, inverse, bits16);
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
