// CUDA SGD: one multi-tensor launch (csrc/cuda/multi_tensor.cuh) per few hundred tensors of a group and dtype pair.
//
// Each block owns one chunk of one tensor; it derives the tensor's scalars (lr, 1/grad_scale, whether this is the
// first step and the random stream, from the step count on the device) and every thread then moves 8 elements per
// iteration with 16-byte loads and stores when all of the tensor's arrays are 16-byte aligned. The element math is
// fused_optim/sgd.h, shared with the CPU; the param write-back (master copy or remainder, stochastic rounding) is
// multi_tensor.cuh's, as Lion's. A second, tiny launch increments the step counts after every update launch of the
// call has read them. With moments="int8" the buffer is int8 codes (int8_codes.cuh's step_signed_codes).
#include <cstdint>

#include "ops/torch_api.h"
#include "launch.cuh"

#include "fused_optim/rounding.h"
#include "ops/dispatch.h"
#include "ops/sgd.h"
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
  void* momentum_buffer;  // null without momentum; buffer_t: float, or bf16 (moments="bf16"); int8 codes
  void* master;           // null without master weights; master_t: a float copy or an int16/int8 remainder
  uint16_t* scales;       // moments="int8": the buffer's bf16 block scales, ceil(numel / 64)
  const float* step;      // null without momentum and stochastic rounding
  int32_t index;          // in the caller's list: keys the rounding streams, as on the CPU
  int64_t numel;
};
using Table = multi_tensor::LaunchTable<TensorArgs>;

// Everything a launch needs besides the table and the template arguments.
struct LaunchArgs {
  double momentum, dampening, weight_decay;
  bool maximize;
  uint32_t seed;
  DeviceLr lr;
  const float* grad_scale;
  const float* found_inf;
};

// A tensor's scalars at step count `step` (every thread reads the same few: one broadcast load each, cheaper than a
// trip through shared memory), and its random stream (rounding.h: the param's stochastic rounding; the buffer's
// bits are moment_stream(stream, 0)), keyed by the count after this step, as on the CPU.
__device__ __forceinline__ SgdScalars tensor_scalars(const LaunchArgs& a, float step) {
  return sgd_scalars(a.momentum, a.dampening, a.weight_decay, a.maximize, static_cast<float>(a.lr.read()),
                     a.grad_scale != nullptr ? *a.grad_scale : 1.0f, step);
}

__device__ __forceinline__ uint32_t tensor_stream(const LaunchArgs& a, const TensorArgs& t) {
  return stream_key(a.seed, static_cast<uint32_t>(t.index), static_cast<uint32_t>(*t.step + 1.0f));
}

template <typename param_t, typename grad_t, typename buffer_t, bool kMomentum, bool kNesterov, WriteBack kWrite>
__global__ void __launch_bounds__(kThreads) sgd_kernel(const __grid_constant__ Table table, const LaunchArgs a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // a skipped step: touch nothing
  const multi_tensor::BlockWork work = multi_tensor::block_work(table, kChunk);
  const TensorArgs& t = table.tensors[work.tensor];
  const SgdScalars s = tensor_scalars(a, kMomentum ? *t.step : 1.0f);
  constexpr bool kBf16Buffer = std::is_same_v<buffer_t, c10::BFloat16>;
  const uint32_t stream = kWrite == WriteBack::kStochastic || kBf16Buffer ? tensor_stream(a, t) : 0u;
  const uint32_t moment_draw = moment_stream(stream, 0);  // a bf16 buffer's rounding bits (rounding.h)
  auto* param = static_cast<param_t*>(t.param);
  const auto* grad = static_cast<const grad_t*>(t.grad);
  auto* buffer = static_cast<buffer_t*>(t.momentum_buffer);
  auto* master = static_cast<master_t<kWrite>*>(t.master);
  const bool vectorizable = multi_tensor::aligned16(param) && multi_tensor::aligned16(grad) &&
                            (!kMomentum || multi_tensor::aligned16(buffer)) &&
                            (master == nullptr || multi_tensor::aligned16(master));
  multi_tensor::for_each_element<kThreads>(
      work, vectorizable,
      [&](int64_t i) {
        float p[kVec], g[kVec], b[kVec];
        // Every load issued before the first use: independent 16-byte streams in flight per thread.
        multi_tensor::load_param_vec<kWrite>(param, master, i, p);
        multi_tensor::load_vec(grad + i, g);
        if (kMomentum) multi_tensor::load_vec(buffer + i, b);
        uint32_t bits[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          p[k] = sgd_update<kMomentum, kNesterov>(p[k], g[k], b[k], s);
          bits[k] = kBf16Buffer ? moment_bits(moment_draw, i + k) : 0u;
        }
        if (kMomentum) multi_tensor::store_moment_vec(buffer, i, b, bits, 0);
        multi_tensor::store_param_vec<kWrite>(param, master, i, p, stream);
      },
      [&](int64_t i) {
        float b = kMomentum ? static_cast<float>(buffer[i]) : 0.0f;
        const float updated = sgd_update<kMomentum, kNesterov>(multi_tensor::load_param_at<kWrite>(param, master, i),
                                                               static_cast<float>(grad[i]), b, s);
        if (kMomentum) buffer[i] = to_moment<buffer_t>(b, kBf16Buffer ? moment_bits(moment_draw, i) : 0u);
        multi_tensor::store_param_at<kWrite>(param, master, i, updated, stream);
      });
}

// moments="int8": the buffer as codes (moment_int8.h), dequantized, updated and requantized in one pass.
template <typename param_t, typename grad_t, bool kNesterov, WriteBack kWrite>
__global__ void __launch_bounds__(kThreads) sgd_int8_kernel(const __grid_constant__ Table table, const LaunchArgs a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // a skipped step: touch nothing
  const multi_tensor::BlockWork work = multi_tensor::block_work(table, kChunk);
  const TensorArgs& t = table.tensors[work.tensor];
  const SgdScalars s = tensor_scalars(a, *t.step);
  const uint32_t stream = tensor_stream(a, t);
  int8_codes::step_signed_codes<kThreads, kWrite>(
      work, static_cast<param_t*>(t.param), static_cast<master_t<kWrite>*>(t.master),
      static_cast<const grad_t*>(t.grad), static_cast<int8_t*>(t.momentum_buffer), t.scales, moment_stream(stream, 0),
      stream, [&](float& p, float g, float& buffer) { p = sgd_update<true, kNesterov>(p, g, buffer, s); });
}

template <typename param_t, typename grad_t, typename buffer_t, WriteBack kWrite>
void launch_variant(const Table& table, const LaunchArgs& a, bool momentum, bool nesterov, cudaStream_t stream) {
  const int blocks = table.num_blocks();
  if (!momentum) {
    sgd_kernel<param_t, grad_t, float, false, false, kWrite><<<blocks, kThreads, 0, stream>>>(table, a);
  } else if (nesterov) {
    sgd_kernel<param_t, grad_t, buffer_t, true, true, kWrite><<<blocks, kThreads, 0, stream>>>(table, a);
  } else {
    sgd_kernel<param_t, grad_t, buffer_t, true, false, kWrite><<<blocks, kThreads, 0, stream>>>(table, a);
  }
  check_launch();
}

}  // namespace

void sgd_step_cuda(FUSED_OPTIM_SGD_ARGS) {
  const std::vector<Tensor> matched_grads = check_sgd_args(FUSED_OPTIM_SGD_ARG_NAMES);
  if (params.empty()) return;
  const torch::stable::accelerator::DeviceGuard device_guard(params[0].get_device_index());
  const cudaStream_t stream = current_stream();
  const bool has_momentum = momentum != 0.0;
  const bool master = !master_params.empty();
  const WriteBack write = write_back_of(stochastic_rounding, master_params);
  const LaunchArgs args{momentum, dampening, weight_decay, maximize, static_cast<uint32_t>(seed),
                        device_lr(lr, lr_tensor), optional_ptr(grad_scale), optional_ptr(found_inf)};
  const ScalarType buffer_dtype = has_momentum ? momentum_buffers[0].scalar_type() : kFloat;
  const bool int8 = !moment_scales.empty();

  auto launch = [&](const Table& table, int key) {
    multi_tensor::dispatch_dtype_pair(key, [&](auto param, auto grad) {
      using param_t = decltype(param);
      dispatch_write_back<param_t>(write, [&](auto kind) {
        constexpr WriteBack kWrite = decltype(kind)::value;
        if (int8) {
          const auto kernel = nesterov ? sgd_int8_kernel<param_t, decltype(grad), true, kWrite>
                                       : sgd_int8_kernel<param_t, decltype(grad), false, kWrite>;
          kernel<<<table.num_blocks(), kThreads, 0, stream>>>(table, args);
          check_launch();
          return;
        }
        dispatch_moment_type(buffer_dtype, [&](auto buffer) {
          launch_variant<param_t, decltype(grad), decltype(buffer), kWrite>(table, args, has_momentum, nesterov,
                                                                            stream);
        });
      });
    });
  };
  multi_tensor::TableFiller<Table, decltype(launch)> filler(kChunk, launch);
  for (size_t i = 0; i < params.size(); ++i) {
    filler.add(TensorArgs{params[i].mutable_data_ptr(), matched_grads[i].const_data_ptr(),
                          has_momentum ? momentum_buffers[i].mutable_data_ptr() : nullptr,
                          master ? master_params[i].mutable_data_ptr() : nullptr,
                          int8 ? data_as<uint16_t>(moment_scales[i]) : nullptr,
                          steps.empty() ? nullptr : data_as<float>(steps[i]), static_cast<int32_t>(i), 0},
               params[i].numel(), multi_tensor::dtype_pair(params[i].scalar_type(), matched_grads[i].scalar_type()));
  }
  filler.flush();

  multi_tensor::increment_steps(steps, args.found_inf, stream);
}

}  // namespace fused_optim
