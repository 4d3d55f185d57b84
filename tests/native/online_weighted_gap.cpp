// The CUDA cross-entropy kernel's pass 1 (csrc/cuda/cross_entropy.cu, reduce_row and block_reduce), replayed on the
// host with cross_entropy.h's own OnlineLogSumExp and OnlineWeightedGap: `threads` threads of 32-lane warps, each
// streaming vectors of 8 logits `threads` vectors apart and then the scalar tail, merged lane by lane in a
// butterfly and then warp by warp. Prints the row's max, sum of exp and weighted gap, and the direct fp64 values.
//
// stdin: threads, n, then n logits and n weights; stdout: max sum gap, then the fp64 max sum gap.
#include <cmath>
#include <cstdio>
#include <vector>

#include "fused_optim/cross_entropy.h"

using fused_optim::OnlineLogSumExp;
using fused_optim::OnlineWeightedGap;

int main() {
  int threads = 0;
  long n = 0;
  if (std::scanf("%d %ld", &threads, &n) != 2) return 1;
  std::vector<float> z(n), w(n);
  for (auto& v : z) std::scanf("%f", &v);
  for (auto& v : w) std::scanf("%f", &v);
  constexpr int kVec = 8;
  const long vector_end = n / kVec * kVec;
  std::vector<OnlineLogSumExp> acc(threads);
  std::vector<OnlineWeightedGap> gap(threads);
  for (int t = 0; t < threads; ++t) {
    for (long j = t * kVec; j < vector_end; j += static_cast<long>(threads) * kVec) {
      float vector_z[kVec], vector_w[kVec];
      for (int k = 0; k < kVec; ++k) vector_z[k] = z[j + k], vector_w[k] = w[j + k];
      fused_optim::add_logits(vector_z, vector_w, acc[t], gap[t]);
    }
    for (long j = vector_end + t; j < n; j += threads) {
      const float max = acc[t].max;
      acc[t].add(z[j]);
      gap[t].rise(max, acc[t].max);
      gap[t].add(z[j], w[j], acc[t].max);
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) {  // the butterfly of each warp: every lane ends with the warp's
    std::vector<OnlineLogSumExp> acc_next(acc);
    std::vector<OnlineWeightedGap> gap_next(gap);
    for (int t = 0; t < threads; ++t) {
      const int other = (t / 32) * 32 + ((t % 32) ^ offset);
      const float max = acc[t].max;
      acc_next[t].merge(acc[other]);
      gap_next[t].merge(gap[other], max, acc[other].max, acc_next[t].max);
    }
    acc.swap(acc_next);
    gap.swap(gap_next);
  }
  OnlineLogSumExp row;
  OnlineWeightedGap row_gap;
  for (int warp = 0; warp < threads / 32; ++warp) {
    const float max = row.max;
    row.merge(acc[warp * 32]);
    row_gap.merge(gap[warp * 32], max, acc[warp * 32].max, row.max);
  }
  double max = -INFINITY, sum = 0.0, direct_gap = 0.0;
  for (long j = 0; j < n; ++j) max = std::fmax(max, static_cast<double>(z[j]));
  for (long j = 0; j < n; ++j) {
    sum += std::exp(static_cast<double>(z[j]) - max);
    direct_gap += static_cast<double>(w[j]) * (max - z[j]);
  }
  std::printf("%.17g %.17g %.17g\n%.17g %.17g %.17g\n", row.max, row.sum, row_gap.gap, max, sum, direct_gap);
  return 0;
}
