// Kernels with one planted defect each (and clean twins) for the emulator's instrumented runs.
// tests/test_sanitizer.py finds each defect's line by the marker comment at its end
// (`// PLANT: kind`), so lines may move freely. One block of `blockDim.x` threads unless noted.

// Edge-block off-by-one: the last thread's neighbour x[n] is past the end.
extern "C" __global__ void edge_off_by_one(const float* x, float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = 0.5f * (x[i] + x[i + 1]);  // PLANT: out_of_bounds_read
}

extern "C" __global__ void edge_clean(const float* x, float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i];
}

// Missing barrier: each thread reads its mirror's element of the tile right after writing its own.
extern "C" __global__ void missing_barrier(const float* x, float* y) {
  __shared__ float tile[256];
  const int t = threadIdx.x;
  tile[t] = x[t];  // PLANT-OTHER: shared_race_raw
  y[t] = tile[blockDim.x - 1 - t];  // PLANT: shared_race_raw
}

extern "C" __global__ void reverse_clean(const float* x, float* y) {
  __shared__ float tile[256];
  const int t = threadIdx.x;
  tile[t] = x[t];
  __syncthreads();
  y[t] = tile[blockDim.x - 1 - t];
}

// Write-after-read: a second pass overwrites the tile while slower threads may still read it.
extern "C" __global__ void write_after_read(const float* x, float* y) {
  __shared__ float tile[256];
  const int t = threadIdx.x;
  tile[t] = x[t];
  __syncthreads();
  const float v = tile[(t + 1) % blockDim.x];  // PLANT-OTHER: shared_race_war
  tile[t] = v * 2.0f;  // PLANT: shared_race_war
  __syncthreads();
  y[t] = tile[t];
}

// Reads a shared element nobody wrote: only the first half of the tile is filled.
extern "C" __global__ void uninitialized(const float* x, float* y) {
  __shared__ float tile[256];
  const int t = threadIdx.x;
  if (t < (int)blockDim.x / 2) tile[t] = x[t];
  __syncthreads();
  y[blockIdx.x * blockDim.x + t] = tile[blockDim.x - 1 - t];  // PLANT: uninitialized_shared_read
}

// Transposes through a 32x32 tile read down its columns: 32-way bank conflicts.
// in, out: (32, 32) float32; block (32, 32).
extern "C" __global__ void transpose_conflicted(const float* in, float* out) {
  __shared__ float tile[32][32];
  const int x = threadIdx.x, y = threadIdx.y;
  tile[y][x] = in[y * 32 + x];
  __syncthreads();
  out[y * 32 + x] = tile[x][y];  // PLANT: bank_conflict
}

// The same with a padded row: conflict-free.
extern "C" __global__ void transpose_padded(const float* in, float* out) {
  __shared__ float tile[32][33];
  const int x = threadIdx.x, y = threadIdx.y;
  tile[y][x] = in[y * 32 + x];
  __syncthreads();
  out[y * 32 + x] = tile[x][y];  // PLANT: conflict_free
}

// Stride-32 float loads: each lane reads its own 32-byte segment.
extern "C" __global__ void strided_load(const float* x, float* y) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  y[t] = x[t * 32];  // PLANT: strided
}

extern "C" __global__ void coalesced_load(const float* x, float* y) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  y[t] = x[t];  // PLANT: coalesced
}

// The classic missing `if (i < n)`: the grid covers more threads than there are elements.
extern "C" __global__ void unguarded_write(float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  y[i] = 1.0f;  // PLANT: out_of_bounds_write
}

// Writes a megabyte past the end: far outside any buffer.
extern "C" __global__ void wild_write(float* y) {
  if (threadIdx.x == 0) y[1 << 18] = 1.0f;  // PLANT: wild
}

// Threads of the block reach different barriers.
extern "C" __global__ void divergent_barrier(float* y) {
  if (threadIdx.x < 32) {
    __syncthreads();  // PLANT: barrier_divergence
  } else {
    __syncthreads();  // PLANT-OTHER: barrier_divergence
  }
  y[threadIdx.x] = 1.0f;
}

// Every block writes element 0 without an atomic.
extern "C" __global__ void global_waw(float* y) {
  if (threadIdx.x == 0) y[0] = (float)blockIdx.x;  // PLANT: global_race_waw
}

// Shared atomics and a block reduction: clean.
extern "C" __global__ void atomics_clean(const float* x, float* y) {
  __shared__ float sum;
  if (threadIdx.x == 0) sum = 0.0f;
  __syncthreads();
  atomicAdd(&sum, x[threadIdx.x]);  // PLANT: atomic
  __syncthreads();
  if (threadIdx.x == 0) y[blockIdx.x] = sum;
}
