// matmul.hip: y = x @ W.T for several rows of x (prefill), W in GGUF blocks.
//
//   matmul<QT>(x, W, y, n, rows, cols, row_bytes)   QT: a wb_qtype tag from quant.h
//   x: (n, cols) float32    W: (rows, row_bytes) uint8, rows of QT blocks    y: (n, rows) float32
//   block (256,) (WB_MM_THREADS); grid (ceil(rows / WB_MM_TN), ceil(n / WB_MM_TM))
//
// Two bodies behind one kernel and one geometry: on AMD matrix-core targets (WB_HAS_MFMA: gfx908,
// gfx90a, gfx94x) the FP16 MFMA path below, everywhere else the scalar tiled path. Both walk the
// shared dimension in steps of WB_MM_TK with a WB_MM_TM x WB_MM_TN tile of y per block; out-of-
// range rows, columns and k are loaded as zeros and never stored, so no size has to be a multiple
// of a tile.
//
// Scalar tiled path (matmul_tiled): each step, the block loads a TM x TK tile of x and
// dequantizes a TN x TK tile of W (quant.h's wb_row_value: the same bits as gguf's dequantize)
// into shared memory, both stored k-major so the inner loop reads rows of the tiles; then each
// thread updates its 2 x 4 register tile. Thread (ty, tx) = (t / 16, t % 16) owns
// y[m0 + ty + 16 i][r0 + tx + 16 j], i < 2, j < 4: strided so a warp's reads of one tile row hit
// distinct shared-memory banks. Accumulation: each output is one float32 fmaf chain over
// k = 0, 1, ..., cols - 1 in order (the zero padding adds exact zeros), independent of the tiling
// and the warp width.
//
// MFMA path (matmul_mfma): each step, x's tile is rounded to fp16 and W's tile dequantized once
// (wb_row_value, then rounded to fp16) into shared memory, k-contiguous, four halves per 64-bit
// word: exactly one lane's operand of v_mfma_f32_16x16x16f16 (wb.h; lane L holds row L % 16,
// k-group L / 16 of A and column L % 16, k-group L / 16 of B; see emulator/wb_emu_mfma.h for the
// layout and its source). The four waves (wave64) share the tiles: wave w owns columns
// r0 + 16w .. r0 + 16w + 15 of y and both 16-row halves of the TM rows, two 16x16 fp32
// accumulators (4 floats per lane), each step two k-slices of 16 (4 MFMAs per wave). Inputs are
// fp16 (values beyond 65504 become infinities), products exact, accumulation fp32.
#include "quant.h"

#define WB_MM_TM 32
#define WB_MM_TN 64
#define WB_MM_TK 32
#define WB_MM_THREADS 256

template <int QT>
WB_DEVICE void matmul_tiled(const float* WB_RESTRICT x, const uint8_t* WB_RESTRICT W,
                            float* WB_RESTRICT y, int n, int rows, int cols, int row_bytes) {
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

#if WB_HAS_MFMA
#define WB_MM_KG (WB_MM_TK / 4)  // 64-bit words (four fp16 each) per tile row

// A tile of fp16 values, k-contiguous: stored one half at a time (h), read as the 64-bit words
// (w) that are one lane's MFMA operand. +1 word per row: lanes 0..15 read 16 rows at one k-group,
// and a 72-byte row stride puts them on distinct bank pairs (64 bytes would put rows 0, 2, 4, ...
// on the same banks). Reading the other member of a union is defined by clang and GCC.
template <int ROWS>
union wb_mm_tile16 {
  uint64_t w[ROWS][WB_MM_KG + 1];
  uint16_t h[ROWS][4 * (WB_MM_KG + 1)];
};

template <int QT>
WB_DEVICE void matmul_mfma(const float* WB_RESTRICT x, const uint8_t* WB_RESTRICT W,
                           float* WB_RESTRICT y, int n, int rows, int cols, int row_bytes) {
  __shared__ wb_mm_tile16<WB_MM_TM> xs;  // x tile
  __shared__ wb_mm_tile16<WB_MM_TN> ws;  // dequantized W tile
  const int t = threadIdx.x;
  const int lane = t % 64, wave = t / 64;  // wave64: WB_MM_THREADS / 64 = 4 waves
  const int j = lane % 16, g = lane / 16;  // operand row/column and k-group of this lane
  const int r0 = blockIdx.x * WB_MM_TN;
  const int m0 = blockIdx.y * WB_MM_TM;

  const wb_f32x4 zero = {0.0f, 0.0f, 0.0f, 0.0f};
  wb_f32x4 acc[2] = {zero, zero};  // acc[h][e] = y[m0 + 16 h + 4 g + e][r0 + 16 wave + j]

  for (int k0 = 0; k0 < cols; k0 += WB_MM_TK) {
    // As the scalar path: consecutive threads take consecutive k of a row (compact requests);
    // x: TM * TK = 1024 values, 4 per thread; W: TN * TK = 2048 values, 8 per thread, each
    // decoded once for the whole block.
    for (int e = t; e < WB_MM_TM * WB_MM_TK; e += WB_MM_THREADS) {
      const int m = e / WB_MM_TK, k = e % WB_MM_TK;
      const bool in = m0 + m < n && k0 + k < cols;
      xs.h[m][k] = in ? wb_float_to_half(x[(size_t)(m0 + m) * cols + k0 + k]) : (uint16_t)0;
    }
    for (int e = t; e < WB_MM_TN * WB_MM_TK; e += WB_MM_THREADS) {
      const int r = e / WB_MM_TK, k = e % WB_MM_TK;
      const bool in = r0 + r < rows && k0 + k < cols;
      ws.h[r][k] = in ? wb_float_to_half(wb_row_value<QT>(W + (size_t)(r0 + r) * row_bytes,
                                                          k0 + k))
                      : (uint16_t)0;
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < WB_MM_KG; ks += 4) {  // k-slices of 16: this lane's group is ks + g
      const wb_f16x4 b = wb_f16x4_from_bits(ws.w[16 * wave + j][ks + g]);
#pragma unroll
      for (int h = 0; h < 2; ++h)
        acc[h] = WB_MFMA_F32_16X16X16F16(wb_f16x4_from_bits(xs.w[16 * h + j][ks + g]), b, acc[h]);
    }
    __syncthreads();  // the next step overwrites the tiles
  }

  const int r = r0 + 16 * wave + j;
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int m = m0 + 16 * h + 4 * g + e;
      if (m < n && r < rows) y[(size_t)m * rows + r] = acc[h][e];
    }
}
#endif  // WB_HAS_MFMA

template <int QT>
__global__ void WB_LAUNCH_BOUNDS(WB_MM_THREADS)
    matmul(const float* WB_RESTRICT x,    // (n, cols)
           const uint8_t* WB_RESTRICT W,  // (rows, row_bytes)
           float* WB_RESTRICT y,          // (n, rows)
           int n, int rows, int cols, int row_bytes) {
#if WB_HAS_MFMA
  matmul_mfma<QT>(x, W, y, n, rows, cols, row_bytes);
#else
  matmul_tiled<QT>(x, W, y, n, rows, cols, row_bytes);
#endif
}

#define WB_INSTANCE(QT)                                                                     \
  template __global__ void matmul<QT>(const float* WB_RESTRICT, const uint8_t* WB_RESTRICT, \
                                      float* WB_RESTRICT, int, int, int, int);
WB_FOR_EACH_QTYPE(WB_INSTANCE)
#undef WB_INSTANCE
