// The C++ signatures of fused_optim::cross_entropy_forward and cross_entropy_scale_grad_ (schemas in
// fused_optim/ops/cross_entropy.py), shared by the CPU and CUDA implementations and by the registrations, plus the
// argument checks both run before touching memory.
#pragma once

#include <optional>
#include <tuple>

#include "ops/torch_api.h"

#include "fused_optim/cross_entropy.h"
#include "ops/dispatch.h"

namespace fused_optim {

#define FUSED_OPTIM_CROSS_ENTROPY_ARGS                                                                        \
  const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,                            \
      const Tensor& scales, const std::optional<Tensor>& grad, int64_t ignore_index,                          \
      double label_smoothing, double z_loss, double softcap

// fused_optim::cross_entropy_shard_stats / cross_entropy_shard_grad_: the two passes of a vocabulary-parallel row
// (cross_entropy.h, ShardRowStats).
#define FUSED_OPTIM_SHARD_STATS_ARGS                                                                          \
  const Tensor& logits, const Tensor& target, const std::optional<Tensor>& weight,                            \
      int64_t class_start, int64_t num_classes, int64_t ignore_index, double softcap
#define FUSED_OPTIM_SHARD_GRAD_ARGS                                                                           \
  const Tensor& grad, const Tensor& logits, const Tensor& target,                                             \
      const std::optional<Tensor>& weight, const Tensor& row_coefs, int64_t class_start,                      \
      int64_t ignore_index, double softcap

std::tuple<Tensor, Tensor> cross_entropy_forward_cpu(FUSED_OPTIM_CROSS_ENTROPY_ARGS);
std::tuple<Tensor, Tensor> cross_entropy_forward_cuda(FUSED_OPTIM_CROSS_ENTROPY_ARGS);
void cross_entropy_scale_grad_cpu(const Tensor& grad, const Tensor& row_scale);
void cross_entropy_scale_grad_cuda(const Tensor& grad, const Tensor& row_scale);
Tensor cross_entropy_shard_stats_cpu(FUSED_OPTIM_SHARD_STATS_ARGS);
Tensor cross_entropy_shard_stats_cuda(FUSED_OPTIM_SHARD_STATS_ARGS);
void cross_entropy_shard_grad_cpu(FUSED_OPTIM_SHARD_GRAD_ARGS);
void cross_entropy_shard_grad_cuda(FUSED_OPTIM_SHARD_GRAD_ARGS);

inline void check_cross_entropy_args(FUSED_OPTIM_CROSS_ENTROPY_ARGS) {
  FO_CHECK(logits.dim() == 2 && logits.stride(1) == 1,
           "cross_entropy_forward: logits must be (N, V) with unit column stride");
  FO_CHECK(logits.scalar_type() == kFloat || logits.scalar_type() == kBFloat16 ||
               logits.scalar_type() == kHalf,
           "cross_entropy_forward: logits must be float32, bfloat16 or float16");
  FO_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.scalar_type() == kLong &&
               target.is_contiguous() && target.device() == logits.device(),
           "cross_entropy_forward: target must be a contiguous int64 (N,) tensor on the logits' device");
  FO_CHECK(scales.scalar_type() == kFloat && scales.numel() == 3 && scales.is_contiguous() &&
               scales.device() == logits.device(),
           "cross_entropy_forward: scales must be three float32 values on the logits' device");
  if (weight.has_value()) {
    FO_CHECK(weight->scalar_type() == kFloat && weight->is_contiguous() &&
                 weight->numel() == logits.size(1) && weight->device() == logits.device(),
             "cross_entropy_forward: weight must be a contiguous float32 tensor of V values on the logits' device");
  }
  if (grad.has_value()) {
    FO_CHECK(grad->sizes().equals(logits.sizes()) && grad->strides().equals(logits.strides()) &&
                 grad->scalar_type() == logits.scalar_type() && grad->device() == logits.device(),
             "cross_entropy_forward: grad must have the logits' shape, strides, dtype and device");
  }
}

inline void check_scale_grad_args(const Tensor& grad, const Tensor& row_scale) {
  FO_CHECK(grad.dim() == 2 && grad.stride(1) == 1,
           "cross_entropy_scale_grad_: grad must be (N, V) with unit column stride");
  FO_CHECK(grad.scalar_type() == kFloat || grad.scalar_type() == kBFloat16 ||
               grad.scalar_type() == kHalf,
           "cross_entropy_scale_grad_: grad must be float32, bfloat16 or float16");
  FO_CHECK(row_scale.scalar_type() == kFloat && row_scale.is_contiguous() &&
               (row_scale.numel() == 1 || row_scale.numel() == grad.size(0)) && row_scale.device() == grad.device(),
           "cross_entropy_scale_grad_: row_scale must be float32 on grad's device, one value or one per row");
}

// The checks of both passes: logits (N, V_shard) as the forward's, target (N,), weight (V_shard,) of this shard.
inline void check_shard_args(const char* op, const Tensor& logits, const Tensor& target,
                             const std::optional<Tensor>& weight, int64_t class_start) {
  FO_CHECK(logits.dim() == 2 && logits.stride(1) == 1, op, ": logits must be (N, V) with unit column stride");
  FO_CHECK(logits.scalar_type() == kFloat || logits.scalar_type() == kBFloat16 ||
               logits.scalar_type() == kHalf,
           op, ": logits must be float32, bfloat16 or float16");
  FO_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.scalar_type() == kLong &&
               target.is_contiguous() && target.device() == logits.device(),
           op, ": target must be a contiguous int64 (N,) tensor on the logits' device");
  FO_CHECK(class_start >= 0, op, ": class_start must be >= 0");
  if (weight.has_value()) {
    FO_CHECK(weight->scalar_type() == kFloat && weight->is_contiguous() &&
                 weight->numel() == logits.size(1) && weight->device() == logits.device(),
             op, ": weight must be a contiguous float32 tensor of the shard's V values on the logits' device");
  }
}

inline void check_shard_grad_args(FUSED_OPTIM_SHARD_GRAD_ARGS) {
  check_shard_args("cross_entropy_shard_grad_", logits, target, weight, class_start);
  FO_CHECK(row_coefs.scalar_type() == kFloat && row_coefs.dim() == 2 && row_coefs.size(0) == logits.size(0) &&
               row_coefs.size(1) == 5 && row_coefs.is_contiguous() && row_coefs.device() == logits.device(),
           "cross_entropy_shard_grad_: row_coefs must be a contiguous float32 (N, 5) tensor on the logits' device");
  FO_CHECK(grad.sizes().equals(logits.sizes()) && grad.strides().equals(logits.strides()) &&
               grad.scalar_type() == logits.scalar_type() && grad.device() == logits.device(),
           "cross_entropy_shard_grad_: grad must have the logits' shape, strides, dtype and device");
}

}  // namespace fused_optim
