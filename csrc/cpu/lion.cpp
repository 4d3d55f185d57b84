// CPU Lion: every tensor of a group cut into fixed-size chunks (chunks.h), OpenMP over the chunks, and a branch-free
// inner loop over one chunk that the compiler vectorises. The per-element math is fused_optim/lion.h, the same
// header the CUDA kernel includes; the param write-back (master copy or remainder, stochastic rounding) is float_io.h's.
#include <vector>

#include "ops/torch_api.h"

#include "chunks.h"
#include "float_io.h"
#include "fused_optim/rounding.h"
#include "ops/dispatch.h"
#include "ops/lion.h"

namespace fused_optim {
namespace {

struct TensorPointers {
  void* param;
  const void* grad;
  float* exp_avg;
  void* master;  // float (a copy) or int16_t (a remainder): WriteBack
  uint32_t random_stream;
  LionScalars scalars;
};

template <typename param_t, typename grad_t, WriteBack kWrite>
void lion_chunk(const TensorPointers& t, int64_t begin, int64_t end) {
  auto* __restrict__ param = static_cast<param_t*>(t.param);
  const auto* __restrict__ grad = static_cast<const grad_t*>(t.grad);
  float* __restrict__ exp_avg = t.exp_avg;
  auto* __restrict__ master = static_cast<master_t<kWrite>*>(t.master);
  const LionScalars s = t.scalars;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float p = load_param<kWrite>(param, master, i);
    const float updated = lion_update(p, load_float(grad, i), exp_avg[i], s);
    write_param<kWrite>(param, master, i, updated, t.random_stream);
  }
}

using ChunkFn = void (*)(const TensorPointers&, int64_t, int64_t);

}  // namespace

void lion_step_cpu(FUSED_OPTIM_LION_ARGS) {
  const std::vector<Tensor> matched_grads = check_lion_args(FUSED_OPTIM_LION_ARG_NAMES);
  if (found_inf.has_value() && cpu_scalar(*found_inf) != 0.0f) return;  // GradScaler: skip, touch nothing
  const double lr_value = lr_tensor.has_value() ? cpu_scalar(*lr_tensor) : lr;
  const float scale = grad_scale.has_value() ? cpu_scalar(*grad_scale) : 1.0f;
  const LionScalars scalars = lion_scalars(beta1, beta2, weight_decay, maximize, lr_value, scale);
  const bool master = !master_params.empty();
  const WriteBack write = write_back_of(stochastic_rounding, master_params);

  std::vector<TensorPointers> tensors(params.size());
  std::vector<ChunkFn> chunk_fns(params.size());
  std::vector<int64_t> numels;
  for (size_t i = 0; i < params.size(); ++i) {
    const float step = cpu_scalar(steps[i]) + 1.0f;
    tensors[i] = TensorPointers{params[i].mutable_data_ptr(), matched_grads[i].const_data_ptr(),
                                data_as<float>(exp_avgs[i]), master ? master_params[i].mutable_data_ptr() : nullptr,
                                stream_key(static_cast<uint32_t>(seed), static_cast<uint32_t>(i),
                                           static_cast<uint32_t>(step)),
                                scalars};
    chunk_fns[i] = dispatch_param_grad_types(params[i].scalar_type(), matched_grads[i].scalar_type(),
                                             [&](auto param, auto grad) {
                                               using param_t = decltype(param);
                                               return dispatch_write_back<param_t>(write, [&](auto kind) -> ChunkFn {
                                                 return lion_chunk<param_t, decltype(grad), decltype(kind)::value>;
                                               });
                                             });
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
