// CPU Adam/AdamW: every tensor of a group cut into fixed-size chunks (chunks.h), OpenMP over the chunks, and a
// branch-free inner loop over one chunk that the compiler vectorises. The per-element math is fused_optim/adam.h, the same
// header the CUDA kernel includes.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "ops/torch_api.h"

#include "chunks.h"
#include "float_io.h"
#include "int8_blocks.h"
#include "int8_codes_simd.h"
#include "prefetch.h"
#include "ops/adam.h"
#include "ops/dispatch.h"
#include "fused_optim/moment_int8.h"
#include "fused_optim/rounding.h"

namespace fused_optim {
namespace {

struct TensorPointers {
  void* param;
  const void* grad;
  void* exp_avg;  // moment_t: float, or bf16 (moments="bf16"); int8 codes (moments="int8", exp_avg_sq uint8)
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  void* master;  // master_t: a float copy or an int16/int8 remainder (WriteBack)
  uint16_t* scales;  // moments="int8": the bf16 block scales, a row of `blocks` per moment
  int64_t blocks;
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
  // with bf16 params and moments the loop is bound by its arithmetic, and the prefetch's blocks cost it 3-8 %; fp16
  // params gain more from their conversions staged by the block (ParamIO)
  constexpr bool kPrefetch = !(std::is_same_v<param_t, c10::BFloat16> && kBf16Moments);
  ParamIO<kWrite, param_t, grad_t, /*kMayStage=*/kPrefetch> params{param, grad, master, t.random_stream};
  for_each_element<kPrefetch>(
      begin, end, params,
      [&](int32_t j) {
        const int64_t i = begin + j;
        const float p = params.load(i);
        float m = load_float(exp_avg, i), v = load_float(exp_avg_sq, i);
        float max_v = kAmsgrad ? load_float(max_exp_avg_sq, i) : 0.0f;
        const float updated = adam_update<kAmsgrad>(p, params.grad(i), m, v, max_v, s);
        const uint32_t bits = kBf16Moments ? chunk_moment_bits(stream0, begin, j) : 0u;
        store_moment(exp_avg, i, m, bits);
        store_moment(exp_avg_sq, i, v, bits >> 16);
        if (kAmsgrad) store_moment(max_exp_avg_sq, i, max_v, kBf16Moments ? chunk_moment_bits(stream1, begin, j) : 0u);
        params.store(i, updated);
      },
      [&](int64_t i) {
        prefetch_param_block<kWrite>(i, param, grad, master, exp_avg, exp_avg_sq);
        if constexpr (kAmsgrad) prefetch_block(i, max_exp_avg_sq);
      });
}

// moments="int8" (moment_int8.h), one block of kInt8Block elements after another (a chunk starts at a multiple of
// it): the update with dequantized moments, its fp32 moments (the second ones by their roots) kept in L1 and their
// largest magnitudes taken; then each moment's new block scale, and its codes.
template <typename param_t, typename grad_t, bool kAmsgrad, WriteBack kWrite>
void adam_int8_chunk(const TensorPointers& t, int64_t begin, int64_t end) {
  static_assert(kCpuChunk % kInt8Block == 0, "a chunk must start at a block");
  auto* __restrict__ param = static_cast<param_t*>(t.param);
  const auto* __restrict__ grad = static_cast<const grad_t*>(t.grad);
  auto* __restrict__ exp_avg = static_cast<int8_t*>(t.exp_avg);
  auto* __restrict__ exp_avg_sq = static_cast<uint8_t*>(t.exp_avg_sq);
  auto* __restrict__ max_exp_avg_sq = static_cast<uint8_t*>(t.max_exp_avg_sq);
  auto* __restrict__ master = static_cast<master_t<kWrite>*>(t.master);
  uint16_t* const m_scales = t.scales;
  uint16_t* const v_scales = t.scales + t.blocks;
  uint16_t* const max_scales = t.scales + 2 * t.blocks;
  const AdamScalars s = t.scalars;
  const uint32_t stream0 = moment_stream(t.random_stream, 0), stream1 = moment_stream(t.random_stream, 1);
  alignas(64) float m_new[kInt8Block], v_new[kInt8Block], max_new[kInt8Block];
  ParamIO<kWrite, param_t, grad_t> params{param, grad, master, t.random_stream};
  // `length`: kInt8Block as a compile-time constant for whole blocks (no loop remainder: the per-block overhead of a
  // run-time count cost as much as the arithmetic), the count itself for a tensor's last block
  const auto step_block = [&](int64_t start, auto length) {
    const int64_t block = start / kInt8Block;
    prefetch_param_block<kWrite>(start + kPrefetchAhead, param, grad, master, exp_avg, exp_avg_sq);
    if constexpr (kAmsgrad) prefetch_block(start + kPrefetchAhead, max_exp_avg_sq);
    const float m_step = signed_step(bf16_bits_to_float(m_scales[block]));
    const float v_step = unsigned_step(bf16_bits_to_float(v_scales[block]));
    const float max_step = kAmsgrad ? unsigned_step(bf16_bits_to_float(max_scales[block])) : 0.0f;
    // the old moments dequantized into L1 in a loop of their own: with the codes' byte loads in it, gcc vectorised the
    // update loop over 32 (AVX2) or 64 (AVX-512) elements a step and ran short of registers (3-5 % faster apart)
#pragma omp simd
    for (int32_t j = 0; j < length; ++j) {
      m_new[j] = dequantize_signed(exp_avg[start + j], m_step);
      v_new[j] = dequantize_unsigned(exp_avg_sq[start + j], v_step);
      max_new[j] = kAmsgrad ? dequantize_unsigned(max_exp_avg_sq[start + j], max_step) : 0.0f;
    }
    params.stage_in(start, length);
#pragma omp simd
    for (int32_t j = 0; j < length; ++j) {
      const int64_t i = start + j;
      float m = m_new[j], v = v_new[j];
      float max_v = kAmsgrad ? max_new[j] : 0.0f;
      params.store(i, adam_update<kAmsgrad>(params.load(i), params.grad(i), m, v, max_v, s));
      m_new[j] = m;
      v_new[j] = sqrtf(v);  // the second moments by their roots (moment_int8.h): the update took the same root
      max_new[j] = sqrtf(max_v);
    }
    params.stage_out(start, length);
    // the largest magnitudes in a loop of their own, over L1: in the update loop they cost it its registers
    uint32_t m_largest = 0, v_largest = 0, max_largest = 0;
#pragma omp simd reduction(max : m_largest, v_largest, max_largest)
    for (int32_t j = 0; j < length; ++j) {
      m_largest = std::max(m_largest, magnitude_bits(m_new[j]));
      v_largest = std::max(v_largest, magnitude_bits(v_new[j]));
      max_largest = std::max(max_largest, magnitude_bits(max_new[j]));
    }
    m_scales[block] = int8_scale_bits(m_largest);
    v_scales[block] = int8_scale_bits(v_largest);
    if (kAmsgrad) max_scales[block] = int8_scale_bits(max_largest);
    const float m_inverse = inverse_scale(m_scales[block]);
    const float v_inverse = inverse_scale(v_scales[block]);
    const float max_inverse = kAmsgrad ? inverse_scale(max_scales[block]) : 0.0f;
    const int32_t offset = static_cast<int32_t>(start - begin);
#if FUSED_OPTIM_INT8_CODES_SIMD
    if constexpr (!std::is_same_v<decltype(length), int32_t>) {  // a whole block
      using namespace int8_codes_simd;
      for_block_draws(stream0, begin, offset, [&](int32_t j, ints bits) {
        store_codes(exp_avg + start + j, signed_codes(m_new + j, m_inverse, low16(bits)));
        store_codes(exp_avg_sq + start + j, unsigned_codes(v_new + j, v_inverse, high16(bits)));
      });
      if (kAmsgrad) {
        for_block_draws(stream1, begin, offset, [&](int32_t j, ints bits) {
          store_codes(max_exp_avg_sq + start + j, unsigned_codes(max_new + j, max_inverse, low16(bits)));
        });
      }
      return;
    }
#endif
#pragma omp simd
    for (int32_t j = 0; j < length; ++j) {
      const uint32_t bits = chunk_moment_bits(stream0, begin, offset + j);  // exp_avg: low 16, exp_avg_sq: high 16
      exp_avg[start + j] = quantize_signed(m_new[j], m_inverse, bits & 0xFFFFu);
      exp_avg_sq[start + j] = quantize_unsigned(v_new[j], v_inverse, bits >> 16);
      if (kAmsgrad) {
        max_exp_avg_sq[start + j] =
            quantize_unsigned(max_new[j], max_inverse, chunk_moment_bits(stream1, begin, offset + j) & 0xFFFFu);
      }
    }
  };
  int64_t start = begin;
  for (; start + kInt8Block <= end; start += kInt8Block) step_block(start, std::integral_constant<int32_t, kInt8Block>{});
  if (start < end) step_block(start, static_cast<int32_t>(end - start));
}

using ChunkFn = void (*)(const TensorPointers&, int64_t, int64_t);

ChunkFn pick_chunk_fn(ScalarType param_dtype, ScalarType grad_dtype, ScalarType moment_dtype, bool amsgrad,
                      WriteBack write) {
  return dispatch_param_grad_types(param_dtype, grad_dtype, [&](auto param, auto grad) {
    using param_t = decltype(param);
    using grad_t = decltype(grad);
    if (moment_dtype == kChar) {
      return dispatch_write_back<param_t>(write, [&](auto kind) -> ChunkFn {
        constexpr WriteBack kWrite = decltype(kind)::value;
        return amsgrad ? adam_int8_chunk<param_t, grad_t, true, kWrite> : adam_int8_chunk<param_t, grad_t, false, kWrite>;
      });
    }
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
  const double lr_value = lr_tensor.has_value() ? cpu_lr(*lr_tensor) : lr;
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
                                moment_scales.empty() ? nullptr : data_as<uint16_t>(moment_scales[i]),
                                moment_scales.empty() ? 0 : moment_scales[i].size(1),
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
