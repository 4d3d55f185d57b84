// Lets one header be compiled by nvcc for the GPU and by the host compiler for the CPU kernel.
#pragma once

#if defined(__CUDACC__)
#define FO_HOST_DEVICE __host__ __device__ __forceinline__
#else
// always inlined, as nvcc's __forceinline__: every one of these is element math meant for a vectorised loop, and a call
// left out of line (gcc's budget gave out in some instantiations) keeps the loop scalar
#define FO_HOST_DEVICE inline __attribute__((always_inline))
#endif
