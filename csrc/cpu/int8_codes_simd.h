// moments="int8" codes a vector at a time with intrinsics, for the AVX2 and AVX-512 builds of the CPU kernels
// (the baseline build keeps the generic loop of moment_int8.h's functions). gcc's vectorisation of that loop narrows
// the 32-bit codes to bytes with masks, packs and permutes, and with AVX-512 kept its hashed bits and fixed-point
// codes on the stack between steps; here one byte shuffle and one permute (AVX2), or one vpmovdb (AVX-512) do it,
// and the rounding's selects are masks. The random bits come from rounding.h's own hash, in a loop of their own.
// Each operation is the scalar formula's, in its order, so the codes are bit for bit moment_int8.h's:
// tests/test_cpu_isa.py runs tests/test_adam_int8_moments.py on each kernel level the CPU has.
#pragma once

#if defined(__AVX2__)
#define FUSED_OPTIM_INT8_CODES_SIMD 1

#include <immintrin.h>

#include <cstdint>

#include "chunks.h"
#include "fused_optim/moment_int8.h"

namespace fused_optim {
namespace int8_codes_simd {

#if defined(__AVX512F__) && defined(__AVX512BW__)

constexpr int kLanes = 16;
using ints = __m512i;  // kLanes 32-bit integers

inline ints splat(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
inline __m512 splat_ps(float x) { return _mm512_set1_ps(x); }

inline ints load(const uint32_t* aligned) { return _mm512_load_si512(aligned); }
inline ints low16(ints bits) { return _mm512_and_si512(bits, splat(0xFFFFu)); }
inline ints high16(ints bits) { return _mm512_srli_epi32(bits, 16); }

// fixed_code<kSteps> of 16 elements. min_ps(q, 1) is `q < 1 ? q : 1` (it returns its second operand for a NaN q).
template <int kSteps>
inline ints fixed_codes(__m512 x, __m512 inverse) {
  const __m512 magnitude = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), splat(0x7FFFFFFFu)));
  const __m512 q = _mm512_min_ps(_mm512_mul_ps(magnitude, inverse), splat_ps(1.0f));
  return _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_sqrt_ps(q), splat_ps(kSteps * 65536.0f)));
}

// quantize_signed of values[0..15] (64-byte aligned), as 32-bit integers
inline ints signed_codes(const float* values, float inverse, ints bits16) {
  const __m512 x = _mm512_load_ps(values);
  const ints fixed = fixed_codes<127>(x, splat_ps(inverse));
  const __m512 s = _mm512_cvtepi32_ps(fixed);
  const __m512 c = _mm512_cvtepi32_ps(_mm512_and_si512(fixed, splat(0xFFFF0000u)));
  const __m512 draw = _mm512_cvtepi32_ps(_mm512_sub_epi32(splat(65536u), bits16));
  const __m512 odd = _mm512_add_ps(_mm512_add_ps(c, c), splat_ps(65536.0f));
  const __mmask16 up = _mm512_cmp_ps_mask(_mm512_mul_ps(draw, odd),
                                          _mm512_mul_ps(_mm512_sub_ps(s, c), _mm512_add_ps(s, c)), _CMP_LT_OQ);
  const ints code = _mm512_mask_add_epi32(_mm512_srli_epi32(fixed, 16), up, _mm512_srli_epi32(fixed, 16), splat(1));
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_sub_epi32(code, negative, _mm512_setzero_si512(), code);
}

// quantize_unsigned of roots[0..15], as 32-bit integers: at least 1 where root > 0
inline ints unsigned_codes(const float* roots, float inverse, ints bits16) {
  const __m512 root = _mm512_load_ps(roots);
  const ints code = _mm512_srli_epi32(_mm512_add_epi32(fixed_codes<255>(root, splat_ps(inverse)), bits16), 16);
  const __mmask16 positive = _mm512_cmp_ps_mask(root, _mm512_setzero_ps(), _CMP_GT_OQ);
  return _mm512_mask_max_epi32(code, positive, code, splat(1));
}

// 16 codes, the low byte of each 32-bit integer, stored in consecutive bytes
inline void store_codes(void* codes, ints code) {
  _mm_storeu_si128(static_cast<__m128i*>(codes), _mm512_cvtepi32_epi8(code));
}

#else  // AVX2

constexpr int kLanes = 8;
using ints = __m256i;  // kLanes 32-bit integers

inline ints splat(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
inline __m256 splat_ps(float x) { return _mm256_set1_ps(x); }

inline ints load(const uint32_t* aligned) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(aligned)); }
inline ints low16(ints bits) { return _mm256_and_si256(bits, splat(0xFFFFu)); }
inline ints high16(ints bits) { return _mm256_srli_epi32(bits, 16); }

// fixed_code<kSteps> of 8 elements. min_ps(q, 1) is `q < 1 ? q : 1` (it returns its second operand for a NaN q).
template <int kSteps>
inline ints fixed_codes(__m256 x, __m256 inverse) {
  const __m256 magnitude = _mm256_and_ps(x, _mm256_castsi256_ps(splat(0x7FFFFFFFu)));
  const __m256 q = _mm256_min_ps(_mm256_mul_ps(magnitude, inverse), splat_ps(1.0f));
  return _mm256_cvttps_epi32(_mm256_mul_ps(_mm256_sqrt_ps(q), splat_ps(kSteps * 65536.0f)));
}

// quantize_signed of values[0..7] (32-byte aligned), as 32-bit integers; -code is (code ^ -1) + 1 where x < 0
inline ints signed_codes(const float* values, float inverse, ints bits16) {
  const __m256 x = _mm256_load_ps(values);
  const ints fixed = fixed_codes<127>(x, splat_ps(inverse));
  const __m256 s = _mm256_cvtepi32_ps(fixed);
  const __m256 c = _mm256_cvtepi32_ps(_mm256_and_si256(fixed, splat(0xFFFF0000u)));
  const __m256 draw = _mm256_cvtepi32_ps(_mm256_sub_epi32(splat(65536u), bits16));
  const __m256 odd = _mm256_add_ps(_mm256_add_ps(c, c), splat_ps(65536.0f));
  const ints up = _mm256_castps_si256(_mm256_cmp_ps(_mm256_mul_ps(draw, odd),
                                                    _mm256_mul_ps(_mm256_sub_ps(s, c), _mm256_add_ps(s, c)),
                                                    _CMP_LT_OQ));
  const ints code = _mm256_sub_epi32(_mm256_srli_epi32(fixed, 16), up);  // up is -1 where set
  const ints negative = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
  return _mm256_sub_epi32(_mm256_xor_si256(code, negative), negative);
}

// quantize_unsigned of roots[0..7], as 32-bit integers: at least 1 where root > 0
inline ints unsigned_codes(const float* roots, float inverse, ints bits16) {
  const __m256 root = _mm256_load_ps(roots);
  const ints code = _mm256_srli_epi32(_mm256_add_epi32(fixed_codes<255>(root, splat_ps(inverse)), bits16), 16);
  const ints positive = _mm256_castps_si256(_mm256_cmp_ps(root, _mm256_setzero_ps(), _CMP_GT_OQ));
  return _mm256_max_epi32(code, _mm256_and_si256(positive, splat(1u)));
}

// 8 codes, the low byte of each 32-bit integer, stored in consecutive bytes
inline void store_codes(void* codes, ints code) {
  const ints code_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,  //
                                           0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const ints packed = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(code, code_bytes),
                                                  _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1));
  _mm_storel_epi64(static_cast<__m128i*>(codes), _mm256_castsi256_si128(packed));
}

#endif

// fn(j, bits) for each kLanes elements j.. of the whole block at chunk offset `offset`, with their moment_bits
// (chunks.h's chunk_moment_bits), hashed for the whole block first in a loop gcc vectorises
template <typename Fn>
inline void for_block_draws(uint32_t stream, int64_t begin, int32_t offset, Fn fn) {
  alignas(64) uint32_t bits[kInt8Block];
#pragma omp simd
  for (int32_t j = 0; j < kInt8Block; ++j) bits[j] = chunk_moment_bits(stream, begin, offset + j);
  for (int32_t j = 0; j < kInt8Block; j += kLanes) fn(j, load(bits + j));
}

}  // namespace int8_codes_simd
}  // namespace fused_optim

#endif
