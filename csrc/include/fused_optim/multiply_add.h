// a * b + c rounded once (IEEE fma): the one rounding of torch's add(other, alpha=) wherever its kernels are
// vectorised (AVX2, AVX-512, CUDA), which the optimizers' updates follow (sgd.h, adam.h).
//
// A GPU and a CPU of x86-64-v3 and up (or aarch64) have the instruction. The x86-64 baseline build has none: there
// fmaf is a libm call an element, which keeps gcc's loop scalar (the baseline AdamW step over bf16 params took 3.4x
// as long for an L2 term it never took). So there the fma is computed in double: the product of two floats is exact
// in double, and the sum is rounded to odd (Boldo and Melquiond, 2008): to the neighbour whose last bit is 1 when
// inexact, which rounding to nearest at 24 bits, 29 bits coarser, leaves correctly rounded. Two's sum (Knuth) gives
// the sum's rounding error exactly; integer steps on the bits then round to odd. No branch and no compare of
// integers, which SSE2 lacks: gcc vectorises it (tests/test_cpu_isa.py checks the loops; checked against libm's fmaf
// on 250 million random and cancelling triples, and on every triple of zeros, infinities, NaNs and extremes).
#pragma once

#include <cmath>
#include <cstdint>

#include "fused_optim/macros.h"

#if !defined(__CUDA_ARCH__) && !defined(__FP_FAST_FMAF)
#define FO_EMULATED_FMA 1
#include <bit>
#endif

namespace fused_optim {

FO_HOST_DEVICE float multiply_add(float a, float b, float c) {
#ifndef FO_EMULATED_FMA
  return fmaf(a, b, c);
#else
  const double product = static_cast<double>(a) * static_cast<double>(b);  // exact: 48 bits of 53
  const double addend = c;
  const double sum = product + addend;
  const double addend_part = sum - product;  // two's sum: the error of `sum`, exact whatever the operands' order
  double error = (product - (sum - addend_part)) + (addend - addend_part);
  error = sum - sum == 0.0 ? error : 0.0;  // an infinite or NaN sum (only from such operands) is the answer as it is
  const uint64_t sum_bits = std::bit_cast<uint64_t>(sum);
  const uint64_t error_bits = std::bit_cast<uint64_t>(error);
  constexpr uint64_t kMagnitude = ~uint64_t{0} >> 1;
  const uint64_t inexact = ((error_bits & kMagnitude) + kMagnitude) >> 63;  // 1 unless the error is +-0
  // the exact sum lies nearer zero than `sum` (the error's sign is the other): the neighbour below in magnitude
  const uint64_t beyond = ((error_bits ^ sum_bits) >> 63) & inexact;
  return static_cast<float>(std::bit_cast<double>((sum_bits - beyond) | inexact));
#endif
}

// condition ? a : b, for a select of a multiply_add's result. gcc 12 leaves a loop scalar where a select of floats
// takes the emulation's (it computes in 2-lane doubles, the select's mask has 4 lanes), but vectorises the same
// select made on the bits.
FO_HOST_DEVICE float choose(bool condition, float a, float b) {
#ifndef FO_EMULATED_FMA
  return condition ? a : b;
#else
  const uint32_t mask = 0u - static_cast<uint32_t>(condition);
  return std::bit_cast<float>((std::bit_cast<uint32_t>(a) & mask) | (std::bit_cast<uint32_t>(b) & ~mask));
#endif
}

}  // namespace fused_optim
