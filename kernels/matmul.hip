// matmul.hip: y = x @ W.T for several rows of x (prefill), W in GGUF blocks.
//
//   matmul<QT>(x, W, y, n, rows, cols, row_bytes)   QT: a wb_qtype tag from quant.h
//   x: (n, cols) float32    W: (rows, row_bytes) uint8, rows of QT blocks    y: (n, rows) float32
//   block (256,) (WB_MM_THREADS); grid (ceil(rows / WB_MM_TN), ceil(n / WB_MM_TM))
//
// Classic shared-memory tiling: a block owns a WB_MM_TM x WB_MM_TN tile of y (TM rows of x times TN
// rows of W) and walks the shared dimension in steps of WB_MM_TK. Each step, the block loads a
// TM x TK tile of x and dequantizes a TN x TK tile of W (quant.h's wb_row_value: the same bits as
// gguf's dequantize) into shared memory, both stored k-major so the inner loop reads rows of the
// tiles; then each thread updates its 2 x 4 register tile. Thread (ty, tx) = (t / 16, t % 16) owns
// y[m0 + ty + 16 i][r0 + tx + 16 j], i < 2, j < 4: strided so a warp's reads of one tile row hit
// distinct shared-memory banks. Out-of-range rows, columns and k are loaded as zeros and never
// stored, so no size has to be a multiple of a tile.
//
// Accumulation: each output is one float32 fmaf chain over k = 0, 1, ..., cols - 1 in order (the
// zero padding adds exact zeros), independent of the tiling and the warp width.
#include "quant.h"

#define WB_MM_TM 32
#define WB_MM_TN 64
#define WB_MM_TK 32
#define WB_MM_THREADS 256

template <int QT>
__global__ void WB_LAUNCH_BOUNDS(WB_MM_THREADS)
    matmul(const float* WB_RESTRICT x,    // (n, cols)
           const uint8_t* WB_RESTRICT W,  // (rows, row_bytes)
           float* WB_RESTRICT y,          // (n, rows)
           int n, int rows, int cols, int row_bytes) {
  // +1 column of padding: the transposing stores (k-major) would otherwise hit one bank.
  __shared__ float xs[WB_MM_TK][WB_MM_TM + 1];  // x tile, k-major
  __shared__ float ws[WB_MM_TK][WB_MM_TN + 1];  // dequantized W tile, k-major
  const int t = threadIdx.x;
  const int tx = t % 16, ty = t / 16;
  const int r0 = blockIdx.x * WB_MM_TN;  // first row of W (column of y)
  const int m0 = blockIdx.y * WB_MM_TM;  // first row of x (row of y)

  float acc[2][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int k0 = 0; k0 < cols; k0 += WB_MM_TK) {
    // x tile: TM * TK = 1024 floats, 4 per thread; consecutive threads read consecutive k.
    for (int e = t; e < WB_MM_TM * WB_MM_TK; e += WB_MM_THREADS) {
      const int m = e / WB_MM_TK, k = e % WB_MM_TK;
      const bool in = m0 + m < n && k0 + k < cols;
      xs[k][m] = in ? x[(size_t)(m0 + m) * cols + k0 + k] : 0.0f;
    }
    // W tile: TN * TK = 2048 values, 8 per thread, decoded from the blocks.
    for (int e = t; e < WB_MM_TN * WB_MM_TK; e += WB_MM_THREADS) {
      const int r = e / WB_MM_TK, k = e % WB_MM_TK;
      const bool in = r0 + r < rows && k0 + k < cols;
      ws[k][r] = in ? wb_row_value<QT>(W + (size_t)(r0 + r) * row_bytes, k0 + k) : 0.0f;
    }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < WB_MM_TK; ++k) {
      float a[2], b[4];
#pragma unroll
      for (int i = 0; i < 2; ++i) a[i] = xs[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = ws[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // the next step overwrites the tiles
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int m = m0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = r0 + tx + 16 * j;
      if (m < n && r < rows) y[(size_t)m * rows + r] = acc[i][j];
    }
  }
}

#define WB_INSTANCE(QT)                                                                     \
  template __global__ void matmul<QT>(const float* WB_RESTRICT, const uint8_t* WB_RESTRICT, \
                                      float* WB_RESTRICT, int, int, int, int);
WB_FOR_EACH_QTYPE(WB_INSTANCE)
#undef WB_INSTANCE
