// What every CUDA launcher needs from torch through the stable ABI: the current stream of the current device (set by
// the launcher's DeviceGuard), and the check that a launch was accepted.
#pragma once

#include <optional>

#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include "ops/torch_api.h"

namespace fused_optim {

// torch's current stream (a CUDA graph capture's, a user's torch.cuda.stream), so kernels order with torch's work.
inline cudaStream_t current_stream() {
  void* stream = nullptr;
  const auto device = torch::stable::accelerator::getCurrentDeviceIndex();
  FO_CHECK(aoti_torch_get_current_cuda_stream(device, &stream) == AOTI_TORCH_SUCCESS,
           "fused_optim: cannot get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

// The device address of an optional one-element float32 tensor (grad_scale, found_inf), or null.
inline const float* optional_ptr(const std::optional<Tensor>& t) {
  return t.has_value() ? data_as<float>(*t) : nullptr;
}

// The lr a kernel steps with: the float given at launch, or a one-element tensor's on the device, float32 or
// float64 (a compiled step's float lr, ops/_library.py's step_scalars: read exactly), with no host sync.
struct DeviceLr {
  double value;
  const float* fp32;
  const double* fp64;

  __device__ __forceinline__ double read() const {
    return fp64 != nullptr ? *fp64 : fp32 != nullptr ? static_cast<double>(*fp32) : value;
  }
};

inline DeviceLr device_lr(double lr, const std::optional<Tensor>& lr_tensor) {
  if (!lr_tensor.has_value()) return {lr, nullptr, nullptr};
  if (lr_tensor->scalar_type() == kDouble) return {lr, nullptr, data_as<double>(*lr_tensor)};
  return {lr, data_as<float>(*lr_tensor), nullptr};
}

// After each launch: a launch that failed (bad configuration, no kernel image for this GPU) raises at once.
inline void check_launch() {
  const cudaError_t error = cudaGetLastError();
  FO_CHECK(error == cudaSuccess, "fused_optim: CUDA kernel launch failed: ", cudaGetErrorString(error));
}

}  // namespace fused_optim
