// CUDA Adam/AdamW with moments="int8" (fused_optim/moment_int8.h): multi_tensor.cuh's launch table, a block per
// chunk of a tensor, and every thread 8 elements an iteration. The 8 threads of consecutive lanes that hold one
// 64-element block of codes find the block's new scale together (the largest magnitude, by three warp shuffles),
// so dequantize -> update -> requantize stays one pass with nothing in shared memory. Param, grad and master move
// in 16-byte vectors as in adam.cu, the codes in 8-byte ones.
#include <algorithm>
#include <cstdint>

#include "ops/torch_api.h"
#include "launch.cuh"

#include "ops/adam.h"
#include "ops/dispatch.h"
#include "fused_optim/moment_int8.h"
#include "fused_optim/rounding.h"
#include "adam_block.cuh"
#include "int8_codes.cuh"
#include "multi_tensor.cuh"

namespace fused_optim {
namespace {

constexpr int kThreads = 512;
using multi_tensor::kVec;
constexpr int64_t kChunk = 16 * 1024;  // a multiple of kInt8Block: a chunk starts at a block of codes
static_assert(kChunk % kInt8Block == 0, "a chunk starts at a block of codes");
using int8_codes::block_largest;
using int8_codes::kLanesPerBlock;
using int8_codes::load_codes;
using int8_codes::store_codes;

struct Int8Args {
  void* param;
  const void* grad;
  int8_t* exp_avg;
  uint8_t* exp_avg_sq;
  uint8_t* max_exp_avg_sq;
  void* master;
  uint16_t* scales;  // bf16 bits: exp_avg's row, exp_avg_sq's, max_exp_avg_sq's, each ceil(numel / 64) long
  const float* step;
  uint32_t index;  // in the caller's list: keys the random stream
  int64_t numel;
};
using Table = multi_tensor::LaunchTable<Int8Args>;

template <typename param_t, typename grad_t, bool kAmsgrad, WriteBack kWrite>
__global__ void __launch_bounds__(kThreads)
    adam_int8_kernel(const __grid_constant__ Table table, const AdamHyper hyper, const DeviceLr lr,
                     const float* __restrict__ grad_scale,
                     const float* __restrict__ found_inf, const uint32_t seed) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // GradScaler found inf/NaN: skip, touch nothing
  const multi_tensor::BlockWork work = multi_tensor::block_work(table, kChunk);
  const Int8Args& t = table.tensors[work.tensor];

  const AdamBlockScalars block = adam_block_scalars(hyper, lr, grad_scale, seed, t.step, t.index);
  const AdamScalars s = block.scalars;
  const uint32_t stream = block.stream;
  const uint32_t stream0 = moment_stream(stream, 0), stream1 = moment_stream(stream, 1);

  auto* param = static_cast<param_t*>(t.param);
  const auto* grad = static_cast<const grad_t*>(t.grad);
  auto* master = static_cast<master_t<kWrite>*>(t.master);
  const int64_t row = (t.numel + kInt8Block - 1) / kInt8Block;
  uint16_t* const m_scales = t.scales;
  uint16_t* const v_scales = t.scales + row;
  uint16_t* const max_scales = t.scales + 2 * row;
  const auto aligned8 = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 8 == 0; };
  const bool vectorizable = multi_tensor::aligned16(param) && multi_tensor::aligned16(grad) &&
                            aligned8(t.exp_avg) && aligned8(t.exp_avg_sq) && (!kAmsgrad || aligned8(t.max_exp_avg_sq)) &&
                            (master == nullptr || multi_tensor::aligned16(master));

  // Every thread runs every iteration (the shuffles need all lanes), with 0..kVec elements of its own.
  for (int64_t base = work.begin; base < work.end; base += kThreads * kVec) {
    const int64_t i = base + threadIdx.x * kVec;
    const int valid = static_cast<int>(std::clamp<int64_t>(work.end - i, 0, kVec));
    const bool vector = vectorizable && valid == kVec;
    const int64_t block = i / kInt8Block;
    float p[kVec], g[kVec], m[kVec], v[kVec], vmax[kVec];
    int8_t m_codes[kVec];
    uint8_t v_codes[kVec], max_codes[kVec];
    load_codes(t.exp_avg + i, vector, valid, m_codes);
    load_codes(t.exp_avg_sq + i, vector, valid, v_codes);
    if (kAmsgrad) load_codes(t.max_exp_avg_sq + i, vector, valid, max_codes);
    int8_codes::load_params_and_grads<kWrite>(param, master, grad, i, vector, valid, p, g);
    const bool any = valid > 0;
    const float m_step = any ? signed_step(bf16_bits_to_float(m_scales[block])) : 0.0f;
    const float v_step = any ? unsigned_step(bf16_bits_to_float(v_scales[block])) : 0.0f;
    const float max_step = kAmsgrad && any ? unsigned_step(bf16_bits_to_float(max_scales[block])) : 0.0f;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      m[k] = dequantize_signed(m_codes[k], m_step);
      v[k] = dequantize_unsigned(v_codes[k], v_step);
      vmax[k] = kAmsgrad ? dequantize_unsigned(max_codes[k], max_step) : 0.0f;
      p[k] = adam_update<kAmsgrad>(p[k], g[k], m[k], v[k], vmax[k], s);
      v[k] = sqrtf(v[k]);  // the second moments by their roots (moment_int8.h): the update took the same root
      vmax[k] = sqrtf(vmax[k]);
    }
    const uint16_t m_scale_bits = int8_scale_bits(block_largest(m, valid));
    const uint16_t v_scale_bits = int8_scale_bits(block_largest(v, valid));
    const uint16_t max_scale_bits = kAmsgrad ? int8_scale_bits(block_largest(vmax, valid)) : 0;
    if (any && threadIdx.x % kLanesPerBlock == 0) {
      m_scales[block] = m_scale_bits;
      v_scales[block] = v_scale_bits;
      if (kAmsgrad) max_scales[block] = max_scale_bits;
    }
    const float m_inverse = inverse_scale(m_scale_bits);
    const float v_inverse = inverse_scale(v_scale_bits);
    const float max_inverse = kAmsgrad ? inverse_scale(max_scale_bits) : 0.0f;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const uint32_t bits = moment_bits(stream0, i + k);  // exp_avg: low 16, exp_avg_sq: high 16
      m_codes[k] = quantize_signed(m[k], m_inverse, bits & 0xFFFFu);
      v_codes[k] = quantize_unsigned(v[k], v_inverse, bits >> 16);
      if (kAmsgrad) max_codes[k] = quantize_unsigned(vmax[k], max_inverse, moment_bits(stream1, i + k) & 0xFFFFu);
    }
    store_codes(t.exp_avg + i, vector, valid, m_codes);
    store_codes(t.exp_avg_sq + i, vector, valid, v_codes);
    if (kAmsgrad) store_codes(t.max_exp_avg_sq + i, vector, valid, max_codes);
    int8_codes::store_params<kWrite>(param, master, i, vector, valid, p, stream);
  }
}

}  // namespace

void adam_int8_step_cuda(FUSED_OPTIM_ADAM_ARGS, const std::vector<Tensor>& matched_grads) {
  const WriteBack write = write_back_of(stochastic_rounding, master_params);
  const AdamHyper hyper{beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize};
  const cudaStream_t stream = current_stream();
  const DeviceLr lr_source = device_lr(lr, lr_tensor);
  const float* scale_ptr = optional_ptr(grad_scale);
  const float* found_inf_ptr = optional_ptr(found_inf);
  const auto launch = [&](const Table& table, int key) {
    multi_tensor::dispatch_dtype_pair(key, [&](auto param, auto grad) {
      using param_t = decltype(param);
      using grad_t = decltype(grad);
      dispatch_write_back<param_t>(write, [&](auto kind) {
        constexpr WriteBack kWrite = decltype(kind)::value;
        const auto kernel = amsgrad ? adam_int8_kernel<param_t, grad_t, true, kWrite>
                                    : adam_int8_kernel<param_t, grad_t, false, kWrite>;
        kernel<<<table.num_blocks(), kThreads, 0, stream>>>(table, hyper, lr_source, scale_ptr, found_inf_ptr,
                                                            static_cast<uint32_t>(seed));
        check_launch();
      });
    });
  };
  multi_tensor::TableFiller<Table, decltype(launch)> filler(kChunk, launch);
  for (size_t i = 0; i < params.size(); ++i) {
    filler.add(Int8Args{params[i].mutable_data_ptr(), matched_grads[i].const_data_ptr(),
                        data_as<int8_t>(exp_avgs[i]), data_as<uint8_t>(exp_avg_sqs[i]),
                        amsgrad ? data_as<uint8_t>(max_exp_avg_sqs[i]) : nullptr,
                        master_params.empty() ? nullptr : master_params[i].mutable_data_ptr(),
                        data_as<uint16_t>(moment_scales[i]), data_as<const float>(steps[i]),
                        static_cast<uint32_t>(i), 0},
               params[i].numel(), multi_tensor::dtype_pair(params[i].scalar_type(), matched_grads[i].scalar_type()));
  }
  filler.flush();
  multi_tensor::increment_steps(steps, found_inf_ptr, stream);
}

}  // namespace fused_optim
