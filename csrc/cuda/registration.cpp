// CUDA implementations of the fused_optim ops, for the dispatcher (the CPU ones: csrc/registration.cpp).
#include "ops/torch_api.h"

#include "ops/accumulate.h"
#include "ops/adam.h"
#include "ops/cross_entropy.h"
#include "ops/lion.h"
#include "ops/sgd.h"
#include "ops/total_norm.h"

STABLE_TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) {
  m.impl("adam_step_", TORCH_BOX(&fused_optim::adam_step_cuda));
  m.impl("sgd_step_", TORCH_BOX(&fused_optim::sgd_step_cuda));
  m.impl("lion_step_", TORCH_BOX(&fused_optim::lion_step_cuda));
  m.impl("cross_entropy_forward", TORCH_BOX(&fused_optim::cross_entropy_forward_cuda));
  m.impl("cross_entropy_scale_grad_", TORCH_BOX(&fused_optim::cross_entropy_scale_grad_cuda));
  m.impl("cross_entropy_shard_stats", TORCH_BOX(&fused_optim::cross_entropy_shard_stats_cuda));
  m.impl("cross_entropy_shard_grad_", TORCH_BOX(&fused_optim::cross_entropy_shard_grad_cuda));
  m.impl("accumulate_grads_", TORCH_BOX(&fused_optim::accumulate_grads_cuda));
  m.impl("total_norm", TORCH_BOX(&fused_optim::total_norm_cuda));
}
