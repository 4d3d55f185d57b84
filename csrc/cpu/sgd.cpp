// CPU SGD: every tensor of a group cut into fixed-size chunks (chunks.h), OpenMP over the chunks, and
// a branch-free inner loop over one chunk that the compiler vectorises. The per-element math is fused_optim/sgd.h,
// the same header the CUDA kernel includes; the param write-back (master copy or remainder, stochastic rounding) is
// float_io.h's.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "ops/torch_api.h"

#include "chunks.h"
#include "float_io.h"
#include "int8_blocks.h"
#include "prefetch.h"
#include "ops/dispatch.h"
#include "ops/sgd.h"
#include "fused_optim/rounding.h"

namespace fused_optim {
namespace {

struct TensorPointers {
  void* param;
  const void* grad;
  void* momentum_buffer;  // buffer_t: float, or bf16 (moments="bf16"); int8 codes (moments="int8")
  void* master;           // master_t: a float copy or an int16/int8 remainder (WriteBack)
  uint16_t* scales;       // moments="int8": the buffer's bf16 block scales
  uint32_t random_stream;  // the param's stochastic rounding bits; the buffer's are moment_stream(random_stream, 0)
  SgdScalars scalars;
};

template <typename param_t, typename grad_t, typename buffer_t, bool kMomentum, bool kNesterov, WriteBack kWrite>
void sgd_chunk(const TensorPointers& t, int64_t begin, int64_t end) {
  auto* __restrict__ param = static_cast<param_t*>(t.param);
  const auto* __restrict__ grad = static_cast<const grad_t*>(t.grad);
  auto* __restrict__ momentum_buffer = static_cast<buffer_t*>(t.momentum_buffer);
  auto* __restrict__ master = static_cast<master_t<kWrite>*>(t.master);
  const SgdScalars s = t.scalars;
  // a bf16 buffer's rounding bits (rounding.h), counted from the chunk's start (chunks.h)
  constexpr bool kBf16Buffer = std::is_same_v<buffer_t, c10::BFloat16>;
  const uint32_t buffer_draw = moment_stream(t.random_stream, 0);
  ParamIO<kWrite, param_t, grad_t> params{param, grad, master, t.random_stream};
  for_each_element</*kPrefetch=*/true>(
      begin, end, params,
      [&](int32_t j) {
        const int64_t i = begin + j;
        float buffer = kMomentum ? load_float(momentum_buffer, i) : 0.0f;
        const float updated =
            sgd_update<kMomentum, kNesterov>(params.load(i), params.grad(i), buffer, s);
        if (kMomentum) {
          store_moment(momentum_buffer, i, buffer, kBf16Buffer ? chunk_moment_bits(buffer_draw, begin, j) : 0u);
        }
        params.store(i, updated);
      },
      [&](int64_t i) {
        prefetch_param_block<kWrite>(i, param, grad, master);
        if constexpr (kMomentum) prefetch_block(i, momentum_buffer);
      });
}

// moments="int8" (int8_blocks.h)
template <typename param_t, typename grad_t, bool kNesterov, WriteBack kWrite>
void sgd_int8_chunk(const TensorPointers& t, int64_t begin, int64_t end) {
  auto* __restrict__ param = static_cast<param_t*>(t.param);
  const auto* __restrict__ grad = static_cast<const grad_t*>(t.grad);
  auto* __restrict__ master = static_cast<master_t<kWrite>*>(t.master);
  const SgdScalars s = t.scalars;
  ParamIO<kWrite, param_t, grad_t> params{param, grad, master, t.random_stream};
  step_signed_int8_blocks(static_cast<int8_t*>(t.momentum_buffer), t.scales, moment_stream(t.random_stream, 0), begin,
                          end, params,
                          [&](int64_t i, float& buffer) {
                            const float p = params.load(i);
                            params.store(i, sgd_update<true, kNesterov>(p, params.grad(i), buffer, s));
                          },
                          [&](int64_t i) { prefetch_param_block<kWrite>(i, param, grad, master); });
}

using ChunkFn = void (*)(const TensorPointers&, int64_t, int64_t);

template <typename param_t, typename grad_t, typename buffer_t, WriteBack kWrite>
ChunkFn pick_chunk_fn(bool momentum, bool nesterov) {
  if (!momentum) return sgd_chunk<param_t, grad_t, float, false, false, kWrite>;
  return nesterov ? sgd_chunk<param_t, grad_t, buffer_t, true, true, kWrite>
                  : sgd_chunk<param_t, grad_t, buffer_t, true, false, kWrite>;
}

ChunkFn pick_chunk_fn(ScalarType param_dtype, ScalarType grad_dtype, ScalarType buffer_dtype, bool momentum,
                      bool nesterov, WriteBack write) {
  return dispatch_param_grad_types(param_dtype, grad_dtype, [&](auto param, auto grad) {
    using param_t = decltype(param);
    using grad_t = decltype(grad);
    return dispatch_write_back<param_t>(write, [&](auto kind) -> ChunkFn {
      constexpr WriteBack kWrite = decltype(kind)::value;
      if (buffer_dtype == kChar) {
        return nesterov ? sgd_int8_chunk<param_t, grad_t, true, kWrite>
                        : sgd_int8_chunk<param_t, grad_t, false, kWrite>;
      }
      return dispatch_moment_type(buffer_dtype, [&](auto buffer) {
        return pick_chunk_fn<param_t, grad_t, decltype(buffer), kWrite>(momentum, nesterov);
      });
    });
  });
}

}  // namespace

void sgd_step_cpu(FUSED_OPTIM_SGD_ARGS) {
  const std::vector<Tensor> matched_grads = check_sgd_args(FUSED_OPTIM_SGD_ARG_NAMES);
  if (found_inf.has_value() && cpu_scalar(*found_inf) != 0.0f) return;  // a skipped step: touch nothing
  const bool has_momentum = momentum != 0.0;
  const float lr_value = static_cast<float>(lr_tensor.has_value() ? cpu_lr(*lr_tensor) : lr);
  const float scale = grad_scale.has_value() ? cpu_scalar(*grad_scale) : 1.0f;

  const bool master = !master_params.empty();
  const WriteBack write = write_back_of(stochastic_rounding, master_params);

  std::vector<TensorPointers> tensors(params.size());
  std::vector<ChunkFn> chunk_fns(params.size());
  std::vector<int64_t> numels;
  for (size_t i = 0; i < params.size(); ++i) {
    // read in place: item() costs a dispatch per tensor, which dominates a step over many small tensors
    const float step = steps.empty() ? 1.0f : *data_as<float>(steps[i]);
    const uint32_t stream = stream_key(static_cast<uint32_t>(seed), static_cast<uint32_t>(i),
                                       static_cast<uint32_t>(step + 1.0f));
    tensors[i] = TensorPointers{params[i].mutable_data_ptr(), matched_grads[i].const_data_ptr(),
                                has_momentum ? momentum_buffers[i].mutable_data_ptr() : nullptr,
                                master ? master_params[i].mutable_data_ptr() : nullptr,
                                moment_scales.empty() ? nullptr : data_as<uint16_t>(moment_scales[i]), stream,
                                sgd_scalars(momentum, dampening, weight_decay, maximize, lr_value, scale,
                                            has_momentum ? step : 1.0f)};
    chunk_fns[i] = pick_chunk_fn(params[i].scalar_type(), matched_grads[i].scalar_type(),
                                 has_momentum ? momentum_buffers[i].scalar_type() : kFloat, has_momentum, nesterov,
                                 write);
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
