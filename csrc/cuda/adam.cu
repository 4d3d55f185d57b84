// CUDA Adam/AdamW: one multi-tensor launch (csrc/cuda/multi_tensor.cuh) per few hundred tensors of a group and
// dtype pair.
//
// Each block owns one chunk of one tensor; its thread 0 derives the tensor's scalars (bias corrections from the
// step count on the device, lr, 1/grad_scale) once per block, and every thread then moves 8 elements per iteration
// with 16-byte loads when all of the tensor's arrays are 16-byte aligned. The element math is fused_optim/adam.h,
// shared with the CPU. A second, tiny launch increments the step counts after every update launch of the call has
// read them. moments="int8" runs adam_int8.cu's kernel.
#include <cstdint>

#include "ops/torch_api.h"
#include "launch.cuh"

#include "ops/adam.h"
#include "ops/dispatch.h"
#include "fused_optim/rounding.h"
#include "adam_block.cuh"
#include "multi_tensor.cuh"

namespace fused_optim {
namespace {

// Measured on an H100 (337 M params, % of copy bandwidth, fp32 / bf16+master / bf16): 256 threads x 32 K elements
// 94/93/95, 256 x 8 K 96/95/97, 128 x 4 K 96/93/96, 512 x 64 K 94/93/95, 512 x 16 K 97/96/97 (chosen).
constexpr int kThreads = 512;
using multi_tensor::kVec;  // elements per thread per iteration: one 16 B load of bf16, two of fp32
constexpr int64_t kChunk = 16 * 1024;  // elements per block: 4 iterations of 512 threads x 8

struct TensorArgs {
  void* param;
  const void* grad;
  void* exp_avg;  // moment_t: float, or bf16 (moments="bf16")
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  void* master;  // master_t: a float copy or an int16/int8 remainder (WriteBack)
  const float* step;
  uint32_t index;  // in the caller's list: keys the stochastic-rounding stream
  int64_t numel;
};
using Table = multi_tensor::LaunchTable<TensorArgs>;

using multi_tensor::aligned16;
using multi_tensor::load_vec;

template <typename param_t, typename grad_t, typename moment_t, bool kAmsgrad, WriteBack kWrite>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(const __grid_constant__ Table table, const AdamHyper hyper, const DeviceLr lr,
                const float* __restrict__ grad_scale,
                const float* __restrict__ found_inf, const uint32_t seed) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // GradScaler found inf/NaN: skip, touch nothing
  const multi_tensor::BlockWork work = multi_tensor::block_work(table, kChunk);
  const TensorArgs& t = table.tensors[work.tensor];

  const AdamBlockScalars block = adam_block_scalars(hyper, lr, grad_scale, seed, t.step, t.index);
  const AdamScalars s = block.scalars;
  const uint32_t stream = block.stream;

  auto* param = static_cast<param_t*>(t.param);
  const auto* grad = static_cast<const grad_t*>(t.grad);
  auto* master = static_cast<master_t<kWrite>*>(t.master);
  auto* exp_avg = static_cast<moment_t*>(t.exp_avg);
  auto* exp_avg_sq = static_cast<moment_t*>(t.exp_avg_sq);
  auto* max_exp_avg_sq = static_cast<moment_t*>(t.max_exp_avg_sq);
  // bf16 moments' random bits (rounding.h): one draw for exp_avg and exp_avg_sq, one for max_exp_avg_sq
  constexpr bool kBf16Moments = std::is_same_v<moment_t, c10::BFloat16>;
  const uint32_t stream0 = moment_stream(stream, 0), stream1 = moment_stream(stream, 1);

  const bool vectorizable = aligned16(param) && aligned16(grad) && aligned16(exp_avg) && aligned16(exp_avg_sq) &&
                            (!kAmsgrad || aligned16(max_exp_avg_sq)) && (master == nullptr || aligned16(master));
  multi_tensor::for_each_element<kThreads>(
      work, vectorizable,
      [&](int64_t i) {
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
      },
      [&](int64_t i) {
        const float p = multi_tensor::load_param_at<kWrite>(param, master, i);
        float m = static_cast<float>(exp_avg[i]), v = static_cast<float>(exp_avg_sq[i]);
        float max_v = kAmsgrad ? static_cast<float>(max_exp_avg_sq[i]) : 0.0f;
        const float updated = adam_update<kAmsgrad>(p, static_cast<float>(grad[i]), m, v, max_v, s);
        const uint32_t bits = kBf16Moments ? moment_bits(stream0, i) : 0u;
        exp_avg[i] = to_moment<moment_t>(m, bits);
        exp_avg_sq[i] = to_moment<moment_t>(v, bits >> 16);
        if (kAmsgrad) max_exp_avg_sq[i] = to_moment<moment_t>(max_v, kBf16Moments ? moment_bits(stream1, i) : 0u);
        multi_tensor::store_param_at<kWrite>(param, master, i, updated, stream);
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
  const AdamHyper hyper{beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize};
  const cudaStream_t stream = current_stream();
  const DeviceLr lr_source = device_lr(lr, lr_tensor);
  const float* scale_ptr = optional_ptr(grad_scale);
  const float* found_inf_ptr = optional_ptr(found_inf);
  const auto launch = [&](const Table& table, int key) {
    multi_tensor::dispatch_dtype_pair(key, [&](auto param, auto grad) {
      using param_t = decltype(param);
      using grad_t = decltype(grad);
      dispatch_moment_type(exp_avgs[0].scalar_type(), [&](auto moment) {
        using moment_t = decltype(moment);
        dispatch_write_back<param_t>(write, [&](auto kind) {
          constexpr WriteBack kWrite = decltype(kind)::value;
          const auto kernel = amsgrad ? adam_kernel<param_t, grad_t, moment_t, true, kWrite>
                                      : adam_kernel<param_t, grad_t, moment_t, false, kWrite>;
          kernel<<<table.num_blocks(), kThreads, 0, stream>>>(table, hyper, lr_source, scale_ptr, found_inf_ptr,
                                                              static_cast<uint32_t>(seed));
          check_launch();
        });
      });
    });
  };
  multi_tensor::TableFiller<Table, decltype(launch)> filler(kChunk, launch);
  for (size_t i = 0; i < params.size(); ++i) {
    filler.add(TensorArgs{params[i].mutable_data_ptr(), matched_grads[i].const_data_ptr(),
                          exp_avgs[i].mutable_data_ptr(), exp_avg_sqs[i].mutable_data_ptr(),
                          amsgrad ? max_exp_avg_sqs[i].mutable_data_ptr() : nullptr,
                          master ? master_params[i].mutable_data_ptr() : nullptr, data_as<const float>(steps[i]),
                          static_cast<uint32_t>(i), 0},
               params[i].numel(), multi_tensor::dtype_pair(params[i].scalar_type(), matched_grads[i].scalar_type()));
  }
  filler.flush();
  multi_tensor::increment_steps(steps, found_inf_ptr, stream);
}

}  // namespace fused_optim
