// The emulator's stand-in for <hip/hip_runtime.h> (the emulator puts a hip/hip_runtime.h that
// includes this file first on the include path).
//
// HIP tutorials begin kernels with `#include <hip/hip_runtime.h>`. On the CPU emulator everything a
// kernel takes from that header (__global__, threadIdx, __syncthreads, shuffles, atomics, math
// intrinsics) is already provided by wb_emu.h, which the emulator includes before the source; the
// real header would pull in the ROCm host runtime and its platform macros. On a GPU the real one
// is used. Host-side API calls (hipMalloc, hipLaunchKernelGGL, ...) have no meaning inside a
// kernel source and are not provided.
#ifndef WB_EMU_SHIM_HIP_RUNTIME_H
#define WB_EMU_SHIM_HIP_RUNTIME_H

#include "wb_emu.h"

// HIP's index aliases
#define hipThreadIdx_x (threadIdx.x)
#define hipThreadIdx_y (threadIdx.y)
#define hipThreadIdx_z (threadIdx.z)
#define hipBlockIdx_x (blockIdx.x)
#define hipBlockIdx_y (blockIdx.y)
#define hipBlockIdx_z (blockIdx.z)
#define hipBlockDim_x (blockDim.x)
#define hipBlockDim_y (blockDim.y)
#define hipBlockDim_z (blockDim.z)
#define hipGridDim_x (gridDim.x)
#define hipGridDim_y (gridDim.y)
#define hipGridDim_z (gridDim.z)

#endif  // WB_EMU_SHIM_HIP_RUNTIME_H
