// Multi-tensor CUDA launches: one kernel launch covers a whole list of tensors (an optimizer's param group, a
// model's grads), instead of one launch per tensor.
//
// How a kernel uses it (csrc/cuda/accumulate.cu is a short example):
//
//   struct MyArgs {                 // one row per tensor: its pointers, its per-tensor values, and its size
//     float* out; const void* in;
//     int64_t numel;                // required: block_work() reads it
//   };
//   using Table = multi_tensor::LaunchTable<MyArgs>;
//
//   template <typename in_t>
//   __global__ void __launch_bounds__(kThreads) my_kernel(const __grid_constant__ Table table) {
//     const multi_tensor::BlockWork work = multi_tensor::block_work(table, kChunk);
//     const MyArgs& t = table.tensors[work.tensor];
//     multi_tensor::for_each_element<kThreads>(work, multi_tensor::aligned16(t.out) && multi_tensor::aligned16(t.in),
//         [&](int64_t i) { /* kVec elements from i, 16-byte loads and stores */ },
//         [&](int64_t i) { /* element i alone: unaligned tensors and the tail */ });
//   }
//
//   multi_tensor::TableFiller<Table> filler(kChunk, [&](const Table& table, int key) {
//     my_kernel<...by key...><<<table.num_blocks(), kThreads, 0, stream>>>(table);
//     check_launch();
//   });
//   for (each tensor i) filler.add(MyArgs{...}, numel_i, /*key=*/dtype_i);   // launches as tables fill up
//   filler.flush();                                                        // the last table
//
// Why a __grid_constant__ parameter: the table (pointers, sizes, where each tensor's chunks start) travels with
// the launch itself (kernel parameters may take up to 32 KB since CUDA 12.1 on Volta and newer): no host-to-device
// copy, no buffer to keep alive until the kernel ran, and a CUDA graph captures it by value. __grid_constant__
// lets the kernel index it at run time (the binary search below) without a local copy.
//
// Each block owns one chunk (`chunk_size` elements) of one tensor, found by binary search over the chunk prefix
// sums; every thread then moves kVec = 8 elements per iteration: one 16-byte access of bf16/fp16, two of fp32.
// Offsets are int64 (a tensor may hold more than 2^31 elements); the grid holds fewer than 2^31 blocks.

#pragma once

#include <cstdint>
#include <type_traits>
#include <utility>

#include <cuda_runtime.h>

#include "launch.cuh"
#include "ops/dispatch.h"
#include "ops/torch_api.h"

namespace fused_optim {
namespace multi_tensor {

// Elements per thread per iteration: one 16-byte load of eight 16-bit values, two of fp32.
constexpr int kVec = 8;

// What the table may take of the 32764 bytes of kernel parameters; the rest is left for the kernel's own.
constexpr int kTableBytes = 30 * 1024;

// As many tensors as fit the budget, at most 1024: past a few hundred, a longer table only saves launches of a
// few microseconds each, and a deeper search costs every block.
template <typename Args>
constexpr int max_tensors_per_launch() {
  constexpr int fit = static_cast<int>((kTableBytes - 2 * sizeof(int32_t)) / (sizeof(Args) + sizeof(int32_t)));
  return fit < 1024 ? fit : 1024;
}

// The per-launch table. `Args` is the kernel's per-tensor row; it must have an `int64_t numel` member.
template <typename Args, int kMaxTensors = max_tensors_per_launch<Args>()>
struct LaunchTable {
  static_assert(std::is_trivially_copyable_v<Args>, "kernel parameters are copied byte for byte");
  static constexpr int kCapacity = kMaxTensors;

  Args tensors[kMaxTensors];
  int32_t first_chunk[kMaxTensors + 1];  // prefix sums of chunk counts; first_chunk[num_tensors] = grid size
  int32_t num_tensors;

  int32_t num_blocks() const { return first_chunk[num_tensors]; }
};

// The elements one block owns: [begin, end) of table.tensors[tensor].
struct BlockWork {
  int tensor;
  int64_t begin;
  int64_t end;
};

#if defined(__CUDACC__)

// This block's tensor is the last one whose first chunk is at or before the block (tensors with no chunks share
// their successor's first chunk and are never picked).
template <typename Table>
__device__ __forceinline__ BlockWork block_work(const Table& table, int64_t chunk_size) {
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  int lo = 0, hi = table.num_tensors;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (table.first_chunk[mid] <= block) lo = mid; else hi = mid;
  }
  const int64_t begin = static_cast<int64_t>(block - table.first_chunk[lo]) * chunk_size;  // int64: numel > 2^31
  const int64_t numel = table.tensors[lo].numel;
  return BlockWork{lo, begin, begin + chunk_size < numel ? begin + chunk_size : numel};
}

__device__ __forceinline__ bool aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0;
}

// Calls vec_fn(i) for the block's whole vectors [i, i + kVec) when `vectorizable` (every array the kernel touches
// is 16-byte aligned: chunk starts are multiples of kVec, so then every vector is too), and scalar_fn(i) for
// the elements left: the tail, or all of them when not vectorizable. kThreads is the block size.
template <int kThreads, typename VecFn, typename ScalarFn>
__device__ __forceinline__ void for_each_element(const BlockWork& work, bool vectorizable, VecFn&& vec_fn,
                                                 ScalarFn&& scalar_fn) {
  int64_t scalar_begin = work.begin;
  if (vectorizable) {
    const int64_t vec_end = work.begin + (work.end - work.begin) / kVec * kVec;
    for (int64_t i = work.begin + threadIdx.x * kVec; i < vec_end; i += kThreads * kVec) vec_fn(i);
    scalar_begin = vec_end;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < work.end; i += kThreads) scalar_fn(i);
}

// 16-byte loads and stores of kVec elements, as fp32. The fp32 stores are written in PTX: nvcc once sank float4
// stores below a branch join and split them into 4-byte ones (seen in adam.cu's PTX, CUDA 13.0).
__device__ __forceinline__ void load_vec(const float* ptr, float (&out)[kVec]) {
#pragma unroll
  for (int k = 0; k < kVec / 4; ++k) {
    const float4 v = reinterpret_cast<const float4*>(ptr)[k];
    out[4 * k] = v.x, out[4 * k + 1] = v.y, out[4 * k + 2] = v.z, out[4 * k + 3] = v.w;
  }
}

__device__ __forceinline__ void store_vec(float* ptr, const float (&in)[kVec]) {
#pragma unroll
  for (int k = 0; k < kVec / 4; ++k) {
    asm volatile("st.global.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(ptr + 4 * k), "f"(in[4 * k]), "f"(in[4 * k + 1]),
                 "f"(in[4 * k + 2]), "f"(in[4 * k + 3])
                 : "memory");
  }
}

// bf16 and fp16 (c10::BFloat16, c10::Half): the 8 elements are the 16-bit halves of one uint4.
template <typename T>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[kVec]) {
  static_assert(sizeof(T) == 2 && kVec == 8, "one 16-byte load of eight 16-bit elements");
  const uint4 v = *reinterpret_cast<const uint4*>(ptr);
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    out[2 * k] = static_cast<float>(T(static_cast<uint16_t>(words[k] & 0xFFFFu), T::from_bits()));
    out[2 * k + 1] = static_cast<float>(T(static_cast<uint16_t>(words[k] >> 16), T::from_bits()));
  }
}

// Stores kVec values already rounded to T (the caller picks the rounding: nearest, or stochastic).
template <typename T>
__device__ __forceinline__ void store_vec(T* ptr, const T (&in)[kVec]) {
  static_assert(sizeof(T) == 2 && kVec == 8, "one 16-byte store of eight 16-bit elements");
  uint32_t words[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) words[k] = static_cast<uint32_t>(in[2 * k].x) | (static_cast<uint32_t>(in[2 * k + 1].x) << 16);
  *reinterpret_cast<uint4*>(ptr) = make_uint4(words[0], words[1], words[2], words[3]);
}

// kVec optimizer moments at i into their storage type (rounding.h's to_moment): fp32 as they are, bf16 stochastically
// with the low 16 of bits[k] >> shift.
template <typename moment_t>
__device__ __forceinline__ void store_moment_vec(moment_t* ptr, int64_t i, const float (&value)[kVec],
                                                 const uint32_t (&bits)[kVec], int shift) {
  if constexpr (std::is_same_v<moment_t, float>) {
    store_vec(ptr + i, value);
  } else {
    moment_t out[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = to_moment<moment_t>(value[k], bits[k] >> shift);
    store_vec(ptr + i, out);
  }
}

// An optimizer's param values as fp32, by write-back (rounding.h): the param's, its fp32 master copy's, or the bf16
// param joined with its int16 (int8) remainder (a 16-byte load of eight bf16 halves, and one of 16 or 8 bytes).
// Vectors of kVec at i, and one element at i.
template <WriteBack kWrite, typename param_t>
__device__ __forceinline__ void load_param_vec(const param_t* param, const master_t<kWrite>* master, int64_t i,
                                               float (&out)[kVec]) {
  if constexpr (kWrite == WriteBack::kMaster) {
    load_vec(master + i, out);
  } else if constexpr (kWrite == WriteBack::kRemainder) {
    const uint4 bits = *reinterpret_cast<const uint4*>(param + i);
    const uint4 rest = *reinterpret_cast<const uint4*>(master + i);
    const uint32_t b[4] = {bits.x, bits.y, bits.z, bits.w}, r[4] = {rest.x, rest.y, rest.z, rest.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[2 * k] = join_bf16_master(static_cast<uint16_t>(b[k]), static_cast<int16_t>(r[k] & 0xFFFFu));
      out[2 * k + 1] = join_bf16_master(static_cast<uint16_t>(b[k] >> 16), static_cast<int16_t>(r[k] >> 16));
    }
  } else if constexpr (kWrite == WriteBack::kRemainder8) {  // eight int8 remainders: one 8-byte load
    const uint4 bits = *reinterpret_cast<const uint4*>(param + i);
    const uint2 rest = *reinterpret_cast<const uint2*>(master + i);
    const uint32_t b[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const uint32_t word = k < 4 ? rest.x : rest.y;
      const uint16_t param_bits = static_cast<uint16_t>(k % 2 == 0 ? b[k / 2] : b[k / 2] >> 16);
      out[k] = join_bf16_master24(param_bits, static_cast<int8_t>((word >> (8 * (k % 4))) & 0xFFu));
    }
  } else {
    load_vec(param + i, out);
  }
}

template <WriteBack kWrite, typename param_t>
__device__ __forceinline__ float load_param_at(const param_t* param, const master_t<kWrite>* master, int64_t i) {
  if constexpr (kWrite == WriteBack::kMaster) return master[i];
  if constexpr (kWrite == WriteBack::kRemainder) return join_bf16_master(param[i].x, master[i]);
  if constexpr (kWrite == WriteBack::kRemainder8) return join_bf16_master24(param[i].x, master[i]);
  return static_cast<float>(param[i]);
}

// The update's fp32 results into the param (and its master) by write-back; stochastic rounding draws element
// i + k of the tensor's random stream.
template <WriteBack kWrite, typename param_t>
__device__ __forceinline__ void store_param_vec(param_t* param, master_t<kWrite>* master, int64_t i,
                                                const float (&value)[kVec], uint32_t stream) {
  if constexpr (kWrite == WriteBack::kRemainder) {
    uint32_t b[4], r[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint16_t low = bf16_master_bits(value[2 * k]), high = bf16_master_bits(value[2 * k + 1]);
      b[k] = low | (static_cast<uint32_t>(high) << 16);
      r[k] = static_cast<uint16_t>(bf16_master_remainder(value[2 * k], low)) |
             (static_cast<uint32_t>(static_cast<uint16_t>(bf16_master_remainder(value[2 * k + 1], high))) << 16);
    }
    *reinterpret_cast<uint4*>(param + i) = make_uint4(b[0], b[1], b[2], b[3]);
    *reinterpret_cast<uint4*>(master + i) = make_uint4(r[0], r[1], r[2], r[3]);
  } else if constexpr (kWrite == WriteBack::kRemainder8) {
    uint32_t b[4] = {0, 0, 0, 0}, r[2] = {0, 0};
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const uint16_t bits = bf16_master24_bits(value[k]);
      b[k / 2] |= static_cast<uint32_t>(bits) << (16 * (k % 2));
      r[k / 4] |= static_cast<uint32_t>(static_cast<uint8_t>(bf16_master24_remainder(value[k], bits))) << (8 * (k % 4));
    }
    *reinterpret_cast<uint4*>(param + i) = make_uint4(b[0], b[1], b[2], b[3]);
    *reinterpret_cast<uint2*>(master + i) = make_uint2(r[0], r[1]);
  } else {
    if constexpr (kWrite == WriteBack::kMaster) store_vec(master + i, value);
    param_t out[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = to_param<param_t, kWrite == WriteBack::kStochastic>(value[k], stream, i + k);
    store_vec(param + i, out);
  }
}

template <WriteBack kWrite, typename param_t>
__device__ __forceinline__ void store_param_at(param_t* param, master_t<kWrite>* master, int64_t i, float value,
                                               uint32_t stream) {
  if constexpr (kWrite == WriteBack::kRemainder) {
    const uint16_t bits = bf16_master_bits(value);
    param[i] = param_t(bits, param_t::from_bits());
    master[i] = bf16_master_remainder(value, bits);
  } else if constexpr (kWrite == WriteBack::kRemainder8) {
    const uint16_t bits = bf16_master24_bits(value);
    param[i] = param_t(bits, param_t::from_bits());
    master[i] = bf16_master24_remainder(value, bits);
  } else {
    if constexpr (kWrite == WriteBack::kMaster) master[i] = value;
    param[i] = to_param<param_t, kWrite == WriteBack::kStochastic>(value, stream, i);
  }
}

#endif  // __CUDACC__

// Host side: fills tables and launches each one when it is full, when the launch key changes (kernels
// instantiated per dtype launch once per run of tensors of the same dtypes: pass e.g. the dtype as the key), and
// at flush(). launch(table, key) is called with at least one block in the table. Tensors with no elements take
// no row: a kernel that needs a tensor's position in the caller's list carries it in its Args.
template <typename Table, typename Launch>
class TableFiller {
 public:
  TableFiller(int64_t chunk_size, Launch launch) : chunk_size_(chunk_size), launch_(std::move(launch)) {
    table_.num_tensors = 0;
    table_.first_chunk[0] = 0;
  }

  template <typename Args>
  void add(const Args& args, int64_t numel, int key) {
    if (numel == 0) return;
    if (table_.num_tensors > 0 && key != key_) flush();
    key_ = key;
    const int n = table_.num_tensors;
    const int64_t chunks = (numel + chunk_size_ - 1) / chunk_size_;
    // Blocks of one launch must fit in a grid's 2^31 - 1: a table past half of that is launched at once.
    FO_CHECK(chunks < INT32_MAX / 2, "fused_optim: a tensor of ", numel, " elements is too large");
    table_.tensors[n] = args;
    table_.tensors[n].numel = numel;
    table_.first_chunk[n + 1] = table_.first_chunk[n] + static_cast<int32_t>(chunks);
    table_.num_tensors = n + 1;
    if (table_.num_tensors == Table::kCapacity || table_.first_chunk[n + 1] > INT32_MAX / 2) flush();
  }

  void flush() {
    if (table_.num_tensors == 0) return;
    launch_(static_cast<const Table&>(table_), key_);
    table_.num_tensors = 0;
  }

 private:
  Table table_;
  int64_t chunk_size_;
  Launch launch_;
  int key_ = 0;
};

// The launch key of a (param dtype, grad dtype) pair, for optimizers whose kernels are instantiated per pair, and
// the dispatch back to the pair's C++ types: fn(param_t{}, grad_t{}).
inline int dtype_pair(ScalarType param_dtype, ScalarType grad_dtype) {
  return static_cast<int>(param_dtype) * 256 + static_cast<int>(grad_dtype);
}

template <typename Fn>
void dispatch_dtype_pair(int key, Fn&& fn) {
  dispatch_param_grad_types(static_cast<ScalarType>(key / 256), static_cast<ScalarType>(key % 256), fn);
}

// The number of blocks (chunks) that `numel` elements take: for callers that size a per-block workspace up front.
inline int64_t num_chunks(int64_t numel, int64_t chunk_size) { return (numel + chunk_size - 1) / chunk_size; }

#if defined(__CUDACC__)
// The step counts of an optimizer call, each incremented once after every update launch of the call (same stream)
// read them, unless found_inf says the step was skipped: one tiny launch per kMaxSteps counts. In an unnamed
// namespace, so each .cu file has its own kernel (no cross-file device linking).
namespace {
constexpr int kMaxSteps = 1024;
constexpr int kStepThreads = 256;
struct StepTable {
  float* steps[kMaxSteps];
  int32_t count;
};

__global__ void increment_steps_kernel(const __grid_constant__ StepTable table, const float* __restrict__ found_inf) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= table.count || (found_inf != nullptr && *found_inf != 0.0f)) return;
  *table.steps[i] += 1.0f;
}

// Every count of `steps` (one-element float32 tensors), empty tensors' too (they took no row in an update table).
void increment_steps(TensorList steps, const float* found_inf, cudaStream_t stream) {
  StepTable table;
  table.count = 0;
  auto flush = [&] {
    if (table.count == 0) return;
    increment_steps_kernel<<<(table.count + kStepThreads - 1) / kStepThreads, kStepThreads, 0, stream>>>(table,
                                                                                                         found_inf);
    check_launch();
    table.count = 0;
  };
  for (const Tensor& step : steps) {
    table.steps[table.count++] = data_as<float>(step);
    if (table.count == kMaxSteps) flush();
  }
  flush();
}
}  // namespace
#endif  // __CUDACC__

}  // namespace multi_tensor
}  // namespace fused_optim
