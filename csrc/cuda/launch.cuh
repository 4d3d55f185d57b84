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

// The device address of an optional one-element float32 tensor (lr_tensor, grad_scale, found_inf), or null.
inline const float* optional_ptr(const std::optional<Tensor>& t) {
  return t.has_value() ? data_as<float>(*t) : nullptr;
}

// After each launch: a launch that failed (bad configuration, no kernel image for this GPU) raises at once.
inline void check_launch() {
  const cudaError_t error = cudaGetLastError();
  FO_CHECK(error == cudaSuccess, "fused_optim: CUDA kernel launch failed: ", cudaGetErrorString(error));
}

}  // namespace fused_optim
