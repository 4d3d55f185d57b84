// STREAM's triad, a = b + scalar * c, over OpenMP threads: the streaming roof this machine's memory reaches,
// measured by the benchmarks beside each op. torch's copy_ is no roof on the CPU (DESIGN.md, Benchmarks).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fused_optim {

void triad_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, double scalar) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && c.scalar_type() == at::kFloat,
              "triad_: float32 tensors only");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && c.is_contiguous(), "triad_: contiguous tensors only");
  TORCH_CHECK(a.numel() == b.numel() && a.numel() == c.numel(), "triad_: tensors must have the same numel");
  float* __restrict__ out = a.data_ptr<float>();
  const float* __restrict__ x = b.data_ptr<float>();
  const float* __restrict__ y = c.data_ptr<float>();
  const float s = static_cast<float>(scalar);
  at::parallel_for(0, a.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) out[i] = x[i] + s * y[i];
  });
}

}  // namespace fused_optim
