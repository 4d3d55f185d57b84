// STREAM's triad, a = b + scalar * c, over OpenMP threads: the streaming roof this machine's memory reaches,
// measured by the benchmarks beside each op. torch's copy_ is no roof on the CPU (docs/design.md, Benchmarks).
//
// The stores bypass the cache (non-temporal): a plain store first reads the line it writes (write-allocate), so
// a triad counted as 12 bytes an element would move 16 and report a quarter less than the memory delivers
// (29 GB/s against 41 on the 2-core dev machine). On x86 every level streams (SSE's 16-byte stores in the
// baseline build); on other architectures the plain loop stores through the cache, and the roof reads low there.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FUSED_OPTIM_STREAMING_STORES 1
#endif

#include "ops/torch_api.h"

namespace fused_optim {
namespace {

void triad_range(float* __restrict__ out, const float* __restrict__ x, const float* __restrict__ y, float s,
                 int64_t begin, int64_t end) {
  int64_t i = begin;
#if FUSED_OPTIM_STREAMING_STORES
#if defined(__AVX512F__)
  constexpr int64_t kWidth = 16;
#elif defined(__AVX__)
  constexpr int64_t kWidth = 8;
#else  // SSE, which every x86-64 CPU has
  constexpr int64_t kWidth = 4;
#endif
  constexpr uintptr_t kAlign = kWidth * sizeof(float);  // a streaming store takes an aligned address
  for (; i < end && reinterpret_cast<uintptr_t>(out + i) % kAlign != 0; ++i) out[i] = x[i] + s * y[i];
  for (; i + kWidth <= end; i += kWidth) {
#if defined(__AVX512F__)
    _mm512_stream_ps(out + i, _mm512_add_ps(_mm512_loadu_ps(x + i), _mm512_mul_ps(_mm512_set1_ps(s), _mm512_loadu_ps(y + i))));
#elif defined(__AVX__)
    _mm256_stream_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_mul_ps(_mm256_set1_ps(s), _mm256_loadu_ps(y + i))));
#else
    _mm_stream_ps(out + i, _mm_add_ps(_mm_loadu_ps(x + i), _mm_mul_ps(_mm_set1_ps(s), _mm_loadu_ps(y + i))));
#endif
  }
#endif
  for (; i < end; ++i) out[i] = x[i] + s * y[i];
#if FUSED_OPTIM_STREAMING_STORES
  _mm_sfence();  // non-temporal stores are weakly ordered: drain them before the thread reports its range done
#endif
}

}  // namespace

void triad_cpu(const Tensor& a, const Tensor& b, const Tensor& c, double scalar) {
  FO_CHECK(a.scalar_type() == kFloat && b.scalar_type() == kFloat && c.scalar_type() == kFloat,
           "triad_: float32 tensors only");
  FO_CHECK(a.is_contiguous() && b.is_contiguous() && c.is_contiguous(), "triad_: contiguous tensors only");
  FO_CHECK(a.numel() == b.numel() && a.numel() == c.numel(), "triad_: tensors must have the same numel");
  float* out = a.mutable_data_ptr<float>();
  const float* x = b.const_data_ptr<float>();
  const float* y = c.const_data_ptr<float>();
  const float s = static_cast<float>(scalar);
  torch::stable::parallel_for(0, a.numel(), 1 << 16,
                              [&](int64_t begin, int64_t end) { triad_range(out, x, y, s, begin, end); });
}

}  // namespace fused_optim
