// moments="int8" on CUDA (moment_int8.h): the codes of kVec elements a thread, and a block of codes' scale found by
// the kLanesPerBlock consecutive lanes that hold it (adam_int8.cu; sgd.cu and lion.cu through step_signed_codes).
#pragma once

#include <algorithm>
#include <cstdint>

#include "fused_optim/rounding.h"

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
  // the element's magnitude_bits, 0 past the valid ones, in one LOP3 before the max (a compare and a select took
  // one instruction more an element; magnitude_bits(x) & mask, its mask apart from the validity's, took one more too)
#pragma unroll
  for (int k = 0; k < kVec; ++k) largest = max(largest, float_bits(x[k]) & (k < valid ? 0x7FFFFFFFu : 0u));
#pragma unroll
  for (int offset = 1; offset < kLanesPerBlock; offset <<= 1) {
    largest = max(largest, __shfl_xor_sync(0xFFFFFFFFu, largest, offset));
  }
  return largest;
}

// A thread's kVec params (by write-back kWrite) and grads from element i as fp32: 16-byte vectors where `vector`,
// else the `valid` elements one by one (0 past them).
template <WriteBack kWrite, typename param_t, typename grad_t>
__device__ __forceinline__ void load_params_and_grads(const param_t* param, const master_t<kWrite>* master,
                                                      const grad_t* grad, int64_t i, bool vector, int valid,
                                                      float (&p)[kVec], float (&g)[kVec]) {
  if (vector) {
    multi_tensor::load_param_vec<kWrite>(param, master, i, p);
    multi_tensor::load_vec(grad + i, g);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      p[k] = k < valid ? multi_tensor::load_param_at<kWrite>(param, master, i + k) : 0.0f;
      g[k] = k < valid ? static_cast<float>(grad[i + k]) : 0.0f;
    }
  }
}

// The updated params back, as load_params_and_grads read them (stochastic rounding from `stream`).
template <WriteBack kWrite, typename param_t>
__device__ __forceinline__ void store_params(param_t* param, master_t<kWrite>* master, int64_t i, bool vector,
                                             int valid, const float (&p)[kVec], uint32_t stream) {
  if (vector) {
    multi_tensor::store_param_vec<kWrite>(param, master, i, p, stream);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (k < valid) multi_tensor::store_param_at<kWrite>(param, master, i + k, p[k], stream);
    }
  }
}

// A block's work (multi_tensor.cuh) for an optimizer with one signed int8 moment (SGD's momentum buffer, Lion's
// exp_avg), kVec elements a thread an iteration: param (by write-back kWrite), grad and codes loaded, `update(p, g,
// m)` steps one element (p the param's fp32 value, m its dequantized moment: both in/out), the block of codes' new
// scale found by shuffles, the codes rounded with the low 16 of `draw`'s moment bits (a bf16 moment's), and the param
// written back (stochastic rounding from `stream`). Param, grad and master move in 16-byte vectors, the codes in
// 8-byte ones, where all are aligned and the vector lies inside the work.
template <int kThreads, WriteBack kWrite, typename param_t, typename grad_t, typename UpdateFn>
__device__ __forceinline__ void step_signed_codes(const multi_tensor::BlockWork& work, param_t* param,
                                                  master_t<kWrite>* master, const grad_t* grad, int8_t* codes,
                                                  uint16_t* scales, uint32_t draw, uint32_t stream, UpdateFn&& update) {
  const bool vectorizable = multi_tensor::aligned16(param) && multi_tensor::aligned16(grad) &&
                            reinterpret_cast<uintptr_t>(codes) % 8 == 0 &&
                            (master == nullptr || multi_tensor::aligned16(master));
  // Every thread runs every iteration (the shuffles need all lanes), with 0..kVec elements of its own.
  for (int64_t base = work.begin; base < work.end; base += kThreads * kVec) {
    const int64_t i = base + threadIdx.x * kVec;
    const int valid = static_cast<int>(std::clamp<int64_t>(work.end - i, 0, kVec));
    const bool vector = vectorizable && valid == kVec;
    const int64_t block = i / kInt8Block;
    float p[kVec], g[kVec], m[kVec];
    int8_t c[kVec];
    load_codes(codes + i, vector, valid, c);
    load_params_and_grads<kWrite>(param, master, grad, i, vector, valid, p, g);
    const float step = valid > 0 ? signed_step(bf16_bits_to_float(scales[block])) : 0.0f;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      m[k] = dequantize_signed(c[k], step);
      update(p[k], g[k], m[k]);
    }
    const uint16_t scale_bits = int8_scale_bits(block_largest(m, valid));
    if (valid > 0 && threadIdx.x % kLanesPerBlock == 0) scales[block] = scale_bits;
    const float inverse = inverse_scale(scale_bits);
#pragma unroll
    for (int k = 0; k < kVec; ++k) c[k] = quantize_signed(m[k], inverse, moment_bits(draw, i + k) & 0xFFFFu);
    store_codes(codes + i, vector, valid, c);
    store_params<kWrite>(param, master, i, vector, valid, p, stream);
  }
}

}  // namespace int8_codes
}  // namespace fused_optim
