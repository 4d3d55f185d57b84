// The per-element math of fused_optim::total_norm, shared by the CPU and CUDA kernels: what each element adds to
// the running partial, how two partials combine, and how the final partial becomes the norm.
//
// Norms: p = 2 (sum of squares, the common case), p = 1 (sum of |x|), p = inf (max |x|), any other p > 0 (sum of
// |x|^p). Every kernel sums its per-block partials in a fixed order, so the result does not depend on the thread
// count or on scheduling.
// A NaN anywhere gives NaN, an inf gives inf (or NaN): callers read that as "non-finite gradient".
#pragma once

#include <cmath>

#include "fused_optim/macros.h"

namespace fused_optim {

enum class NormKind : int { kTwo = 0, kOne = 1, kInf = 2, kGeneral = 3 };

inline NormKind norm_kind(double norm_type) {
  if (norm_type == 2.0) return NormKind::kTwo;
  if (norm_type == 1.0) return NormKind::kOne;
  if (std::isinf(norm_type)) return NormKind::kInf;
  return NormKind::kGeneral;
}

// The element's share, in the partial's type T (float or double): x², |x|, |x| (to be max-combined) or |x|^p.
// |x|^p in double: in fp32 it underflows to 0 for |x| < 1e-11 at p = 3.5, and the norm of such tensors came out 0.
template <NormKind kKind, typename T>
FO_HOST_DEVICE T norm_term(float x, double p) {
  if constexpr (kKind == NormKind::kTwo) return static_cast<T>(x) * static_cast<T>(x);
  if constexpr (kKind == NormKind::kOne || kKind == NormKind::kInf) return static_cast<T>(fabsf(x));
  if constexpr (kKind == NormKind::kGeneral) return static_cast<T>(pow(static_cast<double>(fabsf(x)), p));
}

// Two partials into one: a sum, or for inf a max that keeps NaN (a plain max would drop it).
template <NormKind kKind, typename T>
FO_HOST_DEVICE T norm_combine(T a, T b) {
  if constexpr (kKind == NormKind::kInf) {
    return (b > a || b != b) ? b : a;
  } else {
    return a + b;
  }
}

// The combined partial of every element, as the norm.
template <NormKind kKind>
FO_HOST_DEVICE double norm_finish(double partial, double p) {
  if constexpr (kKind == NormKind::kTwo) return sqrt(partial);
  if constexpr (kKind == NormKind::kGeneral) return pow(partial, 1.0 / p);
  return partial;
}

}  // namespace fused_optim
