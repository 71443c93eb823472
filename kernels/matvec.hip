// matvec.hip: y = W @ x straight from GGUF blocks (the decode step's GEMV); the float32 matrix
// never exists.
//
//   matvec<QT>(W, x, y, rows, cols, row_bytes)   QT: a wb_qtype tag from quant.h
//   W: (rows, row_bytes) uint8, rows of QT blocks    x: (cols,) float32    y: (rows,) float32
//   block (k * warpSize,): one warp per row, k rows per block; grid (ceil(rows / k),)
//
// Work split: a row is cut into chunks of N = min(GROUP, 8) elements (GROUP: the elements sharing
// one scale, so a chunk never straddles two scales; N = 1 for F32/F16/BF16). Lane l takes chunks
// l, l + warpSize, l + 2 * warpSize, ...: neighbouring lanes read neighbouring bytes.
//
// Accumulation order (all float32): per chunk, sq = sum_k code_k * x_k by fmaf from k = 0 up (and
// sx = sum_k x_k for affine types), then the chunk adds scale * sq (+ offset * sx) to the lane's
// running sum: the integer codes are dotted first and scaled once, as ggml does. The lanes' sums
// are then combined by an xor butterfly (offsets warpSize/2 ... 1), so the grouping depends on the
// warp width: results at wave32 and wave64 differ in the last bits, both within float32 dot
// product error of the exact value.
#include "quant.h"

// Dot product of elements [e, e + N) of a row with x[e .. e + N).
template <int QT, bool IS_FLOAT = wb_q<QT>::IS_FLOAT>
struct wb_chunk {
  typedef wb_q<QT> T;
  static constexpr int N = T::GROUP < 8 ? T::GROUP : 8;
  WB_DEVICE float dot(const uint8_t* row,  // (row_bytes,) one row of blocks
                      int e,               // first element, a multiple of N
                      const float* x) {    // (cols,)
    const uint8_t* blk = row + (size_t)(e / T::QK) * T::BYTES;
    const int i0 = e % T::QK;
    float sq = 0.0f, sx = 0.0f;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float xv = x[e + k];
      sq = fmaf((float)T::code(blk, i0 + k), xv, sq);  // |code| <= 128: exact in float32
      if (T::AFFINE) sx += xv;
    }
    const int g = i0 / T::GROUP;
    float r = T::scale(blk, g) * sq;
    if (T::AFFINE) r = fmaf(T::offset(blk, g), sx, r);
    return r;
  }
};
template <int QT>
struct wb_chunk<QT, true> {
  static constexpr int N = 1;
  WB_DEVICE float dot(const uint8_t* row, int e, const float* x) {
    return wb_q<QT>::value(row + (size_t)e * wb_q<QT>::BYTES, 0) * x[e];
  }
};

template <int QT>
__global__ void matvec(const uint8_t* WB_RESTRICT W,  // (rows, row_bytes)
                       const float* WB_RESTRICT x,    // (cols,)
                       float* WB_RESTRICT y,          // (rows,)
                       int rows, int cols, int row_bytes) {
  typedef wb_chunk<QT> C;
  const int lane = (int)threadIdx.x % warpSize;
  const int row = (int)(blockIdx.x * (blockDim.x / warpSize) + threadIdx.x / warpSize);
  if (row >= rows) return;  // the whole warp leaves together: the shuffles below stay complete
  const uint8_t* w = W + (size_t)row * row_bytes;  // (row_bytes,)
  float acc = 0.0f;
  const int chunks = cols / C::N;  // cols is a multiple of QK, and QK of N
  for (int c = lane; c < chunks; c += warpSize) acc += C::dot(w, c * C::N, x);
  for (int o = warpSize / 2; o > 0; o /= 2) acc += WB_SHFL_XOR(acc, o);
  if (lane == 0) y[row] = acc;
}

#define WB_INSTANCE(QT)                                                                     \
  template __global__ void matvec<QT>(const uint8_t* WB_RESTRICT, const float* WB_RESTRICT, \
                                      float* WB_RESTRICT, int, int, int);
WB_FOR_EACH_QTYPE(WB_INSTANCE)
#undef WB_INSTANCE
