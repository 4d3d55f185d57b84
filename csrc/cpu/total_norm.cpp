// CPU total norm: one partial per chunk (chunks.h; the compiler vectorises the chunk's reduction), the partials
// then combined in chunk order, so the result is the same for any thread count.
#include <type_traits>
#include <vector>

#include "ops/torch_api.h"

#include "chunks.h"
#include "float_io.h"
#include "ops/dispatch.h"
#include "ops/total_norm.h"

namespace fused_optim {
namespace {

// Sums run in fp64 (x² of an fp32 x is exact there; two cores' worth of fp64 adds still outrun memory), so the
// result is the fp32 rounding of a nearly exact norm; the max of |x| is exact in fp32.
template <NormKind kKind>
using Partial = std::conditional_t<kKind == NormKind::kInf, float, double>;

// A chunk's partial.
template <NormKind kKind, typename T>
double chunk_partial(const void* data_ptr, int64_t begin, int64_t end, double p) {
  const auto* __restrict__ data = static_cast<const T*>(data_ptr);
  if constexpr (kConvertsApart<T>) {
    // fp16: the whole chunk widened first (64 KB, in L2), then reduced by the fp32 loop, in its order of additions
    alignas(64) float widened[kCpuChunk];
    widen_halves(data + begin, widened, end - begin);
    return chunk_partial<kKind, float>(widened, 0, end - begin, p);
  }
  Partial<kKind> partial = 0;
  if constexpr (kKind == NormKind::kInf) {
    // 16 explicit lanes: gcc does not vectorise a max reduction that keeps NaN, but it does this elementwise select
    constexpr int64_t kLanes = 16;
    float lanes[kLanes] = {};
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) {
#pragma omp simd
      for (int64_t k = 0; k < kLanes; ++k) {
        lanes[k] = norm_combine<kKind>(lanes[k], norm_term<kKind, float>(load_float(data, i + k), p));
      }
    }
    for (; i < end; ++i) partial = norm_combine<kKind>(partial, norm_term<kKind, float>(load_float(data, i), p));
    for (int64_t k = 0; k < kLanes; ++k) partial = norm_combine<kKind>(partial, lanes[k]);
  } else {
#pragma omp simd reduction(+ : partial)
    for (int64_t i = begin; i < end; ++i) partial += norm_term<kKind, Partial<kKind>>(load_float(data, i), p);
  }
  return partial;
}

using PartialFn = double (*)(const void*, int64_t, int64_t, double);

template <NormKind kKind>
PartialFn pick_partial_fn(ScalarType dtype) {
  return dispatch_float_types(dtype, [](auto element) -> PartialFn { return chunk_partial<kKind, decltype(element)>; });
}

template <NormKind kKind>
double total_norm_of(TensorList tensors, double norm_type) {
  std::vector<int64_t> numels;
  for (const Tensor& t : tensors) numels.push_back(t.numel());
  const std::vector<Chunk> chunks = split_into_chunks(numels);
  std::vector<double> partials(chunks.size());
  parallel_for_chunks(chunks, [&](const Chunk& chunk, int64_t index) {
    const Tensor& t = tensors[chunk.tensor];
    const PartialFn partial_fn = pick_partial_fn<kKind>(t.scalar_type());
    partials[index] =
        partial_fn(t.const_data_ptr(), chunk.begin, chunk.end, norm_type);
  });
  double total = 0.0;
  for (const double partial : partials) total = norm_combine<kKind>(total, partial);
  return norm_finish<kKind>(total, norm_type);
}

}  // namespace

Tensor total_norm_cpu(TensorList tensors, double norm_type) {
  check_total_norm_args(tensors, norm_type);
  double norm = 0.0;
  switch (norm_kind(norm_type)) {
    case NormKind::kTwo: norm = total_norm_of<NormKind::kTwo>(tensors, norm_type); break;
    case NormKind::kOne: norm = total_norm_of<NormKind::kOne>(tensors, norm_type); break;
    case NormKind::kInf: norm = total_norm_of<NormKind::kInf>(tensors, norm_type); break;
    case NormKind::kGeneral: norm = total_norm_of<NormKind::kGeneral>(tensors, norm_type); break;
  }
  Tensor result = empty_float({}, tensors[0]);
  *result.mutable_data_ptr<float>() = static_cast<float>(norm);
  return result;
}

}  // namespace fused_optim
