// Loading and storing fp32/bf16/fp16 elements as fp32 in CPU loops that the compiler vectorises.
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "fused_optim/rounding.h"

namespace fused_optim {

// bf16 goes through its raw bits (rounding.h) so the loop vectorises; fp16 and fp32 through c10's conversions.
template <typename T>
inline float load_float(const T* __restrict__ data, int64_t i) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return bf16_bits_to_float(reinterpret_cast<const uint16_t*>(data)[i]);
  } else {
    return static_cast<float>(data[i]);
  }
}

template <typename T>
inline void store_float(T* __restrict__ data, int64_t i, float value) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    reinterpret_cast<uint16_t*>(data)[i] = float_to_bf16_bits(value);
  } else {
    data[i] = round_to<T>(value);
  }
}

}  // namespace fused_optim
