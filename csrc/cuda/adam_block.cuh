// The scalars an Adam block steps its tensor with (adam.cu, adam_int8.cu): thread 0 derives them once from the step
// count on the device (bias corrections, lr, 1 / grad_scale: adam.h's adam_scalars) together with the random stream
// of the tensor's roundings (rounding.h, keyed by the count after this step, as on the CPU), and every thread of the
// block reads them from shared memory.
#pragma once

#include <cstdint>

#include "fused_optim/adam.h"
#include "fused_optim/rounding.h"
#include "launch.cuh"

namespace fused_optim {

struct AdamBlockScalars {
  AdamScalars scalars;
  uint32_t stream;
};

// `step`: the tensor's count before this step; `index`: the tensor's place in the caller's list
__device__ __forceinline__ AdamBlockScalars adam_block_scalars(const AdamHyper& hyper, const DeviceLr& lr,
                                                               const float* grad_scale, uint32_t seed,
                                                               const float* step, uint32_t index) {
  __shared__ AdamScalars shared_scalars;
  __shared__ uint32_t shared_stream;
  if (threadIdx.x == 0) {
    const float next = *step + 1.0f;
    shared_scalars = adam_scalars(hyper, lr.read(), next,
                                  grad_scale != nullptr ? *grad_scale : 1.0f);
    shared_stream = stream_key(seed, index, static_cast<uint32_t>(next));
  }
  __syncthreads();
  return {shared_scalars, shared_stream};
}

}  // namespace fused_optim
