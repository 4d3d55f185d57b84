// CUDA Lion: one multi-tensor launch (csrc/cuda/multi_tensor.cuh) per few hundred tensors of a group and dtype pair.
//
// Each block owns one chunk of one tensor; it derives the tensor's scalars (lr, 1/grad_scale, the random stream of
// stochastic rounding from the step count on the device) and every thread then moves 8 elements per iteration with
// 16-byte loads and stores when all of the tensor's arrays are 16-byte aligned. The element math is
// fused_optim/lion.h, shared with the CPU. A second, tiny launch increments the step counts after every update
// launch of the call has read them. With moments="int8" the moment is int8 codes (int8_codes.cuh's
// step_signed_codes).
#include <cstdint>

#include "ops/torch_api.h"
#include "launch.cuh"

#include "fused_optim/rounding.h"
#include "ops/lion.h"
#include "int8_codes.cuh"
#include "multi_tensor.cuh"

namespace fused_optim {
namespace {

using multi_tensor::kVec;

constexpr int kThreads = 512;          // as adam.cu, measured there on an H100
constexpr int64_t kChunk = 16 * 1024;  // elements per block: 4 iterations of 512 threads x 8
static_assert(kChunk % kInt8Block == 0, "a chunk starts at a block of codes");

struct TensorArgs {
  void* param;
  const void* grad;
  void* exp_avg;     // moment_t: float, or bf16 (moments="bf16"); int8 codes (moments="int8")
  void* master;      // null without master weights; master_t: a float copy or an int16/int8 remainder (WriteBack)
  uint16_t* scales;  // moments="int8": exp_avg's bf16 block scales, ceil(numel / 64)
  const float* step;
  int32_t index;  // in the caller's list: keys the stochastic-rounding stream, as on the CPU
  int64_t numel;
};
using Table = multi_tensor::LaunchTable<TensorArgs>;

// Everything a launch needs besides the table and the template arguments.
struct LaunchArgs {
  double beta1, beta2, weight_decay;
  DeviceLr lr;
  bool maximize;
  uint32_t seed;
  const float* grad_scale;
  const float* found_inf;
};

// A tensor's scalars (every thread reads the same few: one broadcast load each, cheaper than a trip through shared
// memory) and its random stream (rounding.h), keyed by the count after this step, as on the CPU.
__device__ __forceinline__ LionScalars tensor_scalars(const LaunchArgs& a) {
  return lion_scalars(a.beta1, a.beta2, a.weight_decay, a.maximize, a.lr.read(),
                      a.grad_scale != nullptr ? *a.grad_scale : 1.0f);
}

__device__ __forceinline__ uint32_t tensor_stream(const LaunchArgs& a, const TensorArgs& t) {
  return stream_key(a.seed, static_cast<uint32_t>(t.index), static_cast<uint32_t>(*t.step + 1.0f));
}

template <typename param_t, typename grad_t, typename moment_t, WriteBack kWrite>
__global__ void __launch_bounds__(kThreads) lion_kernel(const __grid_constant__ Table table, const LaunchArgs a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // GradScaler found inf/NaN: touch nothing
  const multi_tensor::BlockWork work = multi_tensor::block_work(table, kChunk);
  const TensorArgs& t = table.tensors[work.tensor];
  const LionScalars s = tensor_scalars(a);
  constexpr bool kBf16Moment = std::is_same_v<moment_t, c10::BFloat16>;
  const uint32_t stream = kWrite == WriteBack::kStochastic || kBf16Moment ? tensor_stream(a, t) : 0;
  const uint32_t moment_draw = moment_stream(stream, 0);  // a bf16 moment's rounding bits (rounding.h)
  auto* param = static_cast<param_t*>(t.param);
  const auto* grad = static_cast<const grad_t*>(t.grad);
  auto* exp_avg = static_cast<moment_t*>(t.exp_avg);
  auto* master = static_cast<master_t<kWrite>*>(t.master);
  const bool vectorizable = multi_tensor::aligned16(param) && multi_tensor::aligned16(grad) &&
                            multi_tensor::aligned16(exp_avg) && (master == nullptr || multi_tensor::aligned16(master));
  multi_tensor::for_each_element<kThreads>(
      work, vectorizable,
      [&](int64_t i) {
        float p[kVec], g[kVec], m[kVec];
        // Every load issued before the first use: independent 16-byte streams in flight per thread.
        multi_tensor::load_param_vec<kWrite>(param, master, i, p);
        multi_tensor::load_vec(grad + i, g);
        multi_tensor::load_vec(exp_avg + i, m);
        uint32_t bits[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          p[k] = lion_update(p[k], g[k], m[k], s);
          bits[k] = kBf16Moment ? moment_bits(moment_draw, i + k) : 0u;
        }
        multi_tensor::store_moment_vec(exp_avg, i, m, bits, 0);
        multi_tensor::store_param_vec<kWrite>(param, master, i, p, stream);
      },
      [&](int64_t i) {
        const float p = multi_tensor::load_param_at<kWrite>(param, master, i);
        float m = static_cast<float>(exp_avg[i]);
        const float updated = lion_update(p, static_cast<float>(grad[i]), m, s);
        exp_avg[i] = to_moment<moment_t>(m, kBf16Moment ? moment_bits(moment_draw, i) : 0u);
        multi_tensor::store_param_at<kWrite>(param, master, i, updated, stream);
      });
}

// moments="int8": exp_avg as codes (moment_int8.h), dequantized, updated and requantized in one pass.
template <typename param_t, typename grad_t, WriteBack kWrite>
__global__ void __launch_bounds__(kThreads) lion_int8_kernel(const __grid_constant__ Table table, const LaunchArgs a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // GradScaler found inf/NaN: touch nothing
  const multi_tensor::BlockWork work = multi_tensor::block_work(table, kChunk);
  const TensorArgs& t = table.tensors[work.tensor];
  const LionScalars s = tensor_scalars(a);
  const uint32_t stream = tensor_stream(a, t);
  int8_codes::step_signed_codes<kThreads, kWrite>(
      work, static_cast<param_t*>(t.param), static_cast<master_t<kWrite>*>(t.master),
      static_cast<const grad_t*>(t.grad), static_cast<int8_t*>(t.exp_avg), t.scales, moment_stream(stream, 0), stream,
      [&](float& p, float g, float& m) { p = lion_update(p, g, m, s); });
}

}  // namespace

void lion_step_cuda(FUSED_OPTIM_LION_ARGS) {
  const std::vector<Tensor> matched_grads = check_lion_args(FUSED_OPTIM_LION_ARG_NAMES);
  if (params.empty()) return;
  const torch::stable::accelerator::DeviceGuard device_guard(params[0].get_device_index());
  const cudaStream_t stream = current_stream();
  const bool master = !master_params.empty();
  const WriteBack write = write_back_of(stochastic_rounding, master_params);
  const LaunchArgs args{beta1, beta2, weight_decay, device_lr(lr, lr_tensor), maximize, static_cast<uint32_t>(seed),
                        optional_ptr(grad_scale), optional_ptr(found_inf)};
  const bool int8 = !moment_scales.empty();

  auto launch = [&](const Table& table, int key) {
    multi_tensor::dispatch_dtype_pair(key, [&](auto param, auto grad) {
      using param_t = decltype(param);
      if (int8) {
        dispatch_write_back<param_t>(write, [&](auto kind) {
          lion_int8_kernel<param_t, decltype(grad), decltype(kind)::value>
              <<<table.num_blocks(), kThreads, 0, stream>>>(table, args);
          check_launch();
        });
        return;
      }
      dispatch_moment_type(exp_avgs[0].scalar_type(), [&](auto moment) {
        dispatch_write_back<param_t>(write, [&](auto kind) {
          lion_kernel<param_t, decltype(grad), decltype(moment), decltype(kind)::value>
              <<<table.num_blocks(), kThreads, 0, stream>>>(table, args);
          check_launch();
        });
      });
    });
  };
  multi_tensor::TableFiller<Table, decltype(launch)> filler(kChunk, launch);
  for (size_t i = 0; i < params.size(); ++i) {
    filler.add(TensorArgs{params[i].mutable_data_ptr(), matched_grads[i].const_data_ptr(),
                          exp_avgs[i].mutable_data_ptr(), master ? master_params[i].mutable_data_ptr() : nullptr,
                          int8 ? data_as<uint16_t>(moment_scales[i]) : nullptr, data_as<float>(steps[i]),
                          static_cast<int32_t>(i), 0},
               params[i].numel(), multi_tensor::dtype_pair(params[i].scalar_type(), matched_grads[i].scalar_type()));
  }
  filler.flush();
  multi_tensor::increment_steps(steps, args.found_inf, stream);
}

}  // namespace fused_optim
