// The C++ signature of fused_optim::total_norm (schema in fused_optim/ops/total_norm.py), shared by the CPU and CUDA
// implementations and the registrations, plus the checks both run first.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "ops/accumulate.h"
#include "fused_optim/total_norm.h"

namespace fused_optim {

at::Tensor total_norm_cpu(at::TensorList tensors, double norm_type);
at::Tensor total_norm_cuda(at::TensorList tensors, double norm_type);

// Same messages as the Python twin, check_total_norm_args in fused_optim/ops/total_norm.py.
inline void check_total_norm_args(at::TensorList tensors, double norm_type) {
  TORCH_CHECK(!tensors.empty(), "total_norm: needs at least one tensor");
  TORCH_CHECK(norm_type > 0, "total_norm: norm_type must be positive or inf, got ", norm_type);
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(is_grad_dtype(t.scalar_type()), "total_norm: tensors must be float32, bfloat16 or float16");
    TORCH_CHECK(t.device() == tensors[0].device(), "total_norm: all tensors must be on one device");
    TORCH_CHECK(t.is_non_overlapping_and_dense(), "total_norm: tensors must be dense");
  }
}

}  // namespace fused_optim
