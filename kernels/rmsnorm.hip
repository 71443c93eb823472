// RMSNorm: out = x / sqrt(mean(x^2) + eps) * w, row by row (llama.cpp: eps inside the sqrt).
//
// Launch: grid (n,), block (B,) with B a multiple of the warp size, at most 1024; one block per
// row. Reference: workbench.kernels.ops_kernels.rmsnorm_reference (= NumpyBackend.rmsnorm).
#include "wb.h"

// Sum of v over the whole block. Every thread gets the result. `red` is per-warp scratch in
// shared memory; blockDim.x must be a multiple of warpSize (every lane of a warp takes part in
// the shuffles) so that at most WB_MAX_WARPS_PER_BLOCK (<= warpSize) partial sums exist.
WB_DEVICE float rms_block_sum(float v, float* red) {
  for (int o = warpSize / 2; o > 0; o /= 2) v += WB_SHFL_XOR(v, o);
  const int lane = wb_lane_id();
  const int warp = wb_warp_id();
  const int n_warps = (int)blockDim.x / warpSize;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  // Every warp reduces the per-warp sums itself: no second barrier and broadcast needed.
  v = lane < n_warps ? red[lane] : 0.0f;
  for (int o = warpSize / 2; o > 0; o /= 2) v += WB_SHFL_XOR(v, o);
  return v;
}

// x: (n, dim) float32, w: (dim,) float32, out: (n, dim) float32 (must not alias x: the row is
// read twice, and other blocks never touch it, but restrict lets the compiler keep loads).
WB_KERNEL WB_LAUNCH_BOUNDS(1024) void rmsnorm(const float* WB_RESTRICT x,
                                              const float* WB_RESTRICT w,
                                              float* WB_RESTRICT out, int dim, float eps) {
  __shared__ float red[WB_MAX_WARPS_PER_BLOCK];  // (warps,) partial sums of squares
  const float* row = x + (size_t)blockIdx.x * dim;
  float* orow = out + (size_t)blockIdx.x * dim;

  // Sum of squares in float. The NumPy reference accumulates in float64; here each thread sums
  // dim/B terms and the tree adds log2(B) more levels, so the relative error stays around
  // (dim/B + log2 B) * 2^-24 (~1e-6 for dim 576..8192): tests use rtol 1e-5.
  float ss = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = row[i];
    ss = fmaf(v, v, ss);
  }
  ss = rms_block_sum(ss, red);
  // 1/sqrt, not rsqrtf: rsqrtf is an approximation (~2 ulp on NVIDIA, looser elsewhere), and the
  // division happens once per row.
  const float scale = 1.0f / sqrtf(ss / (float)dim + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) orow[i] = row[i] * scale * w[i];
}
