// Software prefetch for the CPU optimizer loops. A loop with much arithmetic per element (int8 or bf16 moments, a
// master remainder, bf16 params) spreads its loads over many cycles, and the hardware prefetchers, which follow the
// loads, fall behind: the int8 AdamW step moved 11.6 GB/s where one thread streams 23, and the AVX2 step with bf16
// moments took 2.2 ns a param where fp32 moments, with more bytes, took 1.2. Asking for each array's cache lines a
// few blocks ahead of the one being stepped closes most of that gap (docs/results.md).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "fused_optim/moment_int8.h"

namespace fused_optim {

// A block is kInt8Block elements (an int8 moment's scale block; the plain loops step in blocks of the same size).
// 4 blocks ahead was best for the int8 loops (8 timed the same, 16 and 32 gained less) and for the plain ones (2 or 8
// ahead, and blocks of 32, 128 or 256 elements, were slower).
constexpr int64_t kPrefetchAhead = 4 * kInt8Block;

// Asks for the cache lines of elements [index, index + kInt8Block) of each array. A prefetch never faults: an index
// past an array's end costs only the request. (Addresses as integers: past the end, pointer arithmetic would be
// undefined.)
template <typename... Element>
inline void prefetch_block(int64_t index, const Element*... arrays) {
  const auto lines = [index](auto* array) {
    constexpr int64_t kBytes = kInt8Block * static_cast<int64_t>(sizeof(*array));
    const uintptr_t first = reinterpret_cast<uintptr_t>(array) + static_cast<uintptr_t>(index * (kBytes / kInt8Block));
    for (int64_t byte = 0; byte < kBytes; byte += 64) {
#if defined(__x86_64__)
      // as an asm statement: gcc dropped some __builtin_prefetch calls outright (Lion's with a master array)
      asm volatile("prefetcht0 %0" : : "m"(*reinterpret_cast<const char*>(first + byte)));
#else
      __builtin_prefetch(reinterpret_cast<const void*>(first + byte));
#endif
    }
  };
  (lines(arrays), ...);
}

// step(j) for j in [0, end - begin), elements begin + j of a chunk, whose params `step` reads and writes through
// `params` (float_io.h's ParamIO). With kPrefetch, in a vectorised loop a block, and before each whole block
// prefetch(index) asks for the block kPrefetchAhead elements on (prefetch_block of the arrays step touches); whole
// blocks have a constant trip count (a run-time one, a remainder loop a block, cost the loops bound by their
// arithmetic 5-10 %). Without, in one vectorised loop: a loop with arithmetic enough to hide its loads then saves
// the blocks' setup (gcc sets up its constants and index vectors again for each block). `step` is inlined into the
// loops, so it must be branch-free.
template <bool kPrefetch, typename Params, typename StepFn, typename PrefetchFn>
inline void for_each_element(int64_t begin, int64_t end, Params& params, StepFn step, PrefetchFn prefetch) {
  static_assert(kPrefetch || !Params::kStaged, "staged params and grads are stepped a block at a time");
  // `count`: kInt8Block as a compile-time constant for whole blocks, the rest's count otherwise
  const auto steps = [&](int32_t first, auto count) {
    params.stage_in(begin + first, count);
#pragma omp simd
    for (int32_t j = first; j < first + count; ++j) step(j);
    params.stage_out(begin + first, count);
  };
  const int32_t length = static_cast<int32_t>(end - begin);  // at most a chunk
  int32_t first = 0;
  if constexpr (kPrefetch) {
    for (; first + kInt8Block <= length; first += kInt8Block) {
      prefetch(begin + first + kPrefetchAhead);
      steps(first, std::integral_constant<int32_t, kInt8Block>{});
    }
  }
  steps(first, length - first);
}

}  // namespace fused_optim
