// Test kernels for the CPU emulator (tests/test_emulator.py). Each exercises one piece of the
// GPU execution model; the tests check them against NumPy. Written for wb.h like every kernel.
#include "wb.h"

// Sum of each block's chunk of x through shared memory: a tree of __syncthreads() rounds.
// x: (gridDim.x * blockDim.x,), out: (gridDim.x,), counts: (gridDim.x, 3) =
// __syncthreads_count / _and / _or of (x > 0) over the block.
WB_KERNEL void block_sum(const float* WB_RESTRICT x, float* WB_RESTRICT out,
                         int* WB_RESTRICT counts) {
  __shared__ float buf[1024];
  const int t = threadIdx.x;
  const float v = x[blockIdx.x * blockDim.x + t];
  buf[t] = v;
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k /= 2) {  // blockDim.x is a power of two
    if (t < k) buf[t] += buf[t + k];
    __syncthreads();
  }
  const int n_pos = __syncthreads_count(v > 0.f);
  const int all_pos = __syncthreads_and(v > 0.f);
  const int any_pos = __syncthreads_or(v > 0.f);
  if (t == 0) {
    out[blockIdx.x] = buf[0];
    counts[blockIdx.x * 3 + 0] = n_pos;
    counts[blockIdx.x * 3 + 1] = all_pos;
    counts[blockIdx.x * 3 + 2] = any_pos;
  }
}

// Per thread (x, out: (n_threads,), out has 5 columns per thread):
//   0: sum over the warp (xor butterfly), 1: sum over segments of 8 lanes (width 8),
//   2: value of lane + 1 (shfl_down by 1; the last lane keeps its own),
//   3: value of lane - 2 (shfl_up by 2; lanes 0 and 1 keep their own),
//   4: value of lane 3 of the warp (broadcast).
WB_KERNEL void warp_shuffles(const float* WB_RESTRICT x, float* WB_RESTRICT out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float v = x[i];
  float s = v;
  for (int o = warpSize / 2; o > 0; o /= 2) s += WB_SHFL_XOR(s, o);
  float s8 = v;
  for (int o = 4; o > 0; o /= 2) s8 += WB_SHFL_XOR_W(s8, o, 8);
  out[i * 5 + 0] = s;
  out[i * 5 + 1] = s8;
  out[i * 5 + 2] = WB_SHFL_DOWN(v, 1);
  out[i * 5 + 3] = WB_SHFL_UP(v, 2);
  out[i * 5 + 4] = WB_SHFL(v, 3);
}

// Votes on pred (n_threads,): per thread the warp's ballot (uint64), any and all.
WB_KERNEL void warp_votes(const int* WB_RESTRICT pred, unsigned long long* WB_RESTRICT ballot,
                          int* WB_RESTRICT any_all) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int p = pred[i];
  ballot[i] = WB_BALLOT(p);
  any_all[2 * i + 0] = WB_ANY(p);
  any_all[2 * i + 1] = WB_ALL(p);
}

// Only lanes 0-15 of each warp exchange values (explicit partial mask); the others do not take
// part and must not be waited for. out[i] = x[i ^ 1] for lanes < 16, x[i] otherwise.
WB_KERNEL void partial_mask(const float* WB_RESTRICT x, float* WB_RESTRICT out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = x[i];
#if WB_HAS_WARP_SYNC
  if (wb_lane_id() < 16) v = __shfl_xor_sync((wb_lanemask_t)0xffff, v, 1);
#else
  if (wb_lane_id() < 16) v = __shfl_xor(v, 1);  // the active lanes are the mask
#endif
  out[i] = v;
}

// Histogram of values (n,) into bins (nbins,) with atomicAdd from every thread of every block;
// also the maximum through atomicMax and the float sum through atomicAdd.
WB_KERNEL void histogram(const int* WB_RESTRICT values, int n, int* WB_RESTRICT bins,
                         int* WB_RESTRICT max_value, float* WB_RESTRICT total) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    atomicAdd(&bins[values[i]], 1);
    atomicMax(max_value, values[i]);
    atomicAdd(total, (float)values[i]);
  }
}

// Every thread writes its global linear index at that index, and its (thread, block) coordinates.
// out: (n_total,), coords: (n_total, 6) = threadIdx.xyz, blockIdx.xyz.
WB_KERNEL void global_index(long long* WB_RESTRICT out, int* WB_RESTRICT coords) {
  const long long block = blockIdx.x + (long long)gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const long long per_block = (long long)blockDim.x * blockDim.y * blockDim.z;
  const long long i = block * per_block + wb_thread_linear();
  out[i] = i;
  coords[6 * i + 0] = threadIdx.x;
  coords[6 * i + 1] = threadIdx.y;
  coords[6 * i + 2] = threadIdx.z;
  coords[6 * i + 3] = blockIdx.x;
  coords[6 * i + 4] = blockIdx.y;
  coords[6 * i + 5] = blockIdx.z;
}

// Reverses each block's chunk of x through dynamic shared memory (blockDim.x floats), and reports
// what the block found in its dynamic shared memory before writing (the emulator poisons it).
WB_KERNEL void reverse_dynamic(const float* WB_RESTRICT x, float* WB_RESTRICT out,
                               unsigned int* WB_RESTRICT first_word) {
  WB_DYNAMIC_SHARED(float, tile);
  const int t = threadIdx.x;
  const int base = blockIdx.x * blockDim.x;
  if (t == 0) first_word[blockIdx.x] = __float_as_uint(tile[0]);
  __syncthreads();
  tile[t] = x[base + t];
  __syncthreads();
  out[base + t] = tile[blockDim.x - 1 - t];
}

// A template kernel, reachable only through name expressions: out = x * SCALE + bias (n,).
template <int SCALE>
__global__ void scale_add(const float* WB_RESTRICT x, float bias, float* WB_RESTRICT out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = x[i] * SCALE + bias;
}

// Scalars of each type come back out: the emulator must pass each with its exact C type.
WB_KERNEL void scalars(int32_t a, float b, uint32_t c, int64_t d, double e, uint16_t f,
                       int64_t* WB_RESTRICT ints, double* WB_RESTRICT floats) {
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    ints[0] = a;
    ints[1] = (int64_t)c;
    ints[2] = d;
    ints[3] = f;
    floats[0] = b;
    floats[1] = e;
  }
}

// fp16 / bf16 conversions of wb.h. h, b: (n,) bits -> out: (n, 2) floats; x: (n,) floats ->
// back: (n, 2) = x rounded to half bits, x rounded to bf16 bits.
WB_KERNEL void conversions(const uint16_t* WB_RESTRICT h, const uint16_t* WB_RESTRICT b,
                           const float* WB_RESTRICT x, float* WB_RESTRICT out,
                           uint16_t* WB_RESTRICT back, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[2 * i + 0] = wb_half_to_float(h[i]);
  out[2 * i + 1] = wb_bf16_to_float(b[i]);
  back[2 * i + 0] = wb_float_to_half(x[i]);
  back[2 * i + 1] = wb_float_to_bf16(x[i]);
}
