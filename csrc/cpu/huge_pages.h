// Asking Linux for transparent huge pages on a large buffer the kernel is about to write for the first time.
//
// A fresh (N, V) gradient buffer of the cross-entropy is hundreds of MB of pages never touched: with 4 KB pages its
// first write takes one page fault per 4 KB, which cost more than the kernel itself (fp32 4096 x 32000: 185 ms of
// faults beside a 60-95 ms kernel, 2 threads of an EPYC). With MADV_HUGEPAGE the same memory faults in 2 MB at a
// time (45 ms). It is advice: on other systems, with THP off, or on memory already touched, nothing changes.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fused_optim {

inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  if (bytes < 4 * kHugePage) return;  // small buffers: not worth a system call
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace fused_optim
