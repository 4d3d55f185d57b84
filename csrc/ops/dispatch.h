// Host-side dtype dispatch shared by the CPU and CUDA launchers: one place that maps a tensor's ScalarType to the
// C++ type a kernel template is instantiated with, for the three dtypes the kernels take (no float64 or integer
// instantiations to compile).
#pragma once

#include <type_traits>

#include "ops/torch_api.h"

#include "fused_optim/rounding.h"

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
// float32 (the fp32 main grads of low-precision params), or is bfloat16 / float16 beside a float32 param (torch's
// `grad_dtype`: read as it is, where a widened copy would cost 4 bytes a param).
template <typename Fn>
decltype(auto) dispatch_param_grad_types(ScalarType param_dtype, ScalarType grad_dtype, Fn&& fn) {
  return dispatch_float_types(param_dtype, [&](auto param) {
    using param_t = decltype(param);
    if (grad_dtype == kFloat) return fn(param, float{});
    if constexpr (std::is_same_v<param_t, float>) {
      if (grad_dtype == kBFloat16) return fn(param, c10::BFloat16{});
      if (grad_dtype == kHalf) return fn(param, c10::Half{});
    }
    return fn(param, param_t{});
  });
}

// Calls fn(moment_t{}) with moment_t the C++ type of Adam's moments: float32, or bfloat16 (moments="bf16").
template <typename Fn>
decltype(auto) dispatch_moment_type(ScalarType dtype, Fn&& fn) {
  if (dtype == kBFloat16) return fn(c10::BFloat16{});
  return fn(float{});
}

// The write-back of a call (rounding.h): stochastic rounding, or its master list's kind.
inline WriteBack write_back_of(bool stochastic, TensorList master_params) {
  if (stochastic) return WriteBack::kStochastic;
  if (master_params.empty()) return WriteBack::kNearest;
  const ScalarType dtype = master_params[0].scalar_type();
  if (dtype == ScalarType::Short) return WriteBack::kRemainder;
  return dtype == ScalarType::Char ? WriteBack::kRemainder8 : WriteBack::kMaster;
}

// Calls fn(std::integral_constant<WriteBack, W>{}) for the runtime `write`; the bf16-only write-backs (stochastic,
// remainders) are instantiated for bf16 params only (the op's checks refused any other call before this).
template <typename param_t, typename Fn>
decltype(auto) dispatch_write_back(WriteBack write, Fn&& fn) {
  using W = WriteBack;
  if constexpr (std::is_same_v<param_t, c10::BFloat16>) {
    if (write == W::kStochastic) return fn(std::integral_constant<W, W::kStochastic>{});
    if (write == W::kRemainder) return fn(std::integral_constant<W, W::kRemainder>{});
    if (write == W::kRemainder8) return fn(std::integral_constant<W, W::kRemainder8>{});
  } else {
    FO_CHECK(write != W::kStochastic && write != W::kRemainder && write != W::kRemainder8,
             "fused_optim: stochastic rounding and master remainders are for bfloat16 params");
  }
  if (write == W::kMaster) return fn(std::integral_constant<W, W::kMaster>{});
  return fn(std::integral_constant<W, W::kNearest>{});
}

}  // namespace fused_optim
