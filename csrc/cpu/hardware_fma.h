// Fused multiply-adds where the CPU has no FMA instruction: the x86-64 baseline build (aarch64 and x86-64-v3 and up
// have one; gcc then defines __FP_FAST_FMAF). There fmaf is a libm call, one an element, and gcc leaves any loop
// that calls it scalar: the baseline's cross-entropy took 10x the AVX2 kernel's time, and its AdamW step over bf16
// params 3.4x, for an L2 term that AdamW never takes. So the optimizer loops without FMA instructions come in two
// forms (their template flag kMayDecay): with the weight-decay FMA, whose one rounding is torch's, for a group that
// decays, and without it, vectorised, for one that does not. With FMA instructions one loop does both: a select of
// a group constant costs it nothing.
#pragma once

#include <cmath>

namespace fused_optim {

#ifdef __FP_FAST_FMAF
inline constexpr bool kHardwareFma = true;
#else
inline constexpr bool kHardwareFma = false;
#endif

// p * r + c for an approximation's Horner step: fused where that is one instruction, and rounded twice elsewhere
// (a polynomial's error, not a contract on its bits).
inline float horner_step(float p, float r, float c) {
  if constexpr (kHardwareFma) {
    return std::fma(p, r, c);
  } else {
    return p * r + c;
  }
}

}  // namespace fused_optim
