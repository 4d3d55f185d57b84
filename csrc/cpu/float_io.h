// Loading and storing fp32/bf16/fp16 elements as fp32 in CPU loops that the compiler vectorises.
//
// bf16 and fp16 go through their raw bits, with integer ops and selects only: c10's class types, and c10::Half's
// branchy conversions, keep gcc from vectorising a loop that touches them (fp16 Adam ran scalar on every ISA).
// The results are c10's bit for bit: round-to-nearest-even, subnormals kept, NaN quiet (tests compare every
// backend with torch's own conversions).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "fused_optim/rounding.h"
#include "prefetch.h"

namespace fused_optim {

inline float bits_to_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// fp16 -> fp32, exact: normals by moving the exponent (15 -> 127 bias), inf/NaN by also filling the exponent, and
// subnormals (exponent 0) by letting the FPU normalise 2^-14 * (1 + m) - 2^-14 = m * 2^-24 (F. Giesen's method).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t shifted = static_cast<uint32_t>(h & 0x7FFFu) << 13;  // exponent and mantissa, in fp32 places
  const uint32_t exponent = shifted & 0x0F800000u;
  const uint32_t normal = shifted + 0x38000000u;                      // + (127 - 15) << 23
  const uint32_t inf_nan = normal + 0x38000000u;                       // + (128 - 16) << 23: exponent all ones
  const float subnormal = bits_to_float(normal + 0x00800000u) - bits_to_float(0x38800000u);
  const uint32_t magnitude = exponent == 0x0F800000u ? inf_nan : exponent == 0 ? float_bits(subnormal) : normal;
  return bits_to_float(magnitude | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

// fp32 -> fp16, round-to-nearest-even: values that round to an fp16 subnormal are added to a magic number whose
// ulp is fp16's smallest subnormal (the FPU rounds), normals round their mantissa in integer ops; too large gives
// inf, NaN gives a quiet NaN, as c10::Half(float) does.
inline uint16_t float_to_half_bits(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t sign = (u & 0x80000000u) >> 16;
  const uint32_t magnitude = u & 0x7FFFFFFFu;
  const uint32_t normal = (magnitude + 0xC8000FFFu + ((magnitude >> 13) & 1u)) >> 13;  // (15 - 127) << 23 + 0xFFF
  const float denorm_magic = bits_to_float(0x3F000000u);  // ((127 - 15) + (23 - 10) + 1) << 23: 0.5
  const uint32_t subnormal = float_bits(bits_to_float(magnitude) + denorm_magic) - 0x3F000000u;
  const uint32_t finite = magnitude < 0x38800000u ? subnormal : normal;  // below 2^-14: an fp16 subnormal
  const uint32_t result = magnitude >= 0x47800000u ? (magnitude > 0x7F800000u ? 0x7E00u : 0x7C00u) : finite;
  return static_cast<uint16_t>(result | sign);
}

template <typename T>
inline float load_float(const T* __restrict__ data, int64_t i) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return bf16_bits_to_float(reinterpret_cast<const uint16_t*>(data)[i]);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return half_bits_to_float(reinterpret_cast<const uint16_t*>(data)[i]);
  } else {
    return static_cast<float>(data[i]);
  }
}

template <typename T>
inline void store_float(T* __restrict__ data, int64_t i, float value) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    reinterpret_cast<uint16_t*>(data)[i] = float_to_bf16_bits(value);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    reinterpret_cast<uint16_t*>(data)[i] = float_to_half_bits(value);
  } else {
    data[i] = round_to<T>(value);
  }
}

// A moment's new value in its storage type (rounding.h's to_moment: `bits` in the low 16), bf16 through its raw
// bits so the loop vectorises.
template <typename moment_t>
inline void store_moment(moment_t* __restrict__ data, int64_t i, float value, uint32_t bits) {
  if constexpr (std::is_same_v<moment_t, c10::BFloat16>) {
    reinterpret_cast<uint16_t*>(data)[i] = bf16_stochastic_bits(value, bits);
  } else {
    data[i] = value;
  }
}

// Whether a write-back keeps an array beside the params: an fp32 master copy or a remainder.
constexpr bool keeps_master(WriteBack kind) {
  return kind == WriteBack::kMaster || kind == WriteBack::kRemainder || kind == WriteBack::kRemainder8;
}

// prefetch_block of the param, its grad, its master array (where the write-back keeps one) and `others`.
template <WriteBack kWrite, typename param_t, typename grad_t, typename... Other>
inline void prefetch_param_block(int64_t index, const param_t* param, const grad_t* grad,
                                 const master_t<kWrite>* master, const Other*... others) {
  prefetch_block(index, param, grad, others...);
  if constexpr (keeps_master(kWrite)) prefetch_block(index, master);
}

// The fp32 value the update starts from: the param's, or its master's.
template <WriteBack kWrite, typename param_t>
inline float load_param(const param_t* __restrict__ param, const master_t<kWrite>* __restrict__ master, int64_t i) {
  if constexpr (kWrite == WriteBack::kMaster) {
    return master[i];
  } else if constexpr (kWrite == WriteBack::kRemainder) {
    return join_bf16_master(reinterpret_cast<const uint16_t*>(param)[i], master[i]);
  } else if constexpr (kWrite == WriteBack::kRemainder8) {
    return join_bf16_master24(reinterpret_cast<const uint16_t*>(param)[i], master[i]);
  } else {
    return load_float(param, i);
  }
}

// The update's result into param element i (and its master), by `kWrite` (stochastic rounding: element i of the
// tensor's random stream).
template <WriteBack kWrite, typename param_t>
inline void write_param(param_t* __restrict__ param, master_t<kWrite>* __restrict__ master, int64_t i, float value,
                        uint32_t random_stream) {
  if constexpr (kWrite == WriteBack::kStochastic) {
    reinterpret_cast<uint16_t*>(param)[i] = bf16_stochastic_bits(value, random_bits(random_stream, i));
  } else if constexpr (kWrite == WriteBack::kRemainder) {
    const uint16_t bits = bf16_master_bits(value);
    reinterpret_cast<uint16_t*>(param)[i] = bits;
    master[i] = bf16_master_remainder(value, bits);
  } else if constexpr (kWrite == WriteBack::kRemainder8) {
    const uint16_t bits = bf16_master24_bits(value);
    reinterpret_cast<uint16_t*>(param)[i] = bits;
    master[i] = bf16_master24_remainder(value, bits);
  } else {
    if constexpr (kWrite == WriteBack::kMaster) master[i] = value;
    store_float(param, i, value);
  }
}

// The x86-64 builds without AVX-512 (baseline, AVX2) have 16 vector registers; AVX-512 has 32.
#if defined(__x86_64__) && !defined(__AVX512F__)
inline constexpr bool kSixteenVectorRegisters = true;
#else
inline constexpr bool kSixteenVectorRegisters = false;
#endif

// fp16 arrays widened into a block of floats in L1 and narrowed from it, in a block's stage loops (ParamIO): gcc 12
// vectorises neither c10::Half's conversions nor _Float16's, and the integer forms above, in the update loop, cost it
// so many registers that it spilled. With F16C (every x86-64-v3 and v4 CPU) 8 an instruction, 16 with AVX-512, whose
// update loop reads the block 64 bytes at a time: a load that spans two earlier 32-byte stores cannot take its data
// from the store buffer, and such a store-forwarding stall, 4 a block, cost the AVX-512 steps over fp16 params a
// third of their time (docs/results.md). In the baseline build by the integer forms, in a loop of their own, which
// gcc vectorises with SSE2. The same bits: round-to-nearest-even, subnormals and infinities as c10's; a NaN stays a
// quiet NaN (its payload may differ from c10's one NaN, which tests/test_conversions.py allows, as torch's
// conversions do).
#if defined(__F16C__)
template <typename Count>
inline void widen_halves(const c10::Half* __restrict__ halves, float* __restrict__ floats, Count count) {
  const auto* bits = reinterpret_cast<const uint16_t*>(halves);
  int32_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= count; j += 16) {
    _mm512_storeu_ps(floats + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits + j))));
  }
#endif
  for (; j + 8 <= count; j += 8) {
    _mm256_storeu_ps(floats + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + j))));
  }
  for (; j < count; ++j) floats[j] = _cvtsh_ss(bits[j]);
}

template <typename Count>
inline void narrow_floats(const float* __restrict__ floats, c10::Half* __restrict__ halves, Count count) {
  auto* bits = reinterpret_cast<uint16_t*>(halves);
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int32_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= count; j += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bits + j), _mm512_cvtps_ph(_mm512_loadu_ps(floats + j), kNearest));
  }
#endif
  for (; j + 8 <= count; j += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(bits + j), _mm256_cvtps_ph(_mm256_loadu_ps(floats + j), kNearest));
  }
  for (; j < count; ++j) bits[j] = _cvtss_sh(floats[j], kNearest);
}
#else
template <typename Count>
inline void widen_halves(const c10::Half* __restrict__ halves, float* __restrict__ floats, Count count) {
  const auto* bits = reinterpret_cast<const uint16_t*>(halves);
#pragma omp simd
  for (int32_t j = 0; j < count; ++j) floats[j] = half_bits_to_float(bits[j]);
}

template <typename Count>
inline void narrow_floats(const float* __restrict__ floats, c10::Half* __restrict__ halves, Count count) {
  auto* bits = reinterpret_cast<uint16_t*>(halves);
#pragma omp simd
  for (int32_t j = 0; j < count; ++j) bits[j] = float_to_half_bits(floats[j]);
}
#endif

// Where staging fp16 arrays was measured to pay (docs/results.md; AdamW over fp16 params, one thread, in cache, ns a
// param): on every x86-64 level, params and grads (2.7 -> 0.95 with AVX2 kernels, 1.4 -> 0.77 with AVX-512 ones,
// 5.1 -> 3.4 baseline). aarch64's builds were not measured, and keep the integer forms in the update loop.
#if defined(__x86_64__)
inline constexpr bool kStageHalves = true;
#else
inline constexpr bool kStageHalves = false;
#endif

// Whether the loss, accumulation and norm kernels convert T elements apart, a row or a block at a time in a loop of
// their own (widen_halves, narrow_floats), rather than one by one where they use them: fp16 with F16C. There the
// loops over fp16 took 1.3-2.4x the time of those over bf16 (AVX2 kernels, in cache; docs/results.md) and now about
// the same. The baseline build's integer forms took 10-20 % longer apart: its loops were not short of registers.
template <typename T>
#if defined(__F16C__)
inline constexpr bool kConvertsApart = std::is_same_v<T, c10::Half>;
#else
inline constexpr bool kConvertsApart = false;
#endif

// A tensor's params as an optimizer loop reads and writes them, as fp32 (load_param, write_param; element i of the
// tensor), and their grads (grad), through blocks of fp32 values in L1 where that helps: loaded before the block's
// update loop and stored after it, in loops of their own (stage_in, stage_out).
// - 24-bit masters in a build of 16 vector registers: with the int8 remainders' loads and stores in the update loop,
//   gcc sized its vectors by them, 32 elements a step with AVX2 (four registers a float value), and spilled; staged,
//   AdamW's step with fp32 moments takes a fifth less time (docs/results.md). The int8 moments' codes are kept out of
//   that loop the same way (int8_blocks.h).
// - fp16 params (or their fp32 master copies beside them) and fp16 grads, where that pays (kStageHalves above).
// kMayStage: false for a loop that steps whole chunks rather than blocks, whose blocks would cost what staging saves.
template <WriteBack kWrite, typename param_t, typename grad_t, bool kMayStage = true>
struct ParamIO {
  static constexpr bool kHalves = kStageHalves && std::is_same_v<param_t, c10::Half> &&
                                  (kWrite == WriteBack::kNearest || kWrite == WriteBack::kMaster);
  static constexpr bool kStagedParams =
      kMayStage && ((kWrite == WriteBack::kRemainder8 && kSixteenVectorRegisters) || kHalves);
  static constexpr bool kStagedGrads = kMayStage && kStageHalves && std::is_same_v<grad_t, c10::Half>;
  static constexpr bool kStaged = kStagedParams || kStagedGrads;
  param_t* __restrict__ param;
  const grad_t* __restrict__ grads;
  master_t<kWrite>* __restrict__ master;
  uint32_t random_stream;
  int64_t block_start = 0;  // staged: the element block[0] and grad_block[0] hold
  alignas(64) float block[kStagedParams ? kInt8Block : 1] = {};
  alignas(64) float grad_block[kStagedGrads ? kInt8Block : 1] = {};

  float load(int64_t i) const {
    if constexpr (kStagedParams) {
      return block[i - block_start];
    } else {
      return load_param<kWrite>(param, master, i);
    }
  }
  void store(int64_t i, float value) {
    if constexpr (kStagedParams) {
      block[i - block_start] = value;
    } else {
      write_param<kWrite>(param, master, i, value, random_stream);
    }
  }
  float grad(int64_t i) const {
    if constexpr (kStagedGrads) {
      return grad_block[i - block_start];
    } else {
      return load_float(grads, i);
    }
  }
  // elements [start, start + count), count at most kInt8Block
  template <typename Count>
  void stage_in(int64_t start, Count count) {
    if constexpr (kStaged) block_start = start;
    if constexpr (kStagedGrads) widen_halves(grads + start, grad_block, count);
    if constexpr (kStagedParams && kHalves && kWrite == WriteBack::kNearest) {
      widen_halves(param + start, block, count);
    } else if constexpr (kStagedParams) {
#pragma omp simd
      for (int32_t j = 0; j < count; ++j) block[j] = load_param<kWrite>(param, master, start + j);
    }
  }
  template <typename Count>
  void stage_out(int64_t start, Count count) {
    if constexpr (kStagedParams && kHalves) {
      if constexpr (kWrite == WriteBack::kMaster) std::memcpy(master + start, block, count * sizeof(float));
      narrow_floats(block, param + start, count);
    } else if constexpr (kStagedParams) {
#pragma omp simd
      for (int32_t j = 0; j < count; ++j) write_param<kWrite>(param, master, start + j, block[j], random_stream);
    }
  }
};

}  // namespace fused_optim
