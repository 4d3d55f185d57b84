// CPU implementations of the fused_optim ops, for the dispatcher. The schemas are defined in Python
// (fused_optim/ops/), so every op exists on every install; each C++ extension only adds the kernels it built.
// The CUDA extension registers its kernels in csrc/cuda/registration.cpp.
#include "ops/torch_api.h"

#include "ops/accumulate.h"
#include "ops/adam.h"
#include "ops/cross_entropy.h"
#include "ops/lion.h"
#include "ops/sgd.h"
#include "ops/total_norm.h"

namespace fused_optim {
void triad_cpu(const Tensor& a, const Tensor& b, const Tensor& c, double scalar);
}

STABLE_TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("adam_step_", TORCH_BOX(&fused_optim::adam_step_cpu));
  m.impl("sgd_step_", TORCH_BOX(&fused_optim::sgd_step_cpu));
  m.impl("lion_step_", TORCH_BOX(&fused_optim::lion_step_cpu));
  m.impl("triad_", TORCH_BOX(&fused_optim::triad_cpu));
  m.impl("cross_entropy_forward", TORCH_BOX(&fused_optim::cross_entropy_forward_cpu));
  m.impl("cross_entropy_scale_grad_", TORCH_BOX(&fused_optim::cross_entropy_scale_grad_cpu));
  m.impl("cross_entropy_shard_stats", TORCH_BOX(&fused_optim::cross_entropy_shard_stats_cpu));
  m.impl("cross_entropy_shard_grad_", TORCH_BOX(&fused_optim::cross_entropy_shard_grad_cpu));
  m.impl("accumulate_grads_", TORCH_BOX(&fused_optim::accumulate_grads_cpu));
  m.impl("total_norm", TORCH_BOX(&fused_optim::total_norm_cpu));
}
