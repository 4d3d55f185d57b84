// The C++ signature of fused_optim::accumulate_grads_ (schema in fused_optim/ops/accumulate.py), shared by the CPU
// and CUDA implementations and the registrations, plus the checks both run before touching memory.
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

namespace fused_optim {

void accumulate_grads_cpu(at::TensorList main_grads, at::TensorList grads);
void accumulate_grads_cuda(at::TensorList main_grads, at::TensorList grads);

inline bool is_grad_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// Checks everything before anything is written, and returns the grads in their main grads' memory layout (the
// kernels walk both as flat arrays; a grad with other strides is copied first). Same messages as the Python twin,
// check_accumulate_args in fused_optim/ops/accumulate.py.
inline std::vector<at::Tensor> check_accumulate_args(at::TensorList main_grads, at::TensorList grads) {
  TORCH_CHECK(main_grads.size() == grads.size(), "accumulate_grads_: main_grads and grads must have the same length");
  for (size_t i = 0; i < main_grads.size(); ++i) {
    TORCH_CHECK(main_grads[i].scalar_type() == at::kFloat, "accumulate_grads_: main grads must be float32");
    TORCH_CHECK(is_grad_dtype(grads[i].scalar_type()), "accumulate_grads_: grads must be float32, bfloat16 or float16");
    TORCH_CHECK(main_grads[i].sizes() == grads[i].sizes(), "accumulate_grads_: a grad must have its main grad's shape");
    TORCH_CHECK(main_grads[i].device() == main_grads[0].device() && grads[i].device() == main_grads[0].device(),
                "accumulate_grads_: all tensors must be on one device");
    TORCH_CHECK(main_grads[i].is_non_overlapping_and_dense(), "accumulate_grads_: main grads must be dense");
  }
  std::vector<at::Tensor> matched(grads.begin(), grads.end());
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].strides() != main_grads[i].strides()) {
      matched[i] = at::empty_like(main_grads[i], grads[i].options()).copy_(grads[i]);
    }
  }
  return matched;
}

}  // namespace fused_optim
