// CUDA total norm in two launches' worth of passes, deterministic and with no host sync:
//   1. multi-tensor blocks (multi_tensor.cuh), one per chunk of one tensor: each thread folds its elements into an
//      fp64 partial (16-byte loads when aligned), the block combines its threads' partials in a fixed tree and
//      writes one fp64 partial per block into a workspace;
//   2. one block combines the workspace in a fixed order and writes the norm (0-dim fp32) on the device.
// No atomics: the same inputs give the same bits on every run. The element math is fused_optim/total_norm.h,
// shared with the CPU kernel.
#include <type_traits>

#include "ops/torch_api.h"
#include "launch.cuh"

#include "ops/total_norm.h"
#include "ops/dispatch.h"
#include "multi_tensor.cuh"

namespace fused_optim {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 16 * 1024;  // 32 elements per thread
constexpr int kFinishThreads = 1024;

struct NormArgs {
  const void* data;
  int64_t numel;
};
using Table = multi_tensor::LaunchTable<NormArgs>;

// The combination of every thread's `value` in a fixed tree, valid in thread 0. kBlock is a power of two.
template <NormKind kKind, int kBlock>
__device__ __forceinline__ double block_combine(double value) {
  __shared__ double shared[kBlock];
  shared[threadIdx.x] = value;
  __syncthreads();
#pragma unroll
  for (int width = kBlock / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) shared[threadIdx.x] = norm_combine<kKind>(shared[threadIdx.x], shared[threadIdx.x + width]);
    __syncthreads();
  }
  return shared[0];
}

// Each thread folds the runs of kVec elements [i, i + kVec) at i = begin + kVec * thread, + kVec * kThreads, ...
// in element order: one 16-byte load per run when the tensor is aligned, kVec loads (and the tail) otherwise, the
// same sums in the same order either way, so the bits do not depend on the address. Sums are fp64 per thread (x²
// of any finite fp32 x fits, as on the CPU); the max of |x| is exact in fp32.
template <NormKind kKind, typename T>
__global__ void __launch_bounds__(kThreads)
    block_partials_kernel(const __grid_constant__ Table table, double* partials, int64_t first_partial, double p) {
  using Partial = std::conditional_t<kKind == NormKind::kInf, float, double>;
  const multi_tensor::BlockWork work = multi_tensor::block_work(table, kChunk);
  const T* data = static_cast<const T*>(table.tensors[work.tensor].data);
  const bool aligned = multi_tensor::aligned16(data);
  Partial partial = 0;
  for (int64_t i = work.begin + threadIdx.x * multi_tensor::kVec; i < work.end;
       i += kThreads * multi_tensor::kVec) {
    if (aligned && i + multi_tensor::kVec <= work.end) {
      float x[multi_tensor::kVec];
      multi_tensor::load_vec(data + i, x);
#pragma unroll
      for (int k = 0; k < multi_tensor::kVec; ++k) partial = norm_combine<kKind>(partial, norm_term<kKind, Partial>(x[k], p));
    } else {
      const int64_t end = i + multi_tensor::kVec < work.end ? i + multi_tensor::kVec : work.end;
      for (int64_t j = i; j < end; ++j) {
        partial = norm_combine<kKind>(partial, norm_term<kKind, Partial>(static_cast<float>(data[j]), p));
      }
    }
  }
  const double block_partial = block_combine<kKind, kThreads>(static_cast<double>(partial));
  if (threadIdx.x == 0) partials[first_partial + blockIdx.x] = block_partial;
}

template <NormKind kKind>
__global__ void __launch_bounds__(kFinishThreads)
    finish_kernel(const double* partials, int64_t num_partials, double p, float* norm) {
  double partial = 0.0;
  for (int64_t i = threadIdx.x; i < num_partials; i += kFinishThreads) partial = norm_combine<kKind>(partial, partials[i]);
  const double total = block_combine<kKind, kFinishThreads>(partial);
  if (threadIdx.x == 0) *norm = static_cast<float>(norm_finish<kKind>(total, p));
}

template <NormKind kKind>
void launch_total_norm(TensorList tensors, double norm_type, const Tensor& norm) {
  const cudaStream_t stream = current_stream();
  int64_t num_partials = 0;
  for (const Tensor& t : tensors) num_partials += multi_tensor::num_chunks(t.numel(), kChunk);
  const Tensor partials = torch::stable::empty({num_partials}, kDouble, std::nullopt, norm.device());
  double* partials_data = partials.mutable_data_ptr<double>();
  int64_t first_partial = 0;  // where the next launch's blocks write
  auto launch = [&](const Table& table, int dtype) {
    const double p = norm_type;
    dispatch_float_types(static_cast<ScalarType>(dtype), [&](auto element) {
      block_partials_kernel<kKind, decltype(element)>
          <<<table.num_blocks(), kThreads, 0, stream>>>(table, partials_data, first_partial, p);
    });
    check_launch();
    first_partial += table.num_blocks();
  };
  multi_tensor::TableFiller<Table, decltype(launch)> filler(kChunk, launch);
  for (const Tensor& t : tensors) filler.add(NormArgs{t.const_data_ptr(), 0}, t.numel(), static_cast<int>(t.scalar_type()));
  filler.flush();
  finish_kernel<kKind><<<1, kFinishThreads, 0, stream>>>(partials_data, num_partials, norm_type, norm.mutable_data_ptr<float>());
  check_launch();
}

}  // namespace

Tensor total_norm_cuda(TensorList tensors, double norm_type) {
  check_total_norm_args(tensors, norm_type);
  const torch::stable::accelerator::DeviceGuard device_guard(tensors[0].get_device_index());
  Tensor norm = empty_float({}, tensors[0]);
  switch (norm_kind(norm_type)) {
    case NormKind::kTwo: launch_total_norm<NormKind::kTwo>(tensors, norm_type, norm); break;
    case NormKind::kOne: launch_total_norm<NormKind::kOne>(tensors, norm_type, norm); break;
    case NormKind::kInf: launch_total_norm<NormKind::kInf>(tensors, norm_type, norm); break;
    case NormKind::kGeneral: launch_total_norm<NormKind::kGeneral>(tensors, norm_type, norm); break;
  }
  return norm;
}

}  // namespace fused_optim
