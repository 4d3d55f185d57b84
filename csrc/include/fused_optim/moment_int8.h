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

// floor(t) + 1 with probability frac(t) (t >= 0): frac(t) and frac(t) * 2^16 are exact in fp32.
FO_HOST_DEVICE float stochastic_floor(float t, uint32_t bits16) {
  const float whole = floorf(t);
  return whole + ((t - whole) * 65536.0f > static_cast<float>(bits16) ? 1.0f : 0.0f);
}

// |x| / scale in [0, 1], as |x| times the block's inverse_scale (1 / scale, one division a block: the divisions
// and square roots bound the CPU loop). A product just over 1 (|x| is the block's largest) is 1; an all-zero
// block (0 * inf) and a NaN block (NaN scale) give 0. Selects only, so CPU loops vectorise.
FO_HOST_DEVICE float scaled(float x, float inverse_scale) {
  const float q = fabsf(x) * inverse_scale;
  return q <= 1.0f ? q : (q > 1.0f ? 1.0f : 0.0f);
}

FO_HOST_DEVICE int8_t quantize_signed(float x, float inverse_scale, uint32_t bits16) {
  const float code = stochastic_floor(127.0f * sqrtf(scaled(x, inverse_scale)), bits16);
  // through int32: gcc vectorises float -> int32 -> int8, not float -> int8
  return static_cast<int8_t>(static_cast<int32_t>(x < 0.0f ? -code : code));
}

// A non-negative moment's code from its square root `root` (the inverse scale is of the block's roots).
FO_HOST_DEVICE uint8_t quantize_unsigned(float root, float inverse_scale, uint32_t bits16) {
  const float code = stochastic_floor(255.0f * sqrtf(scaled(root, inverse_scale)), bits16);
  const float least = root > 0.0f ? 1.0f : 0.0f;  // a select and a compare: gcc vectorises neither && nor fmaxf here
  return static_cast<uint8_t>(static_cast<int32_t>(code > least ? code : least));
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
