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
#include <type_traits>

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

// A bf16 param with its fp32 master kept as a 16-bit remainder (master_weights=True): the master is exactly
// (param bits << 16) + remainder, the remainder a signed 16-bit integer. That holds for every master when the param
// is the master rounded to nearest with ties away from zero: the discarded low half then lies in [-0x8000, 0x7FFF]
// (with ties to even a tie rounding down would leave +0x8000, one value too many). It differs from round-to-nearest-
// even only on exact ties, by one ulp. A NaN master gives a quiet NaN param whose join is again a NaN.
FO_HOST_DEVICE uint16_t bf16_master_bits(float master) {
  const uint32_t u = float_bits(master);
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? (u >> 16) | 0x0040u : (u + 0x8000u) >> 16);
}

FO_HOST_DEVICE int16_t bf16_master_remainder(float master, uint16_t param_bits) {
  return static_cast<int16_t>(static_cast<uint16_t>(float_bits(master) - (static_cast<uint32_t>(param_bits) << 16)));
}

FO_HOST_DEVICE float join_bf16_master(uint16_t param_bits, int16_t remainder) {
  const uint32_t u = (static_cast<uint32_t>(param_bits) << 16) + static_cast<uint32_t>(static_cast<int32_t>(remainder));
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
}

// master_weights=24 (FlashOptim's "24-bit" masters): the master rounded to 24 bits (to nearest, ties away from
// zero) and kept as the bf16 param plus an 8-bit remainder: (param bits << 16) + (remainder << 8). The same split as
// above, one byte lower: the param is the 24-bit master rounded to nearest with ties away from zero, the remainder
// the rest in [-0x80, 0x7F]. A NaN gives a quiet NaN param and a remainder of 0.
FO_HOST_DEVICE uint32_t master24(float master) {
  return (float_bits(master) + 0x80u) >> 8;  // the top 24 bits, rounded (a NaN's are never used)
}

FO_HOST_DEVICE uint16_t bf16_master24_bits(float master) {
  const uint32_t u = float_bits(master);
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? (u >> 16) | 0x0040u : (master24(master) + 0x80u) >> 8);
}

FO_HOST_DEVICE int8_t bf16_master24_remainder(float master, uint16_t param_bits) {
  const uint32_t u = float_bits(master);
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<int8_t>(nan ? 0u : (master24(master) - (static_cast<uint32_t>(param_bits) << 8)) & 0xFFu);
}

FO_HOST_DEVICE float join_bf16_master24(uint16_t param_bits, int8_t remainder) {
  const uint32_t u = ((static_cast<uint32_t>(param_bits) << 8) + static_cast<uint32_t>(static_cast<int32_t>(remainder)))
                     << 8;
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
}

// How an optimizer's fp32 result reaches a param: rounded to nearest; through an fp32 master copy (the update reads
// the copy, writes it, and the param gets its rounding); through a 16-bit master remainder beside a bf16 param (the
// two together are the fp32 master, exactly: above), or an 8-bit one (a 24-bit master); or stochastically rounded
// to bf16.
enum class WriteBack { kNearest, kMaster, kRemainder, kStochastic, kRemainder8 };

// The element type of a call's master list (unused without a master).
template <WriteBack kWrite>
using master_t = std::conditional_t<kWrite == WriteBack::kRemainder, int16_t,
                                    std::conditional_t<kWrite == WriteBack::kRemainder8, int8_t, float>>;

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

// moments="bf16": Adam's moments stored as bf16 and rounded stochastically after each update. Rounding to nearest
// would stall them: beta2 = 0.999 moves exp_avg_sq by 0.1 % a step, under half a bf16 ulp (0.2 %), so it would never
// decay; unbiased rounding keeps every small step in expectation. One 32-bit draw per element rounds two moments
// (exp_avg with its low 16 bits, exp_avg_sq with its high 16); a second draw, max_exp_avg_sq. Draw k's stream is
// derived from the tensor's, and its bits are one mix32 of stream and index, not random_bits' two: dithering a
// rounding needs no more, and at two draws of 8 multiplies an element the CPU loop was bound by the hash.
FO_HOST_DEVICE uint32_t moment_stream(uint32_t stream, uint32_t draw) {
  return mix32(stream + 0x9E3779B9u * (draw + 1u));
}

FO_HOST_DEVICE uint32_t moment_bits(uint32_t moment_stream, uint32_t index_low, uint32_t index_high) {
  return mix32((moment_stream ^ index_low) + 0x9E3779B9u * index_high);
}

FO_HOST_DEVICE uint32_t moment_bits(uint32_t moment_stream, int64_t index) {
  const uint64_t u = static_cast<uint64_t>(index);
  return moment_bits(moment_stream, static_cast<uint32_t>(u), static_cast<uint32_t>(u >> 32));
}

// A moment's new value in its storage type: fp32 as it is, bf16 stochastically with the low 16 of `bits`.
template <typename moment_t>
FO_HOST_DEVICE moment_t to_moment(float value, uint32_t bits) {
  if constexpr (std::is_same_v<moment_t, float>) {
    return value;
  } else {
    return bf16_stochastic(value, bits);
  }
}

}  // namespace fused_optim
