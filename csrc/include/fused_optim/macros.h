// Lets one header be compiled by nvcc for the GPU and by the host compiler for the CPU kernel.
#pragma once

#if defined(__CUDACC__)
#define FO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FO_HOST_DEVICE inline
#endif
