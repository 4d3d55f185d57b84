// CUDA SGD with moments="int8" (fused_optim/moment_int8.h): the momentum buffer as int8 codes in blocks of 64
// sharing a bf16 scale, dequantized, updated and requantized in one pass, as adam_int8.cu does Adam's moments (the
// 8 lanes that hold a block of codes find its new scale by warp shuffles).
#include <algorithm>
#include <cstdint>

#include "ops/torch_api.h"
#include "launch.cuh"

#include "ops/dispatch.h"
#include "ops/sgd.h"
#include "fused_optim/moment_int8.h"
#include "fused_optim/rounding.h"
#include "fused_optim/sgd.h"
#include "int8_codes.cuh"
#include "multi_tensor.cuh"

namespace fused_optim {
namespace {

constexpr int kThreads = 512;
using multi_tensor::kVec;
constexpr int64_t kChunk = 16 * 1024;
static_assert(kChunk % kInt8Block == 0, "a chunk starts at a block of codes");

struct Int8Args {
  void* param;
  const void* grad;
  int8_t* codes;
  uint16_t* scales;  // bf16 bits, ceil(numel / 64)
  const float* step;
  uint32_t index;  // in the caller's list: keys the random stream
  int64_t numel;
};
using Table = multi_tensor::LaunchTable<Int8Args>;

struct LaunchArgs {
  double momentum, dampening, weight_decay;
  bool maximize;
  uint32_t seed;
  float lr;
  const float* lr_tensor;
  const float* grad_scale;
  const float* found_inf;
};

template <typename param_t, typename grad_t, bool kNesterov>
__global__ void __launch_bounds__(kThreads) sgd_int8_kernel(const __grid_constant__ Table table, const LaunchArgs a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // a skipped step: touch nothing
  const multi_tensor::BlockWork work = multi_tensor::block_work(table, kChunk);
  const Int8Args& t = table.tensors[work.tensor];
  const SgdScalars s = sgd_scalars(a.momentum, a.dampening, a.weight_decay, a.maximize,
                                   a.lr_tensor != nullptr ? *a.lr_tensor : a.lr,
                                   a.grad_scale != nullptr ? *a.grad_scale : 1.0f, *t.step);
  const uint32_t draw = moment_stream(stream_key(a.seed, t.index, static_cast<uint32_t>(*t.step + 1.0f)), 0);
  auto* param = static_cast<param_t*>(t.param);
  const auto* grad = static_cast<const grad_t*>(t.grad);
  const bool vectorizable = multi_tensor::aligned16(param) && multi_tensor::aligned16(grad) &&
                            reinterpret_cast<uintptr_t>(t.codes) % 8 == 0;
  // Every thread runs every iteration (the shuffles need all lanes), with 0..kVec elements of its own.
  for (int64_t base = work.begin; base < work.end; base += kThreads * kVec) {
    const int64_t i = base + threadIdx.x * kVec;
    const int valid = static_cast<int>(std::clamp<int64_t>(work.end - i, 0, kVec));
    const bool vector = vectorizable && valid == kVec;
    const int64_t block = i / kInt8Block;
    float p[kVec], g[kVec], b[kVec];
    int8_t codes[kVec];
    int8_codes::load_codes(t.codes + i, vector, valid, codes);
    if (vector) {
      multi_tensor::load_vec(param + i, p);
      multi_tensor::load_vec(grad + i, g);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        p[k] = k < valid ? static_cast<float>(param[i + k]) : 0.0f;
        g[k] = k < valid ? static_cast<float>(grad[i + k]) : 0.0f;
      }
    }
    const float step = valid > 0 ? signed_step(bf16_bits_to_float(t.scales[block])) : 0.0f;
    param_t out[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      b[k] = dequantize_signed(codes[k], step);
      out[k] = round_to<param_t>(sgd_update<true, kNesterov>(p[k], g[k], b[k], s));
    }
    const uint16_t scale_bits = int8_scale_bits(int8_codes::block_largest(b, valid));
    if (valid > 0 && threadIdx.x % int8_codes::kLanesPerBlock == 0) t.scales[block] = scale_bits;
    const float inverse = 1.0f / bf16_bits_to_float(scale_bits);
#pragma unroll
    for (int k = 0; k < kVec; ++k) codes[k] = quantize_signed(b[k], inverse, moment_bits(draw, i + k) & 0xFFFFu);
    int8_codes::store_codes(t.codes + i, vector, valid, codes);
    if (vector) {
      multi_tensor::store_vec(param + i, out);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        if (k < valid) param[i + k] = out[k];
      }
    }
  }
}

}  // namespace

void sgd_int8_step_cuda(FUSED_OPTIM_SGD_ARGS, const std::vector<Tensor>& matched_grads) {
  const cudaStream_t stream = current_stream();
  const LaunchArgs args{momentum, dampening, weight_decay, maximize, static_cast<uint32_t>(seed),
                        static_cast<float>(lr), optional_ptr(lr_tensor), optional_ptr(grad_scale),
                        optional_ptr(found_inf)};
  const auto launch = [&](const Table& table, int key) {
    multi_tensor::dispatch_dtype_pair(key, [&](auto param, auto grad) {
      using param_t = decltype(param);
      using grad_t = decltype(grad);
      const auto kernel = nesterov ? sgd_int8_kernel<param_t, grad_t, true> : sgd_int8_kernel<param_t, grad_t, false>;
      kernel<<<table.num_blocks(), kThreads, 0, stream>>>(table, args);
      check_launch();
    });
  };
  multi_tensor::TableFiller<Table, decltype(launch)> filler(kChunk, launch);
  for (size_t i = 0; i < params.size(); ++i) {
    filler.add(Int8Args{params[i].mutable_data_ptr(), matched_grads[i].const_data_ptr(),
                        data_as<int8_t>(momentum_buffers[i]), data_as<uint16_t>(moment_scales[i]),
                        data_as<const float>(steps[i]), static_cast<uint32_t>(i), 0},
               params[i].numel(), multi_tensor::dtype_pair(params[i].scalar_type(), matched_grads[i].scalar_type()));
  }
  filler.flush();
  multi_tensor::increment_steps(steps, args.found_inf, stream);
}

}  // namespace fused_optim
