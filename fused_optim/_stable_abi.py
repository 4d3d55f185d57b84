"""The LibTorch stable ABI version the C++ kernels are compiled for: read by setup.py (without importing the
package), by _backend.py (which torch may load them) and by the PTX tests (the same compile flags)."""

# The oldest torch whose stable ABI the kernels use: the extensions load under it and every later release.
STABLE_ABI_TARGET = (2, 10)

# TORCH_TARGET_VERSION limits torch's stable headers to what STABLE_ABI_TARGET has, and makes torch's other C++
# headers refuse to be included. USE_CUDA: the stable C shim declares its CUDA functions (the current stream) only
# then; the CPU sources include none of them.
STABLE_ABI_FLAGS = ["-DTORCH_TARGET_VERSION=0x{:02x}{:02x}000000000000".format(*STABLE_ABI_TARGET), "-DUSE_CUDA"]
