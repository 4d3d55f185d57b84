// Host-side dtype dispatch shared by the CPU and CUDA launchers: one place that maps a tensor's ScalarType to the
// C++ type a kernel template is instantiated with, for the three dtypes the kernels take (no float64 or integer
// instantiations to compile).
#pragma once

#include "ops/torch_api.h"

namespace fused_optim {

// Calls fn(T{}) with T the C++ type of a float32 / bfloat16 / float16 tensor.
template <typename Fn>
decltype(auto) dispatch_float_types(ScalarType dtype, Fn&& fn) {
  if (dtype == kFloat) return fn(float{});
  if (dtype == kBFloat16) return fn(c10::BFloat16{});
  FO_CHECK(dtype == kHalf, "fused_optim: expected float32, bfloat16 or float16, got ", dtype);
  return fn(c10::Half{});
}

// Calls fn(param_t{}, grad_t{}) for a param of a kernel dtype and its grad: the grad has the param's dtype, or is
// float32 (the fp32 main grads of low-precision params).
template <typename Fn>
decltype(auto) dispatch_param_grad_types(ScalarType param_dtype, ScalarType grad_dtype, Fn&& fn) {
  return dispatch_float_types(param_dtype, [&](auto param) {
    using param_t = decltype(param);
    if (grad_dtype == kFloat) return fn(param, float{});
    return fn(param, param_t{});
  });
}

}  // namespace fused_optim
