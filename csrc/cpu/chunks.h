// Multi-tensor CPU loops: every tensor of a list cut into fixed-size chunks, so OpenMP threads share out a few large
// tensors and many small ones alike.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ops/torch_api.h"

namespace fused_optim {

// 16K elements: small enough to balance 2..64 threads over a few large tensors, large enough that the per-chunk
// setup is noise.
constexpr int64_t kCpuChunk = 16384;

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
