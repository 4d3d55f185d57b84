// CUDA implementations of the fused_optim ops, for the dispatcher (the CPU ones: csrc/registration.cpp).
#include <torch/library.h>

#include "ops/accumulate.h"
#include "ops/adam.h"
#include "ops/cross_entropy.h"
#include "ops/sgd.h"
#include "ops/total_norm.h"

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) {
  m.impl("adam_step_", &fused_optim::adam_step_cuda);
  m.impl("sgd_step_", &fused_optim::sgd_step_cuda);
  m.impl("cross_entropy_forward", &fused_optim::cross_entropy_forward_cuda);
  m.impl("cross_entropy_scale_grad_", &fused_optim::cross_entropy_scale_grad_cuda);
  m.impl("cross_entropy_shard_stats", &fused_optim::cross_entropy_shard_stats_cuda);
  m.impl("cross_entropy_shard_grad_", &fused_optim::cross_entropy_shard_grad_cuda);
  m.impl("accumulate_grads_", &fused_optim::accumulate_grads_cuda);
  m.impl("total_norm", &fused_optim::total_norm_cuda);
}
