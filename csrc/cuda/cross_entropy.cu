// CUDA cross-entropy forward (+ the gradient in the same launch): one block per row. Pass 1 streams the row once
// with 16-byte loads, each thread keeping an online (max, sum of exp) and weighted gap below the max, merged across
// the block by warp shuffles; pass 2 streams the row again (from L2: at most a few hundred rows are in flight)
// and writes the gradient, possibly over the logits themselves. The row math is fused_optim/cross_entropy.h,
// which the CPU kernel and tests share.
#include <algorithm>
#include <cstdint>

#include "ops/torch_api.h"
#include "launch.cuh"

#include "ops/cross_entropy.h"

namespace fused_optim {
namespace {

constexpr int kVecBytes = 16;

template <typename T>
struct alignas(kVecBytes) Vec {
  static constexpr int kSize = kVecBytes / sizeof(T);
  T values[kSize];
};

__device__ __forceinline__ float class_weight_at(const float* class_weight, int64_t j) {
  return class_weight != nullptr ? class_weight[j] : 1.0f;
}

// Merges every thread's running values; returns them to every thread of the block.
__device__ void block_reduce(OnlineLogSumExp& acc, OnlineWeightedGap& gap) {
  __shared__ float shared_max[32], shared_sum[32], shared_gap[32], shared_weight[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    OnlineLogSumExp other;
    other.max = __shfl_xor_sync(0xffffffffu, acc.max, offset);
    other.sum = __shfl_xor_sync(0xffffffffu, acc.sum, offset);
    OnlineWeightedGap other_gap;
    other_gap.gap = __shfl_xor_sync(0xffffffffu, gap.gap, offset);
    other_gap.weight = __shfl_xor_sync(0xffffffffu, gap.weight, offset);
    const float max = acc.max;
    acc.merge(other);
    gap.merge(other_gap, max, other.max, acc.max);
  }
  if (lane == 0) {
    shared_max[warp] = acc.max, shared_sum[warp] = acc.sum;
    shared_gap[warp] = gap.gap, shared_weight[warp] = gap.weight;
  }
  __syncthreads();
  acc = OnlineLogSumExp{};
  gap = OnlineWeightedGap{};
  for (int w = 0; w < num_warps; ++w) {  // every thread merges the few warp results itself: no second broadcast
    OnlineLogSumExp other;
    other.max = shared_max[w], other.sum = shared_sum[w];
    const float max = acc.max;
    acc.merge(other);
    gap.merge(OnlineWeightedGap{shared_gap[w], shared_weight[w]}, max, other.max, acc.max);
  }
}

// Pass 1 over a row (or a rank's shard of one): the capped logits' (max, sum of exp(z - max)) and weighted gap below
// the max, each thread's merged across the block and returned to every thread. Whole vectors up to vector_end, then
// the tail.
template <typename T>
__device__ void reduce_row(const T* x, const float* class_weight, int64_t num_classes, int64_t vector_end,
                           float softcap, OnlineLogSumExp& acc, OnlineWeightedGap& gap) {
  using V = Vec<T>;
  for (int64_t j = threadIdx.x * V::kSize; j < vector_end; j += blockDim.x * V::kSize) {
    const V v = *reinterpret_cast<const V*>(x + j);
    float z[V::kSize], w[V::kSize];
#pragma unroll
    for (int k = 0; k < V::kSize; ++k) {
      z[k] = capped_logit(static_cast<float>(v.values[k]), softcap);
      w[k] = class_weight_at(class_weight, j + k);
    }
    add_logits(z, w, acc, gap);
  }
  for (int64_t j = vector_end + threadIdx.x; j < num_classes; j += blockDim.x) {
    const float z = capped_logit(static_cast<float>(x[j]), softcap);
    const float max = acc.max;
    acc.add(z);
    gap.rise(max, acc.max);
    gap.add(z, class_weight_at(class_weight, j), acc.max);
  }
  block_reduce(acc, gap);
}

template <typename T>
__global__ void cross_entropy_forward_kernel(const T* logits,  // (N, V), rows row_stride apart; not restrict: grad may be the same memory
                                             const int64_t* __restrict__ target,  // (N,)
                                             const float* __restrict__ class_weight,  // (V,) or null
                                             const float* __restrict__ scales,    // (ce_scale, z_scale, weight_sum)
                                             T* grad,                             // (N, V) or null; may be logits
                                             float* __restrict__ loss,            // (N,)
                                             float* __restrict__ lse_out,         // (N,)
                                             int64_t num_classes, int64_t row_stride, int64_t ignore_index,
                                             float label_smoothing, float z_loss, float softcap, bool vectorized) {
  using V = Vec<T>;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  T* g = grad == nullptr ? nullptr : grad + row * row_stride;
  const int64_t t = target[row];
  // Whole vectors first (when the row is 16-byte aligned), then the scalar tail.
  const int64_t vector_end = vectorized ? num_classes / V::kSize * V::kSize : 0;

  if (t == ignore_index) {  // no loss, no gradient, never a NaN
    if (threadIdx.x == 0) loss[row] = 0.0f, lse_out[row] = 0.0f;
    if (g == nullptr) return;
    for (int64_t j = threadIdx.x * V::kSize; j < vector_end; j += blockDim.x * V::kSize) {
      *reinterpret_cast<V*>(g + j) = V{};
    }
    for (int64_t j = vector_end + threadIdx.x; j < num_classes; j += blockDim.x) g[j] = T(0.0f);
    return;
  }
  CUDA_KERNEL_ASSERT(t >= 0 && t < num_classes && "Target is out of bounds");

  OnlineLogSumExp acc;
  OnlineWeightedGap gap;
  reduce_row(x, class_weight, num_classes, vector_end, softcap, acc, gap);

  const float log_sum = logf(acc.sum), lse = acc.max + log_sum, inv_sum = 1.0f / acc.sum;
  const float target_weight = class_weight_at(class_weight, t);
  const CrossEntropyOptions options{label_smoothing, z_loss, softcap, scales[0], scales[1], scales[2], num_classes};
  if (threadIdx.x == 0) {
    lse_out[row] = lse;
    loss[row] = cross_entropy_row_loss(acc.max, log_sum, capped_logit(static_cast<float>(x[t]), softcap),
                                       target_weight, gap.gap, options);
  }
  if (g == nullptr) return;
  // Every thread has read x[t] (thread 0) and its own elements before writing over them: the only element read
  // by another thread is x[t], and thread 0 has read it above, before this barrier.
  __syncthreads();
  const CrossEntropyRowGrad row_grad = cross_entropy_row_grad(lse, target_weight, options);
  for (int64_t j = threadIdx.x * V::kSize; j < vector_end; j += blockDim.x * V::kSize) {
    const V v = *reinterpret_cast<const V*>(x + j);
    V out;
#pragma unroll
    for (int k = 0; k < V::kSize; ++k) {
      const float z = capped_logit(static_cast<float>(v.values[k]), softcap);
      const float p = expf(z - acc.max) * inv_sum;
      out.values[k] = T(row_grad.grad(p, z, class_weight_at(class_weight, j + k), j + k == t));
    }
    *reinterpret_cast<V*>(g + j) = out;
  }
  for (int64_t j = vector_end + threadIdx.x; j < num_classes; j += blockDim.x) {
    const float z = capped_logit(static_cast<float>(x[j]), softcap);
    g[j] = T(row_grad.grad(expf(z - acc.max) * inv_sum, z, class_weight_at(class_weight, j), j == t));
  }
}

// Pass 1 of a vocabulary-parallel row (cross_entropy.h, ShardRowStats): the first pass of the forward kernel over
// this rank's shard of the row, plus the target's capped logit when the target is in the shard.
template <typename T>
__global__ void shard_stats_kernel(const T* __restrict__ logits,  // (N, V_shard), rows row_stride apart
                                   const int64_t* __restrict__ target,  // (N,) indices into the whole vocabulary
                                   const float* __restrict__ class_weight,  // (V_shard,) or null
                                   ShardRowStats* __restrict__ stats,       // (N,)
                                   int64_t shard_classes, int64_t row_stride, int64_t class_start,
                                   int64_t num_classes, int64_t ignore_index, float softcap, bool vectorized) {
  using V = Vec<T>;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  const int64_t t = target[row];
  if (t == ignore_index) {
    if (threadIdx.x == 0) stats[row] = ShardRowStats{0.0f, 0.0f, 0.0f, 0.0f};
    return;
  }
  CUDA_KERNEL_ASSERT(t >= 0 && t < num_classes && "Target is out of bounds");
  const int64_t vector_end = vectorized ? shard_classes / V::kSize * V::kSize : 0;
  OnlineLogSumExp acc;
  OnlineWeightedGap gap;
  reduce_row(x, class_weight, shard_classes, vector_end, softcap, acc, gap);
  if (threadIdx.x == 0) {
    const int64_t local_t = t - class_start;
    const bool here = local_t >= 0 && local_t < shard_classes;
    stats[row] = ShardRowStats{acc.max, acc.sum,
                               here ? capped_logit(static_cast<float>(x[local_t]), softcap) : 0.0f, gap.gap};
  }
}

// Pass 2: the shard's gradient from the row's combined coefficients (ShardRowCoefs); grad may be the logits.
template <typename T>
__global__ void shard_grad_kernel(T* grad,          // (N, V_shard) like the logits; not restrict: may be logits
                                  const T* logits,  // (N, V_shard)
                                  const int64_t* __restrict__ target,      // (N,)
                                  const float* __restrict__ class_weight,  // (V_shard,) or null
                                  const ShardRowCoefs* __restrict__ coefs,  // (N,)
                                  int64_t shard_classes, int64_t row_stride, int64_t class_start,
                                  int64_t ignore_index, float softcap, bool vectorized) {
  using V = Vec<T>;
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  T* g = grad + row * row_stride;
  const int64_t t = target[row];
  const bool kept = t != ignore_index;
  const ShardRowCoefs c = kept ? coefs[row] : ShardRowCoefs{};
  const CrossEntropyRowGrad row_grad = c.row_grad(softcap);
  const int64_t local_t = t - class_start;
  // each element is read and then written by the same thread: in place is safe
  const auto grad_at = [&](float xj, int64_t j) {
    if (!kept) return 0.0f;
    const float z = capped_logit(xj, softcap);
    return row_grad.grad(expf(z - c.max) * c.inv_sum, z, class_weight_at(class_weight, j), j == local_t);
  };
  const int64_t vector_end = vectorized ? shard_classes / V::kSize * V::kSize : 0;
  for (int64_t j = threadIdx.x * V::kSize; j < vector_end; j += blockDim.x * V::kSize) {
    const V v = *reinterpret_cast<const V*>(x + j);
    V out;
#pragma unroll
    for (int k = 0; k < V::kSize; ++k) out.values[k] = T(grad_at(static_cast<float>(v.values[k]), j + k));
    *reinterpret_cast<V*>(g + j) = out;
  }
  for (int64_t j = vector_end + threadIdx.x; j < shard_classes; j += blockDim.x) {
    g[j] = T(grad_at(static_cast<float>(x[j]), j));
  }
}

// grad (N, V) *= row_scale: blocks of rows x column chunks, each block reading its row's scale and leaving the
// row unread when it is exactly 1 (the gradient of a plain loss.backward()).
template <typename T>
__global__ void scale_grad_kernel(T* grad, const float* __restrict__ row_scale, bool per_row, int64_t num_classes,
                                  int64_t row_stride) {
  const int64_t row = blockIdx.x;
  const float s = row_scale[per_row ? row : 0];
  if (s == 1.0f) return;
  T* g = grad + row * row_stride;
  for (int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; j < num_classes;
       j += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    g[j] = T(static_cast<float>(g[j]) * s);
  }
}

// Threads per row: enough for a 128K vocabulary to take a few dozen vectors per thread, fewer for short rows.
int threads_for(int64_t num_classes, int vec_size) {
  const int64_t wanted = (num_classes + vec_size - 1) / vec_size;
  int threads = 64;
  while (threads < 1024 && threads < wanted) threads *= 2;
  return threads;
}

bool aligned(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % kVecBytes == 0; }

}  // namespace

std::tuple<Tensor, Tensor> cross_entropy_forward_cuda(FUSED_OPTIM_CROSS_ENTROPY_ARGS) {
  check_cross_entropy_args(logits, target, weight, scales, grad, ignore_index, label_smoothing, z_loss, softcap);
  const torch::stable::accelerator::DeviceGuard device_guard(logits.get_device_index());
  const int64_t num_rows = logits.size(0), num_classes = logits.size(1);
  Tensor loss = empty_float({num_rows}, logits);
  Tensor lse = empty_float({num_rows}, logits);
  if (num_rows == 0) return {loss, lse};
  FO_CHECK(num_rows <= 0x7fffffff, "cross_entropy_forward: at most 2^31 - 1 rows");
  const cudaStream_t stream = current_stream();
  dispatch_float_types(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using V = Vec<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* g = grad.has_value() ? grad->mutable_data_ptr<scalar_t>() : nullptr;
    const bool vectorized = aligned(x) && (g == nullptr || aligned(g)) &&
                            logits.stride(0) * static_cast<int64_t>(sizeof(scalar_t)) % kVecBytes == 0;
    cross_entropy_forward_kernel<scalar_t><<<static_cast<unsigned>(num_rows), threads_for(num_classes, V::kSize), 0,
                                             stream>>>(
        x, target.const_data_ptr<int64_t>(), weight.has_value() ? weight->const_data_ptr<float>() : nullptr,
        scales.const_data_ptr<float>(), g, loss.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(), num_classes,
        logits.stride(0), ignore_index, static_cast<float>(label_smoothing), static_cast<float>(z_loss),
        static_cast<float>(softcap), vectorized);
    check_launch();
  });
  return {loss, lse};
}

void cross_entropy_scale_grad_cuda(const Tensor& grad, const Tensor& row_scale) {
  check_scale_grad_args(grad, row_scale);
  const int64_t num_rows = grad.size(0), num_classes = grad.size(1);
  if (num_rows == 0 || num_classes == 0) return;
  FO_CHECK(num_rows <= 0x7fffffff, "cross_entropy_scale_grad_: at most 2^31 - 1 rows");
  const torch::stable::accelerator::DeviceGuard device_guard(grad.get_device_index());
  constexpr int kThreads = 256;
  const dim3 blocks(static_cast<unsigned>(num_rows),
                    static_cast<unsigned>(std::min<int64_t>((num_classes + kThreads - 1) / kThreads, 64)));
  dispatch_float_types(grad.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scale_grad_kernel<scalar_t><<<blocks, kThreads, 0, current_stream()>>>(
        grad.mutable_data_ptr<scalar_t>(), row_scale.const_data_ptr<float>(), row_scale.numel() != 1, num_classes,
        grad.stride(0));
    check_launch();
  });
}

Tensor cross_entropy_shard_stats_cuda(FUSED_OPTIM_SHARD_STATS_ARGS) {
  check_shard_args("cross_entropy_shard_stats", logits, target, weight, class_start);
  const torch::stable::accelerator::DeviceGuard device_guard(logits.get_device_index());
  const int64_t num_rows = logits.size(0), shard_classes = logits.size(1);
  Tensor stats = empty_float({num_rows, 4}, logits);
  if (num_rows == 0) return stats;
  FO_CHECK(num_rows <= 0x7fffffff, "cross_entropy_shard_stats: at most 2^31 - 1 rows");
  dispatch_float_types(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const bool vectorized = aligned(x) && logits.stride(0) * static_cast<int64_t>(sizeof(scalar_t)) % kVecBytes == 0;
    shard_stats_kernel<scalar_t><<<static_cast<unsigned>(num_rows), threads_for(shard_classes, Vec<scalar_t>::kSize), 0,
                                   current_stream()>>>(
        x, target.const_data_ptr<int64_t>(), weight.has_value() ? weight->const_data_ptr<float>() : nullptr,
        reinterpret_cast<ShardRowStats*>(stats.mutable_data_ptr<float>()), shard_classes, logits.stride(0), class_start,
        num_classes, ignore_index, static_cast<float>(softcap), vectorized);
    check_launch();
  });
  return stats;
}

void cross_entropy_shard_grad_cuda(FUSED_OPTIM_SHARD_GRAD_ARGS) {
  check_shard_grad_args(grad, logits, target, weight, row_coefs, class_start, ignore_index, softcap);
  const int64_t num_rows = logits.size(0), shard_classes = logits.size(1);
  if (num_rows == 0 || shard_classes == 0) return;
  FO_CHECK(num_rows <= 0x7fffffff, "cross_entropy_shard_grad_: at most 2^31 - 1 rows");
  const torch::stable::accelerator::DeviceGuard device_guard(logits.get_device_index());
  dispatch_float_types(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const bool vectorized = aligned(x) && aligned(g) &&
                            logits.stride(0) * static_cast<int64_t>(sizeof(scalar_t)) % kVecBytes == 0;
    shard_grad_kernel<scalar_t><<<static_cast<unsigned>(num_rows), threads_for(shard_classes, Vec<scalar_t>::kSize), 0,
                                  current_stream()>>>(
        g, x, target.const_data_ptr<int64_t>(), weight.has_value() ? weight->const_data_ptr<float>() : nullptr,
        reinterpret_cast<const ShardRowCoefs*>(row_coefs.const_data_ptr<float>()), shard_classes, logits.stride(0),
        class_start, ignore_index, static_cast<float>(softcap), vectorized);
    check_launch();
  });
}

}  // namespace fused_optim
