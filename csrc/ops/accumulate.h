// The C++ signature of fused_optim::accumulate_grads_ (schema in fused_optim/ops/accumulate.py), shared by the CPU
// and CUDA implementations and the registrations, plus the checks both run before touching memory.
#pragma once

#include <vector>

#include "ops/torch_api.h"

namespace fused_optim {

void accumulate_grads_cpu(TensorList main_grads, TensorList grads);
void accumulate_grads_cuda(TensorList main_grads, TensorList grads);

inline bool is_grad_dtype(ScalarType dtype) {
  return dtype == kFloat || dtype == kBFloat16 || dtype == kHalf;
}

// Checks everything before anything is written, and returns the grads in their main grads' memory layout (the
// kernels walk both as flat arrays; a grad with other strides is copied first). Same messages as the Python twin,
// check_accumulate_args in fused_optim/ops/accumulate.py.
inline std::vector<Tensor> check_accumulate_args(TensorList main_grads, TensorList grads) {
  FO_CHECK(main_grads.size() == grads.size(), "accumulate_grads_: main_grads and grads must have the same length");
  if (main_grads.empty()) return {};
  const torch::stable::Device device = main_grads[0].device();
  std::vector<Tensor> matched(grads.begin(), grads.end());
  for (size_t i = 0; i < main_grads.size(); ++i) {
    const TensorInfo main_grad(main_grads[i]), grad(grads[i]);
    FO_CHECK(main_grad.dtype == kFloat, "accumulate_grads_: main grads must be float32");
    FO_CHECK(is_grad_dtype(grad.dtype), "accumulate_grads_: grads must be float32, bfloat16 or float16");
    FO_CHECK(main_grad.sizes.equals(grad.sizes), "accumulate_grads_: a grad must have its main grad's shape");
    FO_CHECK(main_grad.device == device && grad.device == device,
             "accumulate_grads_: all tensors must be on one device");
    FO_CHECK(is_non_overlapping_and_dense(main_grad), "accumulate_grads_: main grads must be dense");
    if (!grad.strides.equals(main_grad.strides)) matched[i] = copy_in_layout_of(main_grads[i], grads[i]);
  }
  return matched;
}

}  // namespace fused_optim
