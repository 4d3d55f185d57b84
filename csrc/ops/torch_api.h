// The one header through which the C++ kernels see torch: LibTorch's stable ABI (torch/csrc/stable,
// torch/headeronly). setup.py compiles with TORCH_TARGET_VERSION set to torch 2.10, which limits the stable headers
// to what 2.10 has and makes torch's other C++ headers refuse to be included, so one build loads under every torch
// from 2.10 on (docs/design.md, Build). A build from source must also compile against an older torch's headers (the
// lent GPU machines have torch 2.11), whose HeaderOnlyArrayRef has equals() but no operator==.
#pragma once

#include <charconv>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>
#include <torch/headeronly/util/HeaderOnlyArrayRef.h>

namespace fused_optim {

using Tensor = torch::stable::Tensor;
// A schema's Tensor[]: the registration unboxes it into a vector that lives for the call, and passes a view of it.
using TensorList = torch::headeronly::HeaderOnlyArrayRef<Tensor>;
using ScalarType = torch::headeronly::ScalarType;
constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
constexpr ScalarType kHalf = ScalarType::Half;
constexpr ScalarType kDouble = ScalarType::Double;
constexpr ScalarType kLong = ScalarType::Long;
constexpr ScalarType kChar = ScalarType::Char;  // int8
constexpr ScalarType kByte = ScalarType::Byte;  // uint8

// A number in a message as Python prints a float ("-2.0", "nan", "-inf"), through std::to_chars: no stream, no
// locale. (A norm_type check that streamed its double segfaulted the process in the CUDA extension on an H200 with
// torch 2.11; the same check in the CPU extension raised as it should.)
inline std::string python_float(double value) {
  char digits[32];
  const std::to_chars_result written = std::to_chars(digits, digits + sizeof(digits), value);
  std::string text(digits, written.ptr);
  if (text.find_first_of(".eni") == std::string::npos) text += ".0";
  return text;
}

// What concat streams for each argument: doubles through python_float, the rest as they are.
template <typename T>
const T& message_part(const T& value) { return value; }
inline std::string message_part(double value) { return python_float(value); }

template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream text;
  (text << ... << message_part(args));
  return text.str();
}

}  // namespace fused_optim

// A failed check raises RuntimeError in Python with exactly this message (the stable ABI's STD_TORCH_CHECK would
// put the C++ function, file and line before it).
#define FO_CHECK(cond, ...)                                                                                   \
  do {                                                                                                        \
    if (!(cond)) throw std::runtime_error(::fused_optim::concat(__VA_ARGS__));                                \
  } while (0)

// IndexError in Python, as torch's for an out-of-range class index (torch maps std::out_of_range to IndexError).
#define FO_CHECK_INDEX(cond, ...)                                                                             \
  do {                                                                                                        \
    if (!(cond)) throw std::out_of_range(::fused_optim::concat(__VA_ARGS__));                                 \
  } while (0)

namespace fused_optim {

// "cpu", "cuda:0": for messages (the stable Device has no operator<<).
inline std::string device_name(const torch::stable::Device& device) {
  const char* type = device.is_cpu() ? "cpu" : device.is_cuda() ? "cuda" : "device";
  return device.has_index() && !device.is_cpu() ? concat(type, ":", static_cast<int>(device.index())) : type;
}

// What the checks read of a tensor, read once: every accessor of a stable Tensor is a call into libtorch, and a
// group of hundreds of tensors is checked on every step.
struct __attribute__((visibility("hidden"))) TensorInfo {  // hidden like the stable Device it holds
  explicit TensorInfo(const Tensor& t)
      : dtype(t.scalar_type()), device(t.device()), sizes(t.sizes()), strides(t.strides()) {}
  ScalarType dtype;
  torch::stable::Device device;
  torch::headeronly::IntHeaderOnlyArrayRef sizes, strides;  // borrowed from the tensor, which outlives the call

  bool same_layout(const TensorInfo& other) const {
    return device == other.device && sizes.equals(other.sizes) && strides.equals(other.strides);
  }
};

// Whether a tensor's elements fill its memory span exactly once in some order of its dimensions (torch's
// is_non_overlapping_and_dense, which the stable ABI does not offer): the kernels walk such a tensor as one flat
// array, in the order of its strides, the same order for every tensor of the param's strides.
inline bool is_non_overlapping_and_dense(const TensorInfo& t) {
  const auto sizes = t.sizes;
  const auto strides = t.strides;
  const int64_t dims = static_cast<int64_t>(sizes.size());
  int64_t order[64];
  if (dims > 64) return false;
  int64_t kept = 0;
  for (int64_t d = 0; d < dims; ++d) {
    if (sizes[d] == 0) return true;  // empty: nothing to overlap
    if (sizes[d] != 1) order[kept++] = d;
  }
  // Insertion sort of the dimensions of size > 1 by stride, then each stride must be the product of the smaller ones.
  for (int64_t i = 1; i < kept; ++i) {
    for (int64_t j = i; j > 0 && strides[order[j]] < strides[order[j - 1]]; --j) std::swap(order[j], order[j - 1]);
  }
  int64_t expected = 1;
  for (int64_t i = 0; i < kept; ++i) {
    if (strides[order[i]] != expected) return false;
    expected *= sizes[order[i]];
  }
  return true;
}

// A copy of `src` laid out in memory as `layout` (same shape, dense): for a grad whose strides differ from its
// param's. to(copy=true) keeps the source's strides for a dense tensor, so the copy starts from `layout` itself.
inline Tensor copy_in_layout_of(const Tensor& layout, const Tensor& src) {
  Tensor out = torch::stable::to(layout, src.scalar_type(), std::nullopt, std::nullopt, std::nullopt,
                                 /*non_blocking=*/false, /*copy=*/true);
  torch::stable::copy_(out, src);
  return out;
}

// The data of a tensor whose dtype the op's checks have already established (the stable Tensor's typed accessor
// would ask libtorch for the dtype again).
template <typename T>
T* data_as(const Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}

// A one-element float32 tensor's value, read on the CPU (the CPU kernels' lr, grad scale, found_inf and step).
inline float cpu_scalar(const Tensor& t) { return *data_as<const float>(t); }

// An lr given as a tensor, read on the CPU: float32, or float64 (optimizer_checks.h's check_step_scalars).
inline double cpu_lr(const Tensor& t) { return t.scalar_type() == kDouble ? *data_as<const double>(t) : cpu_scalar(t); }

// A new float32 tensor of `sizes` on `like`'s device.
inline Tensor empty_float(torch::headeronly::IntHeaderOnlyArrayRef sizes, const Tensor& like) {
  return torch::stable::empty(sizes, kFloat, std::nullopt, like.device());
}

}  // namespace fused_optim
