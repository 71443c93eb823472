// dequant.hip: GGUF blocks -> float32, one thread per output element.
//
//   dequant<QT>(raw, out, rows, cols, row_bytes)   QT: a wb_qtype tag from quant.h
//   raw: (rows, row_bytes) uint8, rows of QT blocks     out: (rows, cols) float32
//   grid (rows, ceil(cols / blockDim.x)), any block width (the registry uses 256)
//
// Bit-identical to gguf.quants.dequantize: each element is decoded by wb_decode (quant.h) with the
// same float32 operations in the same order as gguf-py. Consecutive threads write consecutive
// floats (coalesced); the few bytes of scales each thread re-reads are shared through the cache.
#include "quant.h"

template <int QT>
__global__ void dequant(const uint8_t* WB_RESTRICT raw,  // (rows, row_bytes)
                        float* WB_RESTRICT out,          // (rows, cols)
                        int rows, int cols, int row_bytes) {
  const int row = blockIdx.x;
  const int col = blockIdx.y * blockDim.x + threadIdx.x;
  if (row >= rows || col >= cols) return;
  out[(size_t)row * cols + col] = wb_row_value<QT>(raw + (size_t)row * row_bytes, col);
}

// Explicit instances: offline compilers (hipcc -c, nvcc -c) then build every type, and CuPy's
// name expressions ("dequant<WB_Q4_1>") find them.
#define WB_INSTANCE(QT)                                                                          \
  template __global__ void dequant<QT>(const uint8_t* WB_RESTRICT, float* WB_RESTRICT, int, int, \
                                       int);
WB_FOR_EACH_QTYPE(WB_INSTANCE)
#undef WB_INSTANCE
