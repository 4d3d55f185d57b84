// CUDA Lion: one multi-tensor launch (csrc/cuda/multi_tensor.cuh) per few hundred tensors of a group and dtype pair.
//
// Each block owns one chunk of one tensor; it derives the tensor's scalars (lr, 1/grad_scale, the random stream of
// stochastic rounding from the step count on the device) and every thread then moves 8 elements per iteration with
// 16-byte loads and stores when all of the tensor's arrays are 16-byte aligned. The element math is
// fused_optim/lion.h, shared with the CPU. A second, tiny launch increments the step counts after every update
// launch of the call has read them.
#include <cstdint>

#include "ops/torch_api.h"
#include "launch.cuh"

#include "fused_optim/rounding.h"
#include "ops/lion.h"
#include "multi_tensor.cuh"

namespace fused_optim {
namespace {

using multi_tensor::kVec;

constexpr int kThreads = 512;          // as adam.cu, measured there on an H100
constexpr int64_t kChunk = 16 * 1024;  // elements per block: 4 iterations of 512 threads x 8

struct TensorArgs {
  void* param;
  const void* grad;
  float* exp_avg;
  float* master;  // null without master weights
  const float* step;
  int32_t index;  // in the caller's list: keys the stochastic-rounding stream, as on the CPU
  int64_t numel;
};
using Table = multi_tensor::LaunchTable<TensorArgs>;

// Everything a launch needs besides the table and the template arguments.
struct LaunchArgs {
  double beta1, beta2, weight_decay, lr;
  bool maximize;
  uint32_t seed;
  const float* lr_tensor;
  const float* grad_scale;
  const float* found_inf;
};

template <typename param_t, typename grad_t, bool kMaster, bool kStochastic>
__global__ void __launch_bounds__(kThreads) lion_kernel(const __grid_constant__ Table table, const LaunchArgs a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // GradScaler found inf/NaN: touch nothing
  const multi_tensor::BlockWork work = multi_tensor::block_work(table, kChunk);
  const TensorArgs& t = table.tensors[work.tensor];
  // Every thread reads the same few scalars: one broadcast load each, cheaper than a trip through shared memory.
  const LionScalars s = lion_scalars(a.beta1, a.beta2, a.weight_decay, a.maximize,
                                     a.lr_tensor != nullptr ? static_cast<double>(*a.lr_tensor) : a.lr,
                                     a.grad_scale != nullptr ? *a.grad_scale : 1.0f);
  const uint32_t stream =
      kStochastic ? stream_key(a.seed, static_cast<uint32_t>(t.index), static_cast<uint32_t>(*t.step + 1.0f)) : 0;
  auto* param = static_cast<param_t*>(t.param);
  const auto* grad = static_cast<const grad_t*>(t.grad);
  float* exp_avg = t.exp_avg;
  float* master = t.master;
  const bool vectorizable = multi_tensor::aligned16(param) && multi_tensor::aligned16(grad) &&
                            multi_tensor::aligned16(exp_avg) && (!kMaster || multi_tensor::aligned16(master));
  multi_tensor::for_each_element<kThreads>(
      work, vectorizable,
      [&](int64_t i) {
        float p[kVec], g[kVec], m[kVec];
        // Every load issued before the first use: independent 16-byte streams in flight per thread.
        if (kMaster) {
          multi_tensor::load_vec(master + i, p);
        } else {
          multi_tensor::load_vec(param + i, p);
        }
        multi_tensor::load_vec(grad + i, g);
        multi_tensor::load_vec(exp_avg + i, m);
        param_t out[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          p[k] = lion_update(p[k], g[k], m[k], s);
          out[k] = to_param<param_t, kStochastic>(p[k], stream, i + k);
        }
        multi_tensor::store_vec(exp_avg + i, m);
        if (kMaster) multi_tensor::store_vec(master + i, p);
        multi_tensor::store_vec(param + i, out);
      },
      [&](int64_t i) {
        const float p = kMaster ? master[i] : static_cast<float>(param[i]);
        const float updated = lion_update(p, static_cast<float>(grad[i]), exp_avg[i], s);
        if (kMaster) master[i] = updated;
        param[i] = to_param<param_t, kStochastic>(updated, stream, i);
      });
}

template <typename param_t, typename grad_t>
void launch_variant(const Table& table, const LaunchArgs& a, bool master, bool stochastic, cudaStream_t stream) {
  const int blocks = table.num_blocks();
  if (stochastic) {
    if constexpr (std::is_same_v<param_t, c10::BFloat16>) {
      lion_kernel<param_t, grad_t, false, true><<<blocks, kThreads, 0, stream>>>(table, a);
    } else {
      // check_lion_args refused this call already
      throw std::runtime_error("lion_step_: stochastic rounding is for bfloat16 params");
    }
  } else if (master) {
    lion_kernel<param_t, grad_t, true, false><<<blocks, kThreads, 0, stream>>>(table, a);
  } else {
    lion_kernel<param_t, grad_t, false, false><<<blocks, kThreads, 0, stream>>>(table, a);
  }
  check_launch();
}

}  // namespace

void lion_step_cuda(FUSED_OPTIM_LION_ARGS) {
  const std::vector<Tensor> matched_grads = check_lion_args(FUSED_OPTIM_LION_ARG_NAMES);
  if (params.empty()) return;
  const torch::stable::accelerator::DeviceGuard device_guard(params[0].get_device_index());
  const cudaStream_t stream = current_stream();
  const bool master = !master_params.empty();
  const LaunchArgs args{beta1, beta2, weight_decay, lr, maximize, static_cast<uint32_t>(seed),
                        optional_ptr(lr_tensor), optional_ptr(grad_scale), optional_ptr(found_inf)};

  auto launch = [&](const Table& table, int key) {
    multi_tensor::dispatch_dtype_pair(key, [&](auto param, auto grad) {
      launch_variant<decltype(param), decltype(grad)>(table, args, master, stochastic_rounding, stream);
    });
  };
  multi_tensor::TableFiller<Table, decltype(launch)> filler(kChunk, launch);
  for (size_t i = 0; i < params.size(); ++i) {
    filler.add(TensorArgs{params[i].mutable_data_ptr(), matched_grads[i].const_data_ptr(), data_as<float>(exp_avgs[i]),
                          master ? data_as<float>(master_params[i]) : nullptr, data_as<float>(steps[i]),
                          static_cast<int32_t>(i), 0},
               params[i].numel(), multi_tensor::dtype_pair(params[i].scalar_type(), matched_grads[i].scalar_type()));
  }
  filler.flush();
  multi_tensor::increment_steps(steps, args.found_inf, stream);
}

}  // namespace fused_optim
