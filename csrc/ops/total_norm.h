// The C++ signature of fused_optim::total_norm (schema in fused_optim/ops/total_norm.py), shared by the CPU and CUDA
// implementations and the registrations, plus the checks both run first.
#pragma once

#include "ops/torch_api.h"

#include "ops/accumulate.h"
#include "fused_optim/total_norm.h"

namespace fused_optim {

Tensor total_norm_cpu(TensorList tensors, double norm_type);
Tensor total_norm_cuda(TensorList tensors, double norm_type);

// Same messages as the Python twin, check_total_norm_args in fused_optim/ops/total_norm.py.
inline void check_total_norm_args(TensorList tensors, double norm_type) {
  FO_CHECK(!tensors.empty(), "total_norm: needs at least one tensor");
  FO_CHECK(norm_type > 0, "total_norm: norm_type must be positive or inf, got ", norm_type);
  const torch::stable::Device device = tensors[0].device();
  for (const Tensor& tensor : tensors) {
    const TensorInfo t(tensor);
    FO_CHECK(is_grad_dtype(t.dtype), "total_norm: tensors must be float32, bfloat16 or float16");
    FO_CHECK(t.device == device, "total_norm: all tensors must be on one device");
    FO_CHECK(is_non_overlapping_and_dense(t), "total_norm: tensors must be dense");
  }
}

}  // namespace fused_optim
