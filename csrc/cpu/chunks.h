// Multi-tensor CPU loops: every tensor of a list cut into fixed-size chunks, so OpenMP threads share out a few large
// tensors and many small ones alike.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops/torch_api.h"

#include "fused_optim/rounding.h"

namespace fused_optim {

// 16K elements: small enough to balance 2..64 threads over a few large tensors, large enough that the per-chunk
// setup is noise.
constexpr int64_t kCpuChunk = 16384;

// A chunk never crosses a multiple of 2^32 elements, so its elements' indices share their high half.
static_assert((int64_t{1} << 32) % kCpuChunk == 0, "chunks must not cross a multiple of 2^32 elements");

// The random bits of a bf16 moment's element begin + j of a chunk (rounding.h's moment_bits): the index's high half
// is the chunk's and its low half a 32-bit count, which a vectorised loop hashes in 32-bit lanes (a 64-bit index
// would take 64-bit ones).
inline uint32_t chunk_moment_bits(uint32_t draw, int64_t begin, int32_t j) {
  return moment_bits(draw, static_cast<uint32_t>(begin) + static_cast<uint32_t>(j),
                     static_cast<uint32_t>(begin >> 32));
}

// Elements [begin, end) of tensor `tensor` of the list.
struct Chunk {
  int32_t tensor;
  int64_t begin;
  int64_t end;
};

// The chunks of tensors of sizes numels[0], numels[1], ...: in list order, so chunk c's position is fixed by the
// sizes alone (the norm kernels sum per-chunk partials in that order, whatever the thread count).
inline std::vector<Chunk> split_into_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < numels.size(); ++i) {
    for (int64_t begin = 0; begin < numels[i]; begin += kCpuChunk) {
      chunks.push_back({static_cast<int32_t>(i), begin, std::min(begin + kCpuChunk, numels[i])});
    }
  }
  return chunks;
}

// Below this many elements in all, a call runs on the calling thread: starting the OpenMP team costs more than
// the work (4 tensors of 10 elements took 14 ms with two threads on a loaded 2-core machine, 0.24 ms on one).
constexpr int64_t kSerialElements = 2 * kCpuChunk;

// Calls fn(chunk, its index) for every chunk, chunks shared out among the threads.
template <typename Fn>
void parallel_for_chunks(const std::vector<Chunk>& chunks, const Fn& fn) {
  int64_t total = 0;
  for (const Chunk& chunk : chunks) total += chunk.end - chunk.begin;
  const auto run = [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) fn(chunks[c], c);
  };
  if (total <= kSerialElements) {
    run(0, static_cast<int64_t>(chunks.size()));
  } else {
    torch::stable::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, run);
  }
}

}  // namespace fused_optim
