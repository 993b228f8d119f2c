// Load Triton PTX / cubin and launch its entries.
//
// Uses the runtime's library-management API (cudaLibraryLoadData, CUDA >= 12;
// the runtime equivalent of the driver's cuModuleLoadData / cuLibraryLoadData)
// so the library links against cudart alone: no libcuda.so (or its stub) is
// needed at build time, and none exists on the CPU build machines.
#include <cuda_runtime_api.h>

#include "mixport_kernels.h"

extern "C" int mixport_module_load(const void* image, const char* entry, int shared_bytes,
                                   void** module, void** function) {
  if (!image || !entry || !module || !function || shared_bytes < 0) return MIXPORT_EINVAL;
  cudaLibrary_t lib = nullptr;
  cudaError_t rc = cudaLibraryLoadData(&lib, image, nullptr, nullptr, 0, nullptr, nullptr, 0);
  if (rc != cudaSuccess) return static_cast<int>(rc);
  cudaKernel_t kernel = nullptr;
  rc = cudaLibraryGetKernel(&kernel, lib, entry);
  if (rc == cudaSuccess && shared_bytes > 48 * 1024)
    rc = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                              cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes);
  if (rc != cudaSuccess) {
    cudaLibraryUnload(lib);
    return static_cast<int>(rc);
  }
  *module = lib;
  *function = kernel;
  return 0;
}

extern "C" int mixport_module_unload(void* module) {
  if (!module) return MIXPORT_EINVAL;
  return static_cast<int>(cudaLibraryUnload(static_cast<cudaLibrary_t>(module)));
}

extern "C" int mixport_launch(void* function, const unsigned grid[3], int num_warps,
                              int shared_bytes, void* stream, void** args) {
  if (!function || !grid || num_warps < 1 || shared_bytes < 0 || !args) return MIXPORT_EINVAL;
  if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0) return 0;
  const dim3 blocks(grid[0], grid[1], grid[2]);
  const dim3 threads(32 * static_cast<unsigned>(num_warps), 1, 1);
  return static_cast<int>(cudaLaunchKernel(static_cast<const void*>(function), blocks, threads,
                                           args, static_cast<size_t>(shared_bytes),
                                           static_cast<cudaStream_t>(stream)));
}
