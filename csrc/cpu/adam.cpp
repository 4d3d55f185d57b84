// CPU Adam/AdamW: every tensor of a group cut into fixed-size chunks (chunks.h), OpenMP over the chunks, and a
// branch-free inner loop over one chunk that the compiler vectorises. The per-element math is fused_optim/adam.h, the same
// header the CUDA kernel includes.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "ops/torch_api.h"

#include "chunks.h"
#include "float_io.h"
#include "ops/adam.h"
#include "ops/dispatch.h"
#include "fused_optim/rounding.h"

namespace fused_optim {
namespace {

struct TensorPointers {
  void* param;
  const void* grad;
  void* exp_avg;  // moment_t: float, or bf16 (moments="bf16")
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  void* master;  // master_t: a float copy or an int16/int8 remainder (WriteBack)
  uint32_t random_stream;
  AdamScalars scalars;
};

template <typename param_t, typename grad_t, typename moment_t, bool kAmsgrad, WriteBack kWrite>
void adam_chunk(const TensorPointers& t, int64_t begin, int64_t end) {
  auto* __restrict__ param = static_cast<param_t*>(t.param);
  const auto* __restrict__ grad = static_cast<const grad_t*>(t.grad);
  auto* __restrict__ exp_avg = static_cast<moment_t*>(t.exp_avg);
  auto* __restrict__ exp_avg_sq = static_cast<moment_t*>(t.exp_avg_sq);
  auto* __restrict__ max_exp_avg_sq = static_cast<moment_t*>(t.max_exp_avg_sq);
  auto* __restrict__ master = static_cast<master_t<kWrite>*>(t.master);
  const AdamScalars s = t.scalars;
  // bf16 moments' random bits (rounding.h), counted from the chunk's start (chunks.h)
  constexpr bool kBf16Moments = std::is_same_v<moment_t, c10::BFloat16>;
  const uint32_t stream0 = moment_stream(t.random_stream, 0), stream1 = moment_stream(t.random_stream, 1);
  const int32_t length = static_cast<int32_t>(end - begin);  // at most kCpuChunk
#pragma omp simd
  for (int32_t j = 0; j < length; ++j) {
    const int64_t i = begin + j;
    const float p = load_param<kWrite>(param, master, i);
    float m = load_float(exp_avg, i), v = load_float(exp_avg_sq, i);
    float max_v = kAmsgrad ? load_float(max_exp_avg_sq, i) : 0.0f;
    const float updated = adam_update<kAmsgrad>(p, load_float(grad, i), m, v, max_v, s);
    const uint32_t bits = kBf16Moments ? chunk_moment_bits(stream0, begin, j) : 0u;
    store_moment(exp_avg, i, m, bits);
    store_moment(exp_avg_sq, i, v, bits >> 16);
    if (kAmsgrad) store_moment(max_exp_avg_sq, i, max_v, kBf16Moments ? chunk_moment_bits(stream1, begin, j) : 0u);
    write_param<kWrite>(param, master, i, updated, t.random_stream);
  }
}

using ChunkFn = void (*)(const TensorPointers&, int64_t, int64_t);

ChunkFn pick_chunk_fn(ScalarType param_dtype, ScalarType grad_dtype, ScalarType moment_dtype, bool amsgrad,
                      WriteBack write) {
  return dispatch_param_grad_types(param_dtype, grad_dtype, [&](auto param, auto grad) {
    using param_t = decltype(param);
    using grad_t = decltype(grad);
    return dispatch_moment_type(moment_dtype, [&](auto moment) {
      using moment_t = decltype(moment);
      return dispatch_write_back<param_t>(write, [&](auto kind) -> ChunkFn {
        constexpr WriteBack kWrite = decltype(kind)::value;
        return amsgrad ? adam_chunk<param_t, grad_t, moment_t, true, kWrite>
                       : adam_chunk<param_t, grad_t, moment_t, false, kWrite>;
      });
    });
  });
}

}  // namespace

void adam_step_cpu(FUSED_OPTIM_ADAM_ARGS) {
  const std::vector<Tensor> matched_grads = check_adam_args(FUSED_OPTIM_ADAM_ARG_NAMES);
  if (found_inf.has_value() && cpu_scalar(*found_inf) != 0.0f) return;  // GradScaler: skip, touch nothing
  const AdamHyper hyper{beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize};
  const double lr_value = lr_tensor.has_value() ? cpu_scalar(*lr_tensor) : lr;
  const float scale = grad_scale.has_value() ? cpu_scalar(*grad_scale) : 1.0f;
  const bool master = !master_params.empty();
  const WriteBack write = write_back_of(stochastic_rounding, master_params);

  std::vector<TensorPointers> tensors(params.size());
  std::vector<ChunkFn> chunk_fns(params.size());
  std::vector<int64_t> numels;
  for (size_t i = 0; i < params.size(); ++i) {
    const float step = cpu_scalar(steps[i]) + 1.0f;
    tensors[i] = TensorPointers{params[i].mutable_data_ptr(),
                                matched_grads[i].const_data_ptr(),
                                exp_avgs[i].mutable_data_ptr(),
                                exp_avg_sqs[i].mutable_data_ptr(),
                                amsgrad ? max_exp_avg_sqs[i].mutable_data_ptr() : nullptr,
                                master ? master_params[i].mutable_data_ptr() : nullptr,
                                stream_key(static_cast<uint32_t>(seed), static_cast<uint32_t>(i),
                                           static_cast<uint32_t>(step)),
                                adam_scalars(hyper, lr_value, step, scale)};
    chunk_fns[i] = pick_chunk_fn(params[i].scalar_type(), matched_grads[i].scalar_type(), exp_avgs[i].scalar_type(),
                                 amsgrad, write);
    numels.push_back(params[i].numel());
  }
  parallel_for_chunks(split_into_chunks(numels), [&](const Chunk& chunk, int64_t) {
    chunk_fns[chunk.tensor](tensors[chunk.tensor], chunk.begin, chunk.end);
  });
  for (const Tensor& step : steps) {
    *data_as<float>(step) += 1.0f;
  }
}

}  // namespace fused_optim
