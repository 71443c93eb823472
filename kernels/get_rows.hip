// get_rows.hip: embedding lookup, out[k] = dequantize(table)[ids[k]], one thread per element.
//
//   get_rows<QT>(ids, table, out, n, cols, row_bytes, table_rows)
//   ids: (n,) int32   table: (table_rows, row_bytes) uint8, rows of QT blocks
//   out: (n, cols) float32
//   grid (n, ceil(cols / blockDim.x)), any block width (the registry uses 256)
//
// Bit-identical to gguf.quants.dequantize(table)[ids] (the decode is quant.h's wb_decode). An id
// outside [0, table_rows) is a caller bug and stops the kernel (WB_ASSERT) rather than reading
// another allocation.
#include "quant.h"

template <int QT>
__global__ void get_rows(const int32_t* WB_RESTRICT ids,    // (n,)
                         const uint8_t* WB_RESTRICT table,  // (table_rows, row_bytes)
                         float* WB_RESTRICT out,            // (n, cols)
                         int n, int cols, int row_bytes, int table_rows) {
  const int k = blockIdx.x;
  const int col = blockIdx.y * blockDim.x + threadIdx.x;
  if (k >= n || col >= cols) return;
  const int id = ids[k];
  WB_ASSERT(id >= 0 && id < table_rows);
  out[(size_t)k * cols + col] = wb_row_value<QT>(table + (size_t)id * row_bytes, col);
}

#define WB_INSTANCE(QT)                                                                         \
  template __global__ void get_rows<QT>(const int32_t* WB_RESTRICT, const uint8_t* WB_RESTRICT, \
                                        float* WB_RESTRICT, int, int, int, int);
WB_FOR_EACH_QTYPE(WB_INSTANCE)
#undef WB_INSTANCE
