// Broken kernels: each makes the emulator report a bug with the block and thread it happened in
// (tests/test_emulator.py). None of them is correct GPU code.
#include "wb.h"

// Only even threads reach the barrier; odd threads exit: a deadlock on every GPU.
WB_KERNEL void even_threads_sync(float* out) {
  if (threadIdx.x % 2 == 0) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1.f;
}

// The two halves of the block wait at different __syncthreads() calls.
WB_KERNEL void divergent_barriers(float* out) {
  if (threadIdx.x < blockDim.x / 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

// Lanes 16-31 of each warp skip a full-mask shuffle that names them.
WB_KERNEL void half_warp_shuffle(float* out) {
  float v = 1.f;
  if (wb_lane_id() < 16) v = WB_SHFL_XOR(v, 1);
  out[threadIdx.x] = v;
}

// A CUDA-style 32-bit full mask: right for 32-wide warps, wrong for 64-wide ones.
WB_KERNEL void cuda_mask_shuffle(float* out) {
#if WB_HAS_WARP_SYNC
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 1);
#endif
}

// One thread of one block traps or fails an assertion.
WB_KERNEL void trap_one(int block, int thread) {
  if ((int)blockIdx.x == block && (int)threadIdx.x == thread) WB_TRAP();
}
WB_KERNEL void assert_one(int block, int thread) {
  WB_ASSERT((int)blockIdx.x != block || (int)threadIdx.x != thread);
}

// One thread of one block writes through a bad pointer (an address passed in, so the compiler
// cannot see the fault coming).
WB_KERNEL void bad_write(float* out, int64_t bad_address, int block, int thread) {
  float* p = out + blockIdx.x * blockDim.x;
  if ((int)blockIdx.x == block && (int)threadIdx.x == thread) p = (float*)bad_address;
  p[threadIdx.x] = 1.f;
}
