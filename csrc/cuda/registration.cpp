// CUDA implementations of the fused_optim ops, for the dispatcher (the CPU ones: csrc/registration.cpp).
#include <torch/library.h>

#include "fused_optim/adam_launch.h"

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) {
  m.impl("adam_step_", &fused_optim::adam_step_cuda);
}
