// CPU gradient accumulation: main_grads[i] += grads[i] (fp32 += fp32/bf16/fp16) over a whole list, chunked over
// threads (chunks.h); the inner loop widens and adds in place, and the compiler vectorises it (fp16 is widened in a
// loop of its own: float_io.h, kConvertsApart).
#include <algorithm>
#include <vector>

#include "ops/torch_api.h"

#include "chunks.h"
#include "float_io.h"
#include "ops/accumulate.h"
#include "ops/dispatch.h"

namespace fused_optim {
namespace {

template <typename grad_t>
void accumulate_chunk(float* __restrict__ main_grad, const void* grad_data, int64_t begin, int64_t end) {
  const auto* __restrict__ grad = static_cast<const grad_t*>(grad_data);
  if constexpr (kConvertsApart<grad_t>) {  // fp16: widened a block at a time, in L1
    constexpr int64_t kBlock = 1024;
    alignas(64) float widened[kBlock];
    for (int64_t start = begin; start < end; start += kBlock) {
      const int64_t count = std::min(kBlock, end - start);
      widen_halves(grad + start, widened, count);
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) main_grad[start + j] += widened[j];
    }
  } else {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) main_grad[i] += load_float(grad, i);
  }
}

using ChunkFn = void (*)(float*, const void*, int64_t, int64_t);

ChunkFn pick_chunk_fn(ScalarType grad_dtype) {
  return dispatch_float_types(grad_dtype, [](auto grad) -> ChunkFn { return accumulate_chunk<decltype(grad)>; });
}

}  // namespace

void accumulate_grads_cpu(TensorList main_grads, TensorList grads) {
  const std::vector<Tensor> matched = check_accumulate_args(main_grads, grads);
  std::vector<int64_t> numels;
  for (const Tensor& m : main_grads) numels.push_back(m.numel());
  parallel_for_chunks(split_into_chunks(numels), [&](const Chunk& chunk, int64_t) {
    const Tensor& grad = matched[chunk.tensor];
    pick_chunk_fn(grad.scalar_type())(data_as<float>(main_grads[chunk.tensor]), grad.const_data_ptr(), chunk.begin,
                                      chunk.end);
  });
}

}  // namespace fused_optim
