// Writing an fp32 result back to a parameter dtype: round-to-nearest-even, or stochastic rounding for bf16.
//
// Stochastic rounding (Gupta et al., 2015) rounds up with probability equal to the distance to the lower
// neighbour, so the rounding error is zero in expectation and updates far below a bf16 ulp still move the
// parameter over many steps. The random bits come from a counter-based hash of (seed, tensor, step, element):
// no RNG state to carry, nothing to sync, the same bits on every backend, and a different draw each step because
// the step count lives on the device.
#pragma once

#include <cstdint>
#include <cstring>

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include "fused_optim/macros.h"

namespace fused_optim {

// Murmur3's 32-bit finaliser: full avalanche, a handful of integer ops. fused_optim/triton/adam.py has its twin.
FO_HOST_DEVICE uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// Random bits for one element: `stream` identifies (seed, tensor, step), `index` the element.
FO_HOST_DEVICE uint32_t random_bits(uint32_t stream, int64_t index) {
  const uint64_t u = static_cast<uint64_t>(index);
  return mix32(mix32(stream ^ static_cast<uint32_t>(u)) + static_cast<uint32_t>(u >> 32));
}

FO_HOST_DEVICE uint32_t stream_key(uint32_t seed, uint32_t tensor_index, uint32_t step) {
  return mix32(mix32(seed + 0x9E3779B9u * tensor_index) ^ step);
}

FO_HOST_DEVICE uint32_t float_bits(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  return bits;
}

// Adding 16 random bits below the bf16 mantissa, then truncating, rounds up with probability equal to the
// discarded fraction. Inf and NaN pass through unchanged.
FO_HOST_DEVICE uint16_t bf16_stochastic_bits(float x, uint32_t bits) {
  const uint32_t u = float_bits(x);
  const bool finite = (u & 0x7F800000u) != 0x7F800000u;
  return static_cast<uint16_t>((finite ? u + (bits & 0xFFFFu) : u) >> 16);
}

FO_HOST_DEVICE c10::BFloat16 bf16_stochastic(float x, uint32_t bits) {
  return c10::BFloat16(bf16_stochastic_bits(x, bits), c10::BFloat16::from_bits());
}

// bf16 as raw bits: the same rounding as c10::BFloat16(float), written with integer ops and a select so that a
// CPU loop over it vectorises (the c10 class type keeps gcc from vectorising its loads and stores).
FO_HOST_DEVICE float bf16_bits_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
}

FO_HOST_DEVICE uint16_t float_to_bf16_bits(float x) {
  const uint32_t u = float_bits(x);
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  // nearest, ties to even
  return x != x ? static_cast<uint16_t>(0x7FC0) : rounded;  // NaN stays a (quiet) NaN
}

template <typename T>
FO_HOST_DEVICE T round_to(float x) {
  return static_cast<T>(x);  // round to nearest even (c10's conversions)
}

// An optimizer's new param value in the param's dtype: to nearest, or stochastically (kStochastic: bf16 params,
// element `index` of the tensor's random stream).
template <typename param_t, bool kStochastic>
FO_HOST_DEVICE param_t to_param(float value, uint32_t stream, int64_t index) {
  if constexpr (kStochastic) {
    return bf16_stochastic(value, random_bits(stream, index));
  } else {
    return round_to<param_t>(value);
  }
}

}  // namespace fused_optim
