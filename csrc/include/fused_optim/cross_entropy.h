// Cross-entropy over one row of logits: the loss and the gradient of every logit, shared by the CUDA kernel
// (csrc/cuda/cross_entropy.cu) and the CPU one (csrc/cpu/cross_entropy.cpp). fused_optim/triton/cross_entropy.py
// mirrors it line for line. All math in fp32.
//
// For a row x (V logits) with target t, class weights w (all 1 without a weight), label smoothing eps, optional
// soft-capping z = softcap * tanh(x / softcap) (Gemma 2), and p = softmax(z), lse = log(sum(exp(z))):
//
//   loss = (1 - eps) * w_t * (lse - z_t)  +  (eps / V) * sum_j w_j * (lse - z_j)          (torch's formula)
//   z_loss = z_loss_coef * lse^2                                                           (PaLM's z-loss)
//
// and, with the reduction's scales ce_scale (1 / sum of w_t over kept rows for "mean", else 1) and z_scale
// (1 / number of kept rows for "mean", else 1), the gradient of ce_scale * loss + z_scale * z_loss:
//
//   dz_j = p_j * (C + B * W + 2 * z_loss_coef * z_scale * lse) - B * w_j - C * [j == t]
//        where C = ce_scale * (1 - eps) * w_t,  B = ce_scale * eps / V,  W = sum_j w_j
//   dx_j = dz_j * (1 - (z_j / softcap)^2)    when soft-capped (d tanh = 1 - tanh^2)
//
// so one row costs one exp and one multiply-add per logit once lse is known. The loss is summed as
// (max - z_t) + log(sum of exp(z - max)), not lse - z_t: for a confident row (z_t the max) that keeps the loss's
// own relative precision instead of an ulp of lse, as torch's log_softmax does. Likewise p_j = exp(z_j - max) / sum.
// The smoothing term sum_j w_j * (lse - z_j) is W * log(sum) + sum_j w_j * (max - z_j) (the weighted gap below the
// max), whose terms are all >= 0: the sum of w_j z_j against W * lse would cancel, losing ulps of W * max when the
// logits share a large offset. Where eps is 0 the smoothing terms are left out, not multiplied by 0: a class weight
// of inf (1 / count of an absent class) then gives torch's finite loss and gradient, not 0 * inf = NaN.
#pragma once

#include <cmath>

#include "fused_optim/macros.h"

namespace fused_optim {

// The logit the softmax sees: x itself, or x soft-capped into (-softcap, softcap).
FO_HOST_DEVICE float capped_logit(float x, float softcap) { return softcap > 0.0f ? softcap * tanhf(x / softcap) : x; }

// Running weighted gap sum_j w_j * (max - z_j) of a stream of logits against its running max (the caller keeps the
// max: an OnlineLogSumExp's): when the max rises, the terms so far grow by their weight times the rise. A logit at
// the max adds 0, so a masked (-inf) one adds 0 while every logit so far is masked, and w * inf once the max rises
// past it (the smoothing loss of a masked class is infinite, as torch's).
struct OnlineWeightedGap {
  float gap = 0.0f;
  float weight = 0.0f;  // sum of the weights so far

  FO_HOST_DEVICE void rise(float max, float new_max) {
    if (new_max > max && weight != 0.0f) gap += weight * (new_max - max);
  }
  // logit z of weight w, the running max (already risen to z) being `max`
  FO_HOST_DEVICE void add(float z, float w, float max) {
    gap += z < max ? w * (max - z) : 0.0f;
    weight += w;
  }
  // another stream's gap against its max `other_max`; this one's is against `max`, and the two together have `new_max`
  FO_HOST_DEVICE void merge(OnlineWeightedGap other, float max, float other_max, float new_max) {
    rise(max, new_max);
    other.rise(other_max, new_max);
    gap += other.gap;
    weight += other.weight;
  }
};

// Running (max, sum of exp(z - max)) of a stream of logits: one pass, no overflow (Milakov & Gimelshein 2018).
struct OnlineLogSumExp {
  float max = -INFINITY;
  float sum = 0.0f;

  // A masked (-inf) logit adds nothing, even while max is still -inf; a NaN, which no comparison passes, makes the
  // sum NaN, and so does +inf: a new max adds its own term as (z - z) + 1, which is 1, or NaN for an infinite z, as
  // torch's exp(z - max) is.
  FO_HOST_DEVICE void add(float z) {
    if (z > max) {
      sum = sum * expf(max - z) + ((z - z) + 1.0f);
      max = z;
    } else if (!(z <= -INFINITY)) {
      sum += expf(z - max);
    }
  }
  // `other` of max -inf holds masked logits alone (sum 0) or a NaN (sum NaN), which stays
  FO_HOST_DEVICE void merge(const OnlineLogSumExp& other) {
    if (other.max > max) {
      sum = sum * expf(max - other.max) + other.sum;
      max = other.max;
    } else if (other.max > -INFINITY) {
      sum += other.sum * expf(other.max - max);
    } else {
      sum += other.sum;
    }
  }
};

// A vector of kSize capped logits z, of class weights w, into a thread's running stats: the gap risen to the
// vector's max, and one rescale of the sum for the vector rather than one an element. fmaxf leaves a NaN out of the
// max, and exp(NaN - max) makes the sum NaN; so does a NaN in a vector of masked (-inf) logits and NaNs alone, whose
// max is -inf (and whose exp(-inf - -inf) would make masked logits NaN too).
template <int kSize>
FO_HOST_DEVICE void add_logits(const float (&z)[kSize], const float (&w)[kSize], OnlineLogSumExp& acc,
                               OnlineWeightedGap& gap) {
  float vector_max = -INFINITY;
  for (int k = 0; k < kSize; ++k) vector_max = fmaxf(vector_max, z[k]);
  const float new_max = fmaxf(acc.max, vector_max);
  gap.rise(acc.max, new_max);
  for (int k = 0; k < kSize; ++k) gap.add(z[k], w[k], new_max);
  if (vector_max == -INFINITY) {
    for (int k = 0; k < kSize; ++k) acc.sum += z[k] != z[k] ? z[k] : 0.0f;
    return;
  }
  OnlineLogSumExp vector{vector_max, 0.0f};
  for (int k = 0; k < kSize; ++k) vector.sum += expf(z[k] - vector_max);
  acc.merge(vector);
}

// A smoothing term of the gradient, B * w (w a class weight, or their sum W): 0 where B is 0, not 0 * inf.
FO_HOST_DEVICE float smoothing_term(float weight_coef, float weight) {
  return weight_coef != 0.0f ? weight_coef * weight : 0.0f;
}

// What the gradient of one row needs once its log-sum-exp is known (see the formula above).
struct CrossEntropyRowGrad {
  float lse;
  float p_coef;       // C + B * W + 2 * z_loss_coef * z_scale * lse
  float weight_coef;  // B
  float target_coef;  // C
  float softcap;

  // dL/dx_j from p_j = exp(z_j - max) / sum (each platform brings its own exp), the capped logit z_j, its class
  // weight w_j and whether j is the target; kSoftcap: softcap > 0, for a caller that knows it at compile time (gcc
  // kept the CPU's fp32 loops scalar around the run-time test).
  template <bool kSoftcap>
  FO_HOST_DEVICE float grad(float p, float z, float class_weight, bool is_target) const {
    float g = p * p_coef - smoothing_term(weight_coef, class_weight) - (is_target ? target_coef : 0.0f);
    if constexpr (kSoftcap) {
      const float t = z / softcap;
      g *= 1.0f - t * t;
    }
    return g;
  }

  FO_HOST_DEVICE float grad(float p, float z, float class_weight, bool is_target) const {
    return softcap > 0.0f ? grad<true>(p, z, class_weight, is_target) : grad<false>(p, z, class_weight, is_target);
  }
};

struct CrossEntropyOptions {
  float label_smoothing;
  float z_loss_coef;
  float softcap;
  float ce_scale;    // see above; read from the device before the row starts
  float z_scale;
  float weight_sum;  // W: sum of the class weights (V without a weight)
  int64_t num_classes;
};

// The loss of one kept row (without the z-loss, which the caller adds from lse) from its max capped logit, the
// log of its sum of exp(z - max), its target's capped logit and weight, and the weighted gap of its capped logits
// below the max (sum_j w_j * (max - z_j)).
FO_HOST_DEVICE float cross_entropy_row_loss(float max, float log_sum, float target_logit, float target_weight,
                                            float weighted_gap, const CrossEntropyOptions& o) {
  const float eps = o.label_smoothing;
  float loss = (1.0f - eps) * target_weight * ((max - target_logit) + log_sum);
  if (eps > 0.0f) {
    loss += eps / static_cast<float>(o.num_classes) * (o.weight_sum * log_sum + weighted_gap);
  }
  return loss;
}

FO_HOST_DEVICE CrossEntropyRowGrad cross_entropy_row_grad(float lse, float target_weight,
                                                          const CrossEntropyOptions& o) {
  const float target_coef = o.ce_scale * (1.0f - o.label_smoothing) * target_weight;
  const float weight_coef = o.ce_scale * o.label_smoothing / static_cast<float>(o.num_classes);
  const float p_coef = target_coef + smoothing_term(weight_coef, o.weight_sum) + 2.0f * o.z_loss_coef * o.z_scale * lse;
  return CrossEntropyRowGrad{lse, p_coef, weight_coef, target_coef, o.softcap};
}

// Vocabulary-parallel rows: the V logits of a row are split over ranks, each holding the classes
// [class_start, class_start + V_shard). Pass 1 reduces each rank's shard to ShardRowStats; the ranks exchange them
// (fused_optim/autograd/vocab_parallel.py: one all-gather of N x 4 floats) and combine them into the row's max M and
// sum S = sum_r sum_r' exp(max_r - M), its loss (from the formula above) and the coefficients below; pass 2 writes
// each shard's gradient from p_j = exp(z_j - M) / S, as cross_entropy_row_grad would with the whole row.
struct ShardRowStats {
  float max;           // of the shard's capped logits (-inf for an empty shard)
  float sum;           // of exp(z_j - max) over the shard
  float target_logit;  // z_t when the target is in this shard, else 0 (the ranks' values add up to z_t)
  float weighted_gap;  // sum_j w_j * (max - z_j) over the shard (against the shard's max)
};

// What pass 2 needs of a row (combined on every rank from all ranks' ShardRowStats), in the order kept on the device.
struct ShardRowCoefs {
  float max;      // M
  float inv_sum;  // 1 / S
  float p_coef;   // as CrossEntropyRowGrad
  float weight_coef;
  float target_coef;

  FO_HOST_DEVICE CrossEntropyRowGrad row_grad(float softcap) const {
    return CrossEntropyRowGrad{0.0f, p_coef, weight_coef, target_coef, softcap};
  }
};

}  // namespace fused_optim
