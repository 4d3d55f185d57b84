// CPU cross-entropy forward (+ the gradient, written in the same call): OpenMP over rows, and per row three
// vectorised sweeps over a row that stays in the core's cache (capped logits and max; sum of exp; gradient), so
// memory sees the logits read once and the gradient written once. The row math is fused_optim/cross_entropy.h.
//
// glibc's expf and tanhf do not vectorise without -ffast-math, so the exp and tanh below are our own: a
// degree-7 polynomial after range reduction (exp) and, from it, tanh; both within a few ulp of the libm ones.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ops/torch_api.h"

#if defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512")
#endif
#include "float_io.h"
#include "ops/cross_entropy.h"
#include "fused_optim/multiply_add.h"
#include "huge_pages.h"

namespace fused_optim {
namespace {

// Calls fn(kSoftcap, kWeighted) with both flags as compile-time constants (std::bool_constant): soft-capping and class
// weights are template flags of the row kernels, so a row computes no tanh and loads no weight it does not need.
template <typename Fn>
void dispatch_row_flags(bool softcap, bool weighted, Fn&& fn) {
  if (softcap) {
    weighted ? fn(std::true_type{}, std::true_type{}) : fn(std::true_type{}, std::false_type{});
  } else {
    weighted ? fn(std::false_type{}, std::true_type{}) : fn(std::false_type{}, std::false_type{});
  }
}

// exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by its Taylor series to r^7 (relative
// error < 1e-8 on that interval). Below -87.3 the result would be subnormal: return 0, as a softmax wants.
inline float vector_exp(float x) {
  // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer in any vector unit (|x| < 2^22 here).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 in two parts: n * hi is exact
  // Horner, fused where the CPU has FMA (multiply_add.h: where it has none, fmaf would be a libm call that keeps the
  // loop scalar; a polynomial's error, not a contract on its bits)
  float p = 1.0f / 5040.0f;
  p = multiply_add(p, r, 1.0f / 720.0f);
  p = multiply_add(p, r, 1.0f / 120.0f);
  p = multiply_add(p, r, 1.0f / 24.0f);
  p = multiply_add(p, r, 1.0f / 6.0f);
  p = multiply_add(p, r, 0.5f);
  p = multiply_add(p, r, 1.0f);
  p = multiply_add(p, r, 1.0f);
  const int32_t exponent = (static_cast<int32_t>(std::min(n, 128.0f)) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
  const float result = n >= 128.0f ? INFINITY : p * scale;
  return x < -87.3f ? 0.0f : result;  // NaN fails every comparison and stays NaN
}

// tanh(y) = sign(y) (1 - e) / (1 + e), e = exp(-2|y|); near 0, where 1 - e cancels, its odd Taylor series.
inline float vector_tanh(float y) {
  const float a = std::fabs(y);
  const float e = vector_exp(-2.0f * a);
  const float far = std::copysign((1.0f - e) / (1.0f + e), y);
  const float y2 = y * y;
  const float near = y * (1.0f + y2 * (-1.0f / 3.0f + y2 * (2.0f / 15.0f + y2 * (-17.0f / 315.0f + y2 * (62.0f / 2835.0f)))));
  return a < 0.25f ? near : far;
}

// gcc leaves a float max-reduction scalar even under `omp simd reduction(max)` (it was 3/4 of the kernel's time in
// perf): 16 explicit lanes become one vector max per 16 logits. A NaN logit is dropped here but still makes the
// row's sum of exp, hence its loss, NaN.
inline float row_max(const float* __restrict__ z, int64_t n) {
  constexpr int64_t kLanes = 16;
  float lanes[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) lanes[k] = -INFINITY;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] = lanes[k] > z[j + k] ? lanes[k] : z[j + k];
  }
  float max = -INFINITY;
  for (; j < n; ++j) max = max > z[j] ? max : z[j];
  for (int64_t k = 0; k < kLanes; ++k) max = max > lanes[k] ? max : lanes[k];
  return max;
}

// e[j] = exp(z[j] - max) and the row's sums of e and of w_j (max - z_j) (cross_entropy.h: the weighted gap, whose
// terms are all >= 0). An `omp simd reduction` leaves the order of the
// additions to the compiler: where it does not vectorise the loop (AVX2 builds) one fp32 running sum drops every
// term below half an ulp of the max's own 1.0. So the order is ours and the same on every ISA: 16 explicit lanes
// over blocks of 1024 logits (64 terms a lane), each block's lanes folded into fp64 totals.
template <bool kWeighted>
void exp_and_sums(const float* __restrict__ z, float* __restrict__ e, const float* class_weight, int64_t n,
                  float max, float& sum_out, float& weighted_gap_out) {
  constexpr int64_t kLanes = 16, kBlock = 1024;
  double sum = 0.0, weighted_gap = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    float sums[kLanes] = {}, weighted_gaps[kLanes] = {};
    int64_t j = start;
    for (; j + kLanes <= end; j += kLanes) {
#pragma omp simd
      for (int64_t k = 0; k < kLanes; ++k) {
        e[j + k] = vector_exp(z[j + k] - max);
        sums[k] += e[j + k];
        weighted_gaps[k] += (kWeighted ? class_weight[j + k] : 1.0f) * (max - z[j + k]);
      }
    }
    for (int64_t k = 0; j < end; ++j, ++k) {  // the block's tail, into the first lanes
      e[j] = vector_exp(z[j] - max);
      sums[k] += e[j];
      weighted_gaps[k] += (kWeighted ? class_weight[j] : 1.0f) * (max - z[j]);
    }
    for (int64_t k = 0; k < kLanes; ++k) {
      sum += sums[k];
      weighted_gap += weighted_gaps[k];
    }
  }
  sum_out = static_cast<float>(sum);
  weighted_gap_out = static_cast<float>(weighted_gap);
}

// Pass 1 over a row (or a rank's shard of one): its capped logits into z and their max, exp(z - max) into e, and
// the sums of e and of w_j (max - z_j).
template <typename T, bool kSoftcap, bool kWeighted>
void reduce_row(const T* x, const float* class_weight, int64_t num_classes, float softcap, float* __restrict__ z,
                float* __restrict__ e, float& max, float& sum, float& weighted_gap) {
  if constexpr (kConvertsApart<T>) {  // fp16: widened in a loop of its own (float_io.h)
    widen_halves(x, z, num_classes);
    if constexpr (kSoftcap) {
#pragma omp simd
      for (int64_t j = 0; j < num_classes; ++j) z[j] = softcap * vector_tanh(z[j] / softcap);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < num_classes; ++j) {
      const float xj = load_float(x, j);
      z[j] = kSoftcap ? softcap * vector_tanh(xj / softcap) : xj;
    }
  }
  max = row_max(z, num_classes);
  exp_and_sums<kWeighted>(z, e, class_weight, num_classes, max, sum, weighted_gap);
  if (max == -INFINITY) {
    // masked (-inf) logits and NaNs alone (a shard of a padded vocabulary): exp(-inf - -inf) made every term NaN;
    // as cross_entropy.h's online sums, the masked ones add 0 and a NaN makes the sum NaN (the combine keeps it)
    sum = 0.0f;
    weighted_gap = 0.0f;
    for (int64_t j = 0; j < num_classes; ++j) sum += z[j] != z[j] ? z[j] : 0.0f;
  }
}

// One kept row: capped logits into z (and their max), exp(z - max) into e (and their sums), then the gradient.
// Soft-capping and class weights are template flags: a runtime select would compute tanh and load weights in every
// vector lane of every row.
template <typename T, bool kSoftcap, bool kWeighted>
void cross_entropy_row(const T* x, T* g, int64_t t, const float* class_weight, float* __restrict__ z,
                       float* __restrict__ e, float& loss, float& lse_out, const CrossEntropyOptions& options) {
  const int64_t num_classes = options.num_classes;
  float max, sum, weighted_gap;
  reduce_row<T, kSoftcap, kWeighted>(x, class_weight, num_classes, options.softcap, z, e, max, sum, weighted_gap);
  const float log_sum = std::log(sum), lse = max + log_sum;
  const float target_weight = kWeighted ? class_weight[t] : 1.0f;
  lse_out = lse;
  loss = cross_entropy_row_loss(max, log_sum, z[t], target_weight, weighted_gap, options);
  if (g == nullptr) return;
  const CrossEntropyRowGrad row_grad = cross_entropy_row_grad(lse, target_weight, options);
  const float inv_sum = 1.0f / sum;  // p_j = exp(z_j - max) / sum
  const auto grad_of = [=](int64_t j) {  // by value: an fp32 store through g could alias a reference
    return row_grad.grad<kSoftcap>(e[j] * inv_sum, z[j], kWeighted ? class_weight[j] : 1.0f, j == t);
  };
  if constexpr (kConvertsApart<T>) {  // fp16: the gradient over e in fp32, then narrowed in a loop of its own
#pragma omp simd
    for (int64_t j = 0; j < num_classes; ++j) e[j] = grad_of(j);
    narrow_floats(e, g, num_classes);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < num_classes; ++j) store_float(g, j, grad_of(j));
  }
}

template <typename T, bool kSoftcap, bool kWeighted>
void cross_entropy_rows(const Tensor& logits, const int64_t* target, const float* class_weight, T* grad,
                        float* loss, float* lse, int64_t ignore_index, const CrossEntropyOptions& options) {
  const int64_t num_rows = logits.size(0), num_classes = logits.size(1);
  const int64_t row_stride = logits.stride(0);
  const T* x_base = logits.const_data_ptr<T>();
  // A few rows a task: enough to balance two or sixty-four threads, rows long enough that the split is noise.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(num_classes, 1));
  torch::stable::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * num_classes);  // z and e of one row: they stay in this core's cache
    for (int64_t row = begin; row < end; ++row) {
      const T* x = x_base + row * row_stride;  // not restrict: g may be the same memory (in-place)
      T* g = grad == nullptr ? nullptr : grad + row * row_stride;
      const int64_t t = target[row];
      if (t == ignore_index) {  // no loss, no gradient, never a NaN
        loss[row] = 0.0f;
        lse[row] = 0.0f;
        if (g != nullptr) std::fill(g, g + num_classes, T(0.0f));
        continue;
      }
      cross_entropy_row<T, kSoftcap, kWeighted>(x, g, t, class_weight, scratch.data(), scratch.data() + num_classes,
                                                loss[row], lse[row], options);
    }
  });
}

// Pass 1 of a vocabulary-parallel row (cross_entropy.h, ShardRowStats): capped logits and their max, then the sums.
template <typename T, bool kSoftcap, bool kWeighted>
void shard_stats_rows(const Tensor& logits, const int64_t* target, const float* class_weight,
                      ShardRowStats* stats, int64_t class_start, int64_t ignore_index, float softcap) {
  const int64_t num_rows = logits.size(0), shard_classes = logits.size(1), row_stride = logits.stride(0);
  const T* x_base = logits.const_data_ptr<T>();
  torch::stable::parallel_for(0, num_rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(shard_classes, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(2 * shard_classes);
    float* z = scratch.data();
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = target[row];
      if (t == ignore_index) {  // combined into nothing: the row's loss and gradient are 0
        stats[row] = ShardRowStats{0.0f, 0.0f, 0.0f, 0.0f};
        continue;
      }
      float max, sum, weighted_gap;
      reduce_row<T, kSoftcap, kWeighted>(x_base + row * row_stride, class_weight, shard_classes, softcap, z,
                                         z + shard_classes, max, sum, weighted_gap);
      const int64_t local_t = t - class_start;
      const float target_logit = local_t >= 0 && local_t < shard_classes ? z[local_t] : 0.0f;
      stats[row] = ShardRowStats{max, sum, target_logit, weighted_gap};
    }
  });
}

// Pass 2: the shard's gradient from the row's combined coefficients (ShardRowCoefs), written in one sweep.
template <typename T, bool kSoftcap, bool kWeighted>
void shard_grad_rows(T* grad, const Tensor& logits, const int64_t* target, const float* class_weight,
                     const ShardRowCoefs* coefs, int64_t class_start, int64_t ignore_index, float softcap) {
  const int64_t num_rows = logits.size(0), shard_classes = logits.size(1), row_stride = logits.stride(0);
  const T* x_base = logits.const_data_ptr<T>();
  torch::stable::parallel_for(0, num_rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(shard_classes, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(kConvertsApart<T> ? shard_classes : 0);  // fp16: the row widened, then its gradient
    for (int64_t row = begin; row < end; ++row) {
      const T* x = x_base + row * row_stride;  // not restrict: the gradient may go over the logits
      T* g = grad + row * row_stride;
      const int64_t t = target[row];
      if (t == ignore_index) {
        std::fill(g, g + shard_classes, T(0.0f));
        continue;
      }
      const ShardRowCoefs c = coefs[row];
      const CrossEntropyRowGrad row_grad = c.row_grad(softcap);
      const int64_t local_t = t - class_start;
      // a local copy: read through the lambda's reference, an fp32 gradient store might change it, and gcc reloaded
      // it in every iteration and left the soft-capped fp32 loop scalar
      const float cap = softcap;
      const auto grad_of = [=](int64_t j, float xj) {
        const float zj = kSoftcap ? cap * vector_tanh(xj / cap) : xj;
        return row_grad.grad<kSoftcap>(vector_exp(zj - c.max) * c.inv_sum, zj, kWeighted ? class_weight[j] : 1.0f,
                                       j == local_t);
      };
      if constexpr (kConvertsApart<T>) {
        float* __restrict__ row_floats = scratch.data();
        widen_halves(x, row_floats, shard_classes);
#pragma omp simd
        for (int64_t j = 0; j < shard_classes; ++j) row_floats[j] = grad_of(j, row_floats[j]);
        narrow_floats(row_floats, g, shard_classes);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < shard_classes; ++j) store_float(g, j, grad_of(j, load_float(x, j)));
      }
    }
  });
}

template <typename T>
void scale_rows(const Tensor& grad, const Tensor& row_scale) {
  const int64_t num_classes = grad.size(1), row_stride = grad.stride(0);
  const float* scale = row_scale.const_data_ptr<float>();
  const bool per_row = row_scale.numel() != 1;
  T* base = grad.mutable_data_ptr<T>();
  torch::stable::parallel_for(0, grad.size(0), std::max<int64_t>(1, 32768 / std::max<int64_t>(num_classes, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(kConvertsApart<T> ? num_classes : 0);  // fp16: the row widened, scaled, narrowed
    for (int64_t row = begin; row < end; ++row) {
      const float s = scale[per_row ? row : 0];
      if (s == 1.0f) continue;
      T* __restrict__ g = base + row * row_stride;
      if constexpr (kConvertsApart<T>) {
        float* __restrict__ row_floats = scratch.data();
        widen_halves(g, row_floats, num_classes);
#pragma omp simd
        for (int64_t j = 0; j < num_classes; ++j) row_floats[j] *= s;
        narrow_floats(row_floats, g, num_classes);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < num_classes; ++j) store_float(g, j, load_float(g, j) * s);
      }
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> cross_entropy_forward_cpu(FUSED_OPTIM_CROSS_ENTROPY_ARGS) {
  check_cross_entropy_args(logits, target, weight, scales, grad, ignore_index, label_smoothing, z_loss, softcap);
  const int64_t num_rows = logits.size(0), num_classes = logits.size(1);
  const float* class_weight = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
  // Every target checked before anything is written: the gradient may be going into the logits themselves.
  const int64_t* targets = target.const_data_ptr<int64_t>();
  for (int64_t row = 0; row < num_rows; ++row) {
    const int64_t t = targets[row];
    FO_CHECK_INDEX(t == ignore_index || (t >= 0 && t < num_classes), "Target ", t, " is out of bounds.");
  }
  const float* s = scales.const_data_ptr<float>();
  const CrossEntropyOptions options{static_cast<float>(label_smoothing), static_cast<float>(z_loss),
                                    static_cast<float>(softcap), s[0], s[1], s[2], num_classes};
  Tensor loss = empty_float({num_rows}, logits);
  Tensor lse = empty_float({num_rows}, logits);
  if (grad.has_value()) advise_huge_pages(grad->mutable_data_ptr(), grad->numel() * grad->element_size());
  dispatch_float_types(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* g = grad.has_value() ? grad->mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_row_flags(options.softcap > 0.0f, class_weight != nullptr, [&](auto kSoftcap, auto kWeighted) {
      cross_entropy_rows<scalar_t, kSoftcap, kWeighted>(logits, targets, class_weight, g, data_as<float>(loss),
                                                        data_as<float>(lse), ignore_index, options);
    });
  });
  return {loss, lse};
}

Tensor cross_entropy_shard_stats_cpu(FUSED_OPTIM_SHARD_STATS_ARGS) {
  check_shard_args("cross_entropy_shard_stats", logits, target, weight, class_start);
  const int64_t num_rows = logits.size(0);
  const int64_t* targets = target.const_data_ptr<int64_t>();
  for (int64_t row = 0; row < num_rows; ++row) {  // against the whole vocabulary: no shard may drop a bad target
    const int64_t t = targets[row];
    FO_CHECK_INDEX(t == ignore_index || (t >= 0 && t < num_classes), "Target ", t, " is out of bounds.");
  }
  Tensor stats = empty_float({num_rows, 4}, logits);
  const float* class_weight = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
  dispatch_float_types(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_row_flags(softcap > 0.0, class_weight != nullptr, [&](auto kSoftcap, auto kWeighted) {
      shard_stats_rows<scalar_t, kSoftcap, kWeighted>(logits, targets, class_weight,
                                                      reinterpret_cast<ShardRowStats*>(stats.mutable_data_ptr<float>()),
                                                      class_start, ignore_index, static_cast<float>(softcap));
    });
  });
  return stats;
}

void cross_entropy_shard_grad_cpu(FUSED_OPTIM_SHARD_GRAD_ARGS) {
  check_shard_grad_args(grad, logits, target, weight, row_coefs, class_start, ignore_index, softcap);
  const float* class_weight = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
  advise_huge_pages(grad.mutable_data_ptr(), grad.numel() * grad.element_size());
  dispatch_float_types(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    dispatch_row_flags(softcap > 0.0, class_weight != nullptr, [&](auto kSoftcap, auto kWeighted) {
      shard_grad_rows<scalar_t, kSoftcap, kWeighted>(
          grad.mutable_data_ptr<scalar_t>(), logits, target.const_data_ptr<int64_t>(), class_weight,
          reinterpret_cast<const ShardRowCoefs*>(row_coefs.const_data_ptr<float>()), class_start, ignore_index,
          static_cast<float>(softcap));
    });
  });
}

// grad (N, V) *= row_scale (N values, or one for every row); a row whose scale is exactly 1 is left unread.
void cross_entropy_scale_grad_cpu(const Tensor& grad, const Tensor& row_scale) {
  check_scale_grad_args(grad, row_scale);
  dispatch_float_types(grad.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scale_rows<scalar_t>(grad, row_scale);
  });
}

}  // namespace fused_optim
