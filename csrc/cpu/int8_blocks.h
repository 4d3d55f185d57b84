// moments="int8" (fused_optim/moment_int8.h) on the CPU for an optimizer with one signed moment: SGD's momentum
// buffer, Lion's exp_avg. A chunk is stepped one block of kInt8Block elements after another, as adam.cpp's
// adam_int8_chunk steps Adam's moments: the update with the dequantized moment, its new values kept in L1; their
// largest magnitude; then the block's scale and codes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "chunks.h"
#include "int8_codes_simd.h"
#include "prefetch.h"
#include "fused_optim/moment_int8.h"

namespace fused_optim {

// Elements [begin, end) of a tensor (begin at a block: a chunk's start). `update(i, m)` steps element i given its
// dequantized moment m and leaves the moment's new value in m, reading and writing the params through `params`
// (float_io.h's ParamIO); it is inlined into a vectorised loop, so it must be branch-free. The codes round with the
// low 16 of `draw`'s moment bits (rounding.h), as a bf16 moment would. `prefetch(i)` asks for the block at i of the
// arrays `update` reads and writes (prefetch_block).
template <typename Params, typename UpdateFn, typename PrefetchFn>
void step_signed_int8_blocks(int8_t* __restrict__ codes, uint16_t* __restrict__ scales, uint32_t draw, int64_t begin,
                             int64_t end, Params& params, UpdateFn update, PrefetchFn prefetch) {
  static_assert(kCpuChunk % kInt8Block == 0, "a chunk must start at a block");
  alignas(64) float updated[kInt8Block];
  // `length`: kInt8Block as a compile-time constant for whole blocks (no loop remainder), the count itself for a
  // tensor's last block
  const auto step_block = [&](int64_t start, auto length) {
    const int64_t block = start / kInt8Block;
    prefetch(start + kPrefetchAhead);
    prefetch_block(start + kPrefetchAhead, codes);
    const float step = signed_step(bf16_bits_to_float(scales[block]));
    // the old moments dequantized into L1 in a loop of their own: with the codes' byte loads in it, gcc vectorised the
    // update loop over 32 (AVX2) or 64 (AVX-512) elements a step and ran short of registers (3-5 % faster apart)
#pragma omp simd
    for (int32_t j = 0; j < length; ++j) updated[j] = dequantize_signed(codes[start + j], step);
    params.stage_in(start, length);
#pragma omp simd
    for (int32_t j = 0; j < length; ++j) update(start + j, updated[j]);
    params.stage_out(start, length);
    uint32_t largest = 0;
#pragma omp simd reduction(max : largest)
    for (int32_t j = 0; j < length; ++j) largest = std::max(largest, magnitude_bits(updated[j]));
    scales[block] = int8_scale_bits(largest);
    const float inverse = inverse_scale(scales[block]);
    const int32_t offset = static_cast<int32_t>(start - begin);
#if FUSED_OPTIM_INT8_CODES_SIMD
    if constexpr (!std::is_same_v<decltype(length), int32_t>) {  // a whole block
      using namespace int8_codes_simd;
      for_block_draws(draw, begin, offset, [&](int32_t j, ints bits) {
        store_codes(codes + start + j, signed_codes(updated + j, inverse, low16(bits)));
      });
      return;
    }
#endif
#pragma omp simd
    for (int32_t j = 0; j < length; ++j) {
      codes[start + j] = quantize_signed(updated[j], inverse, chunk_moment_bits(draw, begin, offset + j) & 0xFFFFu);
    }
  };
  int64_t start = begin;
  for (; start + kInt8Block <= end; start += kInt8Block) {
    step_block(start, std::integral_constant<int32_t, kInt8Block>{});
  }
  if (start < end) step_block(start, static_cast<int32_t>(end - start));
}

}  // namespace fused_optim
