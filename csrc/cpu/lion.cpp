// CPU Lion: every tensor of a group cut into fixed-size chunks (chunks.h), OpenMP over the chunks, and a branch-free
// inner loop over one chunk that the compiler vectorises. The per-element math is fused_optim/lion.h, the same
// header the CUDA kernel includes; the param write-back (master copy or remainder, stochastic rounding) is
// float_io.h's.
#include <type_traits>
#include <vector>

#include "ops/torch_api.h"

#include "chunks.h"
#include "float_io.h"
#include "int8_blocks.h"
#include "prefetch.h"
#include "fused_optim/rounding.h"
#include "ops/dispatch.h"
#include "ops/lion.h"

namespace fused_optim {
namespace {

struct TensorPointers {
  void* param;
  const void* grad;
  void* exp_avg;      // moment_t: float, or bf16 (moments="bf16"); int8 codes (moments="int8")
  void* master;       // master_t: a float copy or an int16/int8 remainder (WriteBack)
  uint16_t* scales;   // moments="int8": exp_avg's bf16 block scales
  uint32_t random_stream;
  LionScalars scalars;
};

template <typename param_t, typename grad_t, typename moment_t, WriteBack kWrite>
void lion_chunk(const TensorPointers& t, int64_t begin, int64_t end) {
  auto* __restrict__ param = static_cast<param_t*>(t.param);
  const auto* __restrict__ grad = static_cast<const grad_t*>(t.grad);
  auto* __restrict__ exp_avg = static_cast<moment_t*>(t.exp_avg);
  auto* __restrict__ master = static_cast<master_t<kWrite>*>(t.master);
  const LionScalars s = t.scalars;
  // a bf16 moment's rounding bits (rounding.h), counted from the chunk's start (chunks.h)
  constexpr bool kBf16Moment = std::is_same_v<moment_t, c10::BFloat16>;
  const uint32_t moment_draw = moment_stream(t.random_stream, 0);
  ParamIO<kWrite, param_t, grad_t> params{param, grad, master, t.random_stream};
  for_each_element</*kPrefetch=*/true>(
      begin, end, params,
      [&](int32_t j) {
        const int64_t i = begin + j;
        float m = load_float(exp_avg, i);
        const float updated = lion_update(params.load(i), params.grad(i), m, s);
        store_moment(exp_avg, i, m, kBf16Moment ? chunk_moment_bits(moment_draw, begin, j) : 0u);
        params.store(i, updated);
      },
      [&](int64_t i) { prefetch_param_block<kWrite>(i, param, grad, master, exp_avg); });
}

// moments="int8" (int8_blocks.h)
template <typename param_t, typename grad_t, WriteBack kWrite>
void lion_int8_chunk(const TensorPointers& t, int64_t begin, int64_t end) {
  auto* __restrict__ param = static_cast<param_t*>(t.param);
  const auto* __restrict__ grad = static_cast<const grad_t*>(t.grad);
  auto* __restrict__ master = static_cast<master_t<kWrite>*>(t.master);
  const LionScalars s = t.scalars;
  ParamIO<kWrite, param_t, grad_t> params{param, grad, master, t.random_stream};
  step_signed_int8_blocks(static_cast<int8_t*>(t.exp_avg), t.scales, moment_stream(t.random_stream, 0), begin, end,
                          params,
                          [&](int64_t i, float& m) {
                            params.store(i, lion_update(params.load(i), params.grad(i), m, s));
                          },
                          [&](int64_t i) { prefetch_param_block<kWrite>(i, param, grad, master); });
}

using ChunkFn = void (*)(const TensorPointers&, int64_t, int64_t);

}  // namespace

void lion_step_cpu(FUSED_OPTIM_LION_ARGS) {
  const std::vector<Tensor> matched_grads = check_lion_args(FUSED_OPTIM_LION_ARG_NAMES);
  if (found_inf.has_value() && cpu_scalar(*found_inf) != 0.0f) return;  // GradScaler: skip, touch nothing
  const double lr_value = lr_tensor.has_value() ? cpu_lr(*lr_tensor) : lr;
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
                                exp_avgs[i].mutable_data_ptr(), master ? master_params[i].mutable_data_ptr() : nullptr,
                                moment_scales.empty() ? nullptr : data_as<uint16_t>(moment_scales[i]),
                                stream_key(static_cast<uint32_t>(seed), static_cast<uint32_t>(i),
                                           static_cast<uint32_t>(step)),
                                scalars};
    chunk_fns[i] = dispatch_param_grad_types(params[i].scalar_type(), matched_grads[i].scalar_type(), [&](auto param,
                                                                                                         auto grad) {
      using param_t = decltype(param);
      if (!moment_scales.empty()) {
        return dispatch_write_back<param_t>(write, [&](auto kind) -> ChunkFn {
          return lion_int8_chunk<param_t, decltype(grad), decltype(kind)::value>;
        });
      }
      return dispatch_moment_type(exp_avgs[i].scalar_type(), [&](auto moment) {
        return dispatch_write_back<param_t>(write, [&](auto kind) -> ChunkFn {
          return lion_chunk<param_t, decltype(grad), decltype(moment), decltype(kind)::value>;
        });
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
