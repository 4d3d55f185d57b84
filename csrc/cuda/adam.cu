// CUDA Adam/AdamW: one multi-tensor launch per few hundred tensors of a group.
//
// The launch's tensor table (pointers, sizes, where each tensor's chunks start) travels as a __grid_constant__
// kernel parameter (up to 32 KB since CUDA 12.1 on Volta and newer): no host-to-device copy, nothing to keep alive,
// and a CUDA graph captures it by value. Each block owns one chunk of one tensor, found by binary search over the
// chunk prefix sums. Thread 0 derives the tensor's scalars (bias corrections from the step count on the device,
// lr, 1/grad_scale) once per block; every thread then moves 8 elements per iteration with 16-byte loads when
// all of the tensor's arrays are 16-byte aligned. The element math is fused_optim/adam.h, shared with the CPU.
#include <algorithm>
#include <cstdint>

#include "ops/torch_api.h"
#include "launch.cuh"

#include "ops/adam.h"
#include "ops/dispatch.h"
#include "fused_optim/rounding.h"
#include "multi_tensor.cuh"

namespace fused_optim {
namespace {

// Measured on an H100 (337 M params, % of copy bandwidth, fp32 / bf16+master / bf16): 256 threads x 32 K elements
// 94/93/95, 256 x 8 K 96/95/97, 128 x 4 K 96/93/96, 512 x 64 K 94/93/95, 512 x 16 K 97/96/97 (chosen).
constexpr int kThreads = 512;
using multi_tensor::kVec;  // elements per thread per iteration: one 16 B load of bf16, two of fp32
constexpr int64_t kChunk = 16 * 1024;   // elements per block: 4 iterations of 512 threads x 8
constexpr int kMaxTensors = 320;        // 320 x 68 B of table: well inside the 32 KB parameter limit

struct TensorArgs {
  void* param;
  const void* grad;
  void* exp_avg;  // moment_t: float, or bf16 (moments="bf16")
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  void* master;  // master_t: a float copy or an int16/int8 remainder (WriteBack)
  float* step;
  int64_t numel;
};

struct LaunchTable {
  TensorArgs tensors[kMaxTensors];
  int32_t first_chunk[kMaxTensors + 1];  // prefix sums of chunk counts; first_chunk[num_tensors] = grid size
  int32_t num_tensors;
  int32_t first_tensor_index;  // index in the group of tensors[0]: keys the stochastic-rounding stream
};

using multi_tensor::aligned16;
using multi_tensor::load_vec;
using multi_tensor::store_vec;

template <typename param_t, typename grad_t, typename moment_t, bool kAmsgrad, WriteBack kWrite>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(const __grid_constant__ LaunchTable table, const AdamHyper hyper, const double lr,
                const float* __restrict__ lr_tensor, const float* __restrict__ grad_scale,
                const float* __restrict__ found_inf, const uint32_t seed) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // GradScaler found inf/NaN: skip, touch nothing

  // The block's tensor: the last one whose first chunk is at or before this block.
  int lo = 0, hi = table.num_tensors;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (table.first_chunk[mid] <= static_cast<int32_t>(blockIdx.x)) lo = mid; else hi = mid;
  }
  const TensorArgs& t = table.tensors[lo];
  const int64_t begin = static_cast<int64_t>(blockIdx.x - table.first_chunk[lo]) * kChunk;  // int64: numel > 2^31
  const int64_t end = min(begin + kChunk, t.numel);

  __shared__ AdamScalars shared_scalars;
  __shared__ uint32_t shared_stream;
  if (threadIdx.x == 0) {
    const float step = *t.step + 1.0f;
    shared_scalars = adam_scalars(hyper, lr_tensor != nullptr ? static_cast<double>(*lr_tensor) : lr, step,
                                  grad_scale != nullptr ? *grad_scale : 1.0f);
    shared_stream = stream_key(seed, static_cast<uint32_t>(table.first_tensor_index + lo), static_cast<uint32_t>(step));
  }
  __syncthreads();
  const AdamScalars s = shared_scalars;
  const uint32_t stream = shared_stream;

  auto* param = static_cast<param_t*>(t.param);
  const auto* grad = static_cast<const grad_t*>(t.grad);
  auto* master = static_cast<master_t<kWrite>*>(t.master);
  auto* exp_avg = static_cast<moment_t*>(t.exp_avg);
  auto* exp_avg_sq = static_cast<moment_t*>(t.exp_avg_sq);
  auto* max_exp_avg_sq = static_cast<moment_t*>(t.max_exp_avg_sq);
  // bf16 moments' random bits (rounding.h): one draw for exp_avg and exp_avg_sq, one for max_exp_avg_sq
  constexpr bool kBf16Moments = std::is_same_v<moment_t, c10::BFloat16>;
  const uint32_t stream0 = moment_stream(stream, 0), stream1 = moment_stream(stream, 1);

  auto scalar_update = [&](int64_t i) {
    const float p = multi_tensor::load_param_at<kWrite>(param, master, i);
    float m = static_cast<float>(exp_avg[i]), v = static_cast<float>(exp_avg_sq[i]);
    float max_v = kAmsgrad ? static_cast<float>(max_exp_avg_sq[i]) : 0.0f;
    const float updated = adam_update<kAmsgrad>(p, static_cast<float>(grad[i]), m, v, max_v, s);
    const uint32_t bits = kBf16Moments ? moment_bits(stream0, i) : 0u;
    exp_avg[i] = to_moment<moment_t>(m, bits);
    exp_avg_sq[i] = to_moment<moment_t>(v, bits >> 16);
    if (kAmsgrad) max_exp_avg_sq[i] = to_moment<moment_t>(max_v, kBf16Moments ? moment_bits(stream1, i) : 0u);
    multi_tensor::store_param_at<kWrite>(param, master, i, updated, stream);
  };

  const bool vectorizable = aligned16(param) && aligned16(grad) && aligned16(exp_avg) && aligned16(exp_avg_sq) &&
                            (!kAmsgrad || aligned16(max_exp_avg_sq)) && (master == nullptr || aligned16(master));
  int64_t scalar_begin = begin;
  if (vectorizable) {
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t i = begin + threadIdx.x * kVec; i < vec_end; i += kThreads * kVec) {
      float p[kVec], g[kVec], m[kVec], v[kVec], vmax[kVec];
      // Issue every load before the first use: five independent 16-byte streams in flight per thread.
      multi_tensor::load_param_vec<kWrite>(param, master, i, p);
      load_vec(grad + i, g);
      load_vec(exp_avg + i, m);
      load_vec(exp_avg_sq + i, v);
      if (kAmsgrad) load_vec(max_exp_avg_sq + i, vmax);
#pragma unroll
      for (int k = 0; k < kVec; ++k) p[k] = adam_update<kAmsgrad>(p[k], g[k], m[k], v[k], vmax[k], s);
      uint32_t bits[kVec], max_bits[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        bits[k] = kBf16Moments ? moment_bits(stream0, i + k) : 0u;
        max_bits[k] = kBf16Moments && kAmsgrad ? moment_bits(stream1, i + k) : 0u;
      }
      multi_tensor::store_moment_vec(exp_avg, i, m, bits, 0);
      multi_tensor::store_moment_vec(exp_avg_sq, i, v, bits, 16);
      if (kAmsgrad) multi_tensor::store_moment_vec(max_exp_avg_sq, i, vmax, max_bits, 0);
      multi_tensor::store_param_vec<kWrite>(param, master, i, p, stream);
    }
    scalar_begin = vec_end;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += kThreads) scalar_update(i);
}

// Runs after the update kernel on the same stream, so every block of it read the old count.
__global__ void increment_steps(const __grid_constant__ LaunchTable table, const float* __restrict__ found_inf) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= table.num_tensors || (found_inf != nullptr && *found_inf != 0.0f)) return;
  *table.tensors[t].step += 1.0f;
}

// Everything a launch needs besides the table and the template arguments.
struct LaunchArgs {
  AdamHyper hyper;
  double lr;
  const float* lr_tensor;
  const float* grad_scale;
  const float* found_inf;
  uint32_t seed;
  cudaStream_t stream;
};

template <typename param_t, typename grad_t, typename moment_t, bool kAmsgrad, WriteBack kWrite>
void launch_kernel(const LaunchTable& table, const LaunchArgs& a) {
  const int blocks = table.first_chunk[table.num_tensors];
  if (blocks == 0) return;
  adam_kernel<param_t, grad_t, moment_t, kAmsgrad, kWrite>
      <<<blocks, kThreads, 0, a.stream>>>(table, a.hyper, a.lr, a.lr_tensor, a.grad_scale, a.found_inf, a.seed);
  check_launch();
}

void launch_dtypes(ScalarType param_dtype, ScalarType grad_dtype, ScalarType moment_dtype, bool amsgrad,
                   WriteBack write, const LaunchTable& table, const LaunchArgs& a) {
  dispatch_param_grad_types(param_dtype, grad_dtype, [&](auto param, auto grad) {
    using param_t = decltype(param);
    using grad_t = decltype(grad);
    dispatch_moment_type(moment_dtype, [&](auto moment) {
      using moment_t = decltype(moment);
      dispatch_write_back<param_t>(write, [&](auto kind) {
        constexpr WriteBack kWrite = decltype(kind)::value;
        amsgrad ? launch_kernel<param_t, grad_t, moment_t, true, kWrite>(table, a)
                : launch_kernel<param_t, grad_t, moment_t, false, kWrite>(table, a);
      });
    });
  });
}

}  // namespace

void adam_step_cuda(FUSED_OPTIM_ADAM_ARGS) {
  const std::vector<Tensor> matched_grads = check_adam_args(FUSED_OPTIM_ADAM_ARG_NAMES);
  if (params.empty()) return;
  const torch::stable::accelerator::DeviceGuard device_guard(params[0].get_device_index());
  if (!moment_scales.empty()) {
    adam_int8_step_cuda(FUSED_OPTIM_ADAM_ARG_NAMES, matched_grads);
    return;
  }
  const bool master = !master_params.empty();
  const WriteBack write = write_back_of(stochastic_rounding, master_params);
  const LaunchArgs args{AdamHyper{beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize},
                        lr,
                        optional_ptr(lr_tensor),
                        optional_ptr(grad_scale),
                        optional_ptr(found_inf),
                        static_cast<uint32_t>(seed),
                        current_stream()};

  // One launch covers consecutive tensors of one (param dtype, grad dtype) pair, up to kMaxTensors of them.
  LaunchTable table;
  table.num_tensors = 0;
  table.first_tensor_index = 0;
  table.first_chunk[0] = 0;
  auto flush = [&](ScalarType param_dtype, ScalarType grad_dtype) {
    if (table.num_tensors == 0) return;
    launch_dtypes(param_dtype, grad_dtype, exp_avgs[0].scalar_type(), amsgrad, write, table, args);
    increment_steps<<<(table.num_tensors + kThreads - 1) / kThreads, kThreads, 0, args.stream>>>(table, args.found_inf);
    check_launch();
    table.first_tensor_index += table.num_tensors;
    table.num_tensors = 0;
  };
  for (size_t i = 0; i < params.size(); ++i) {
    const ScalarType param_dtype = params[i].scalar_type(), grad_dtype = matched_grads[i].scalar_type();
    if (i > 0 && (param_dtype != params[i - 1].scalar_type() || grad_dtype != matched_grads[i - 1].scalar_type())) {
      flush(params[i - 1].scalar_type(), matched_grads[i - 1].scalar_type());
    }
    const int n = table.num_tensors;
    const int64_t numel = params[i].numel();
    table.tensors[n] = TensorArgs{params[i].mutable_data_ptr(),
                                  matched_grads[i].const_data_ptr(),
                                  exp_avgs[i].mutable_data_ptr(),
                                  exp_avg_sqs[i].mutable_data_ptr(),
                                  amsgrad ? max_exp_avg_sqs[i].mutable_data_ptr() : nullptr,
                                  master ? master_params[i].mutable_data_ptr() : nullptr,
                                  data_as<float>(steps[i]),
                                  numel};
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    FO_CHECK(table.first_chunk[n] + chunks < INT32_MAX, "adam_step_: a tensor of ", numel, " elements is too large");
    table.first_chunk[n + 1] = table.first_chunk[n] + static_cast<int32_t>(chunks);
    table.num_tensors = n + 1;
    if (table.num_tensors == kMaxTensors || table.first_chunk[n + 1] > INT32_MAX / 2) {
      flush(param_dtype, grad_dtype);
    }
  }
  flush(params.back().scalar_type(), matched_grads.back().scalar_type());
}

}  // namespace fused_optim
