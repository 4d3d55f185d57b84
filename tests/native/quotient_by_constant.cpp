// adam.h's quotient_by_constant as the AVX-512 CPU kernels build it (-march=x86-64-v4: Markstein's sequence) against
// the division, bit for bit: every float x in [1, 2) (the quotient's rounding depends on x's mantissa and the
// divisor's, not on their exponents) and some edge values (0, the smallest and largest roots of an fp32, inf, NaN),
// by each divisor on stdin.
//
// stdin: divisors; stdout: the count of quotients checked and of mismatches; exit status 1 if any.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "fused_optim/adam.h"

int main() {
  std::vector<float> xs;
  for (uint32_t bits = 0x3F800000u; bits < 0x40000000u; ++bits) {
    float x;
    std::memcpy(&x, &bits, sizeof(x));
    xs.push_back(x);
  }
  for (const float x : {0.0f, std::sqrt(std::numeric_limits<float>::denorm_min()),
                        std::sqrt(std::numeric_limits<float>::max()), std::numeric_limits<float>::infinity(),
                        std::numeric_limits<float>::quiet_NaN()}) {
    xs.push_back(x);
  }
  std::vector<float> ours(xs.size()), divided(xs.size());
  std::vector<uint32_t> our_bits(xs.size()), divided_bits(xs.size());
  uint64_t checked = 0, mismatches = 0;
  float divisor = 0.0f;
  while (std::scanf("%f", &divisor) == 1) {
    const float inverse = 1.0f / divisor;
    const size_t n = xs.size();
#pragma omp simd
    for (size_t i = 0; i < n; ++i) ours[i] = fused_optim::quotient_by_constant(xs[i], divisor, inverse);
#pragma omp simd
    for (size_t i = 0; i < n; ++i) divided[i] = xs[i] / divisor;
    std::memcpy(our_bits.data(), ours.data(), n * sizeof(float));
    std::memcpy(divided_bits.data(), divided.data(), n * sizeof(float));
    uint64_t differing = 0;
#pragma omp simd reduction(+ : differing)
    for (size_t i = 0; i < n; ++i) differing += our_bits[i] != divided_bits[i];
    for (size_t i = 0; differing > 0 && i < n; ++i) {
      if (our_bits[i] != divided_bits[i] && mismatches < 10) {
        std::printf("%a / %a: %a, divided %a\n", xs[i], divisor, ours[i], divided[i]);
      }
    }
    mismatches += differing;
    checked += n;
  }
  std::printf("%llu %llu\n", static_cast<unsigned long long>(checked), static_cast<unsigned long long>(mismatches));
  return mismatches == 0 ? 0 : 1;
}
