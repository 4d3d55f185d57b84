// a * b + c as torch's add(other, alpha=) computes it on the same machine, which the optimizers' updates follow
// (sgd.h, adam.h): one rounding (an FMA) where the machine has the instruction, as torch's vectorised kernels (AVX2,
// AVX-512, CUDA) round; the product and the sum rounded each on an x86-64 CPU without one, as torch's kernels for
// such a CPU (ATEN_CPU_CAPABILITY=default) round.
//
// Our x86-64 baseline build runs exactly there (fused_optim/_backend.py loads it on CPUs without AVX2, where torch's
// capability is "default" too). There fmaf would be a libm call an element, in software, that keeps gcc's loop
// scalar (the baseline AdamW step over bf16 params took 3.4x as long for an L2 term it never took). An exact
// emulation in double (rounded to odd) vectorises, but costs some 25 SSE2 operations an element: SGD's in-cache
// step took 7.4 ns a param instead of 0.7, and it would not give torch's bits on that CPU anyway.
#pragma once

#include <cmath>

#include "fused_optim/macros.h"

namespace fused_optim {

FO_HOST_DEVICE float multiply_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__) || defined(__FP_FAST_FMAF)
  return fmaf(a, b, c);
#else
  return a * b + c;  // -ffp-contract=off (setup.py): two roundings, in this order
#endif
}

}  // namespace fused_optim
