// CPU Adam/AdamW: every tensor of a group cut into fixed-size chunks (chunks.h), OpenMP over the chunks, and a
// branch-free inner loop over one chunk that the compiler vectorises. The per-element math is fused_optim/adam.h, the same
// header the CUDA kernel includes.
#include <algorithm>
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
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;
  float* master;
  uint32_t random_stream;
  AdamScalars scalars;
};

template <typename param_t, typename grad_t, bool kAmsgrad, bool kMaster, bool kStochastic>
void adam_chunk(const TensorPointers& t, int64_t begin, int64_t end) {
  auto* __restrict__ param = static_cast<param_t*>(t.param);
  const auto* __restrict__ grad = static_cast<const grad_t*>(t.grad);
  float* __restrict__ exp_avg = t.exp_avg;
  float* __restrict__ exp_avg_sq = t.exp_avg_sq;
  float* __restrict__ max_exp_avg_sq = t.max_exp_avg_sq;
  float* __restrict__ master = t.master;
  const AdamScalars s = t.scalars;
  float unused_max = 0.0f;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float p = kMaster ? master[i] : load_float(param, i);
    float& max_sq = kAmsgrad ? max_exp_avg_sq[i] : unused_max;
    const float updated = adam_update<kAmsgrad>(p, load_float(grad, i), exp_avg[i], exp_avg_sq[i], max_sq, s);
    write_param<param_t, kMaster, kStochastic>(param, master, i, updated, t.random_stream);
  }
}

using ChunkFn = void (*)(const TensorPointers&, int64_t, int64_t);

template <typename param_t, typename grad_t>
ChunkFn pick_chunk_fn(bool amsgrad, bool master, bool stochastic) {
  if (stochastic) {
    if constexpr (std::is_same_v<param_t, c10::BFloat16>) {
      return amsgrad ? adam_chunk<param_t, grad_t, true, false, true> : adam_chunk<param_t, grad_t, false, false, true>;
    } else {
      // check_adam_args refused this call already
      throw std::runtime_error("adam_step_: stochastic rounding is for bfloat16 params");
    }
  }
  if (master) {
    return amsgrad ? adam_chunk<param_t, grad_t, true, true, false> : adam_chunk<param_t, grad_t, false, true, false>;
  }
  return amsgrad ? adam_chunk<param_t, grad_t, true, false, false> : adam_chunk<param_t, grad_t, false, false, false>;
}

ChunkFn pick_chunk_fn(ScalarType param_dtype, ScalarType grad_dtype, bool amsgrad, bool master,
                      bool stochastic) {
  return dispatch_param_grad_types(param_dtype, grad_dtype, [&](auto param, auto grad) {
    return pick_chunk_fn<decltype(param), decltype(grad)>(amsgrad, master, stochastic);
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

  std::vector<TensorPointers> tensors(params.size());
  std::vector<ChunkFn> chunk_fns(params.size());
  std::vector<int64_t> numels;
  for (size_t i = 0; i < params.size(); ++i) {
    const float step = cpu_scalar(steps[i]) + 1.0f;
    tensors[i] = TensorPointers{params[i].mutable_data_ptr(),
                                matched_grads[i].const_data_ptr(),
                                data_as<float>(exp_avgs[i]),
                                data_as<float>(exp_avg_sqs[i]),
                                amsgrad ? data_as<float>(max_exp_avg_sqs[i]) : nullptr,
                                master ? data_as<float>(master_params[i]) : nullptr,
                                stream_key(static_cast<uint32_t>(seed), static_cast<uint32_t>(i),
                                           static_cast<uint32_t>(step)),
                                adam_scalars(hyper, lr_value, step, scale)};
    chunk_fns[i] = pick_chunk_fn(params[i].scalar_type(), matched_grads[i].scalar_type(), amsgrad, master, stochastic_rounding);
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
