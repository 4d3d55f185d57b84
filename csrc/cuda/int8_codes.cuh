// moments="int8" on CUDA (moment_int8.h): the codes of kVec elements a thread, and a block of codes' scale found by
// the kLanesPerBlock consecutive lanes that hold it (adam_int8.cu, sgd_int8.cu).
#pragma once

#include <cstdint>

#include "fused_optim/moment_int8.h"
#include "multi_tensor.cuh"

namespace fused_optim {
namespace int8_codes {

using multi_tensor::kVec;
constexpr int kLanesPerBlock = kInt8Block / kVec;  // 8 consecutive lanes of a warp hold one block of codes
static_assert(kInt8Block % kVec == 0 && 32 % kLanesPerBlock == 0, "a block of codes lies in one warp");

// Eight codes from one 8-byte load, or element by element (`valid` of them) where the vector would leave the
// tensor or is not 8-byte aligned.
template <typename code_t>
__device__ __forceinline__ void load_codes(const code_t* ptr, bool vector, int valid, code_t (&out)[kVec]) {
  if (vector) {
    const uint2 w = *reinterpret_cast<const uint2*>(ptr);
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = static_cast<code_t>(((k < 4 ? w.x : w.y) >> (8 * (k % 4))) & 0xFFu);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = k < valid ? ptr[k] : code_t{0};
  }
}

template <typename code_t>
__device__ __forceinline__ void store_codes(code_t* ptr, bool vector, int valid, const code_t (&in)[kVec]) {
  if (vector) {
    uint32_t w[2] = {0, 0};
#pragma unroll
    for (int k = 0; k < kVec; ++k) w[k / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(in[k])) << (8 * (k % 4));
    *reinterpret_cast<uint2*>(ptr) = make_uint2(w[0], w[1]);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (k < valid) ptr[k] = in[k];
    }
  }
}

// The largest magnitude_bits of a block of codes' new values: each thread's own, then over its block's lanes.
__device__ __forceinline__ uint32_t block_largest(const float (&x)[kVec], int valid) {
  uint32_t largest = 0;
#pragma unroll
  for (int k = 0; k < kVec; ++k) largest = k < valid ? max(largest, magnitude_bits(x[k])) : largest;
#pragma unroll
  for (int offset = 1; offset < kLanesPerBlock; offset <<= 1) {
    largest = max(largest, __shfl_xor_sync(0xFFFFFFFFu, largest, offset));
  }
  return largest;
}

}  // namespace int8_codes
}  // namespace fused_optim
