// matvec.hip: y = W @ x straight from GGUF blocks (the decode step's GEMV); the float32 matrix
// never exists.
//
//   quantize_q8_1(x, xq, cols)                        x (cols,) float32 -> xq: Q8_1 (quant.h)
//   matvec<QT>(W, x, xq, y, rows, cols, row_bytes)    QT: a wb_qtype tag from quant.h
//   W: (rows, row_bytes) uint8, rows of QT blocks    x: (cols,) float32 (read by the float
//   types)    xq: x as Q8_1 (read by the quantized types)    y: (rows,) float32
//   quantize_q8_1: block (256,), grid (ceil(cols / 32 * 8 / 256),): 8 lanes per 32-element block
//   matvec: block (WB_MV_THREADS,), grid (ceil(rows / WB_MV_ROWS),): WB_MV_LANES lanes per row
//
// The quantized types (the technique of ggml's mmvq): x is quantized once per token into 8-bit
// codes with a scale per 32 elements, and each weight block's integer codes are dotted with those
// of x four at a time (WB_DOT4_I8: v_dot4_i32_i8 / dp4a), then scaled once per group:
//   group g of a row:  scale_g * (d8 * sum_i code_i q_i)  [+ offset_g * d8 * sum_i q_i]
// (affine types: Q4_1/Q5_1 take d8 * sum q from the Q8_1 s field, rounded to fp16, as ggml does;
// the K-quants, whose groups of 16 or 32 do not match Q8_1's s, sum the codes exactly with one
// more dot product against 0x01010101.) Every integer sum is exact (|sum| < 2^24).
//
// Wide loads: a block is 18, 20, 34, 84, 144 ... bytes, so the multi-byte fields of a GGUF row are
// unaligned and the row itself starts anywhere. A block of WB_MV_ROWS consecutive rows works
// through the columns in tiles of WB_MV_TILE; for each tile it copies every row's bytes into
// shared memory by the aligned 16-byte chunks that cover them (one vector load per lane; chunks
// that stick out of the matrix at its two ends copy only the bytes inside it), and the tile of x's
// codes (16-byte loads) and scales (4-byte loads) once for all its rows. The codes are then decoded
// from shared memory by quant.h's traits, so every quantized type takes this path.
//
// The float types (F32/F16/BF16) have no codes: their lanes read x and the weights directly and
// accumulate by fmaf in float32 (x is not quantized for them).
//
// Reduction: each row's WB_MV_LANES lanes combine their sums by an xor butterfly of width
// WB_MV_LANES; results at wave32 and wave64 are identical (the lanes of a row never depend on the
// warp width).
#include "quant.h"

#define WB_MV_THREADS 256                          // threads per block
#define WB_MV_ROWS 16                              // rows per block
#define WB_MV_LANES (WB_MV_THREADS / WB_MV_ROWS)   // lanes per row (16: within any warp)
#define WB_MV_TILE 2048                            // columns per tile: 4 Q8_1 blocks per lane

// x -> Q8_1 (see quant.h). Lanes 8b .. 8b+7 take elements 4k .. 4k+3 of block b: one 16-byte
// load each where x is 16-aligned, max and sum combined by a butterfly of width 8.
WB_KERNEL void quantize_q8_1(const float* WB_RESTRICT x,  // (cols,)
                             uint8_t* WB_RESTRICT xq,     // (cols + cols / 8,)
                             int cols) {
  const int t = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  const int b = t / 8, k = t % 8;
  const bool ok = b < cols / WB_Q8_1_QK;  // no early return: the whole warp shuffles below
  float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (ok) {
    const float* p = x + b * WB_Q8_1_QK + k * 4;
    if ((wb_addr(p) & 15) == 0) {
      const wb_u32x4 u = wb_ld16(reinterpret_cast<const uint8_t*>(p));
      const uint32_t* bits = reinterpret_cast<const uint32_t*>(&u);
      for (int j = 0; j < 4; ++j) v[j] = wb_bits_to_float(bits[j]);
    } else {
      for (int j = 0; j < 4; ++j) v[j] = p[j];
    }
  }
  float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
  for (int o = 4; o > 0; o /= 2) amax = fmaxf(amax, WB_SHFL_XOR_W(amax, o, 8));
  const float d = amax / 127.0f;
  uint32_t packed = 0;
  int sum = 0;
  for (int j = 0; j < 4; ++j) {
    const int q = amax == 0.0f ? 0 : (int)roundf(v[j] / d);
    sum += q;
    packed |= (uint32_t)(q & 255) << (8 * j);
  }
  for (int o = 4; o > 0; o /= 2) sum += WB_SHFL_XOR_W(sum, o, 8);
  if (!ok) return;
  reinterpret_cast<uint32_t*>(xq)[b * 8 + k] = packed;
  if (k == 0) {
    const uint32_t ds = (uint32_t)wb_float_to_half(d) |
                        ((uint32_t)wb_float_to_half(d * (float)sum) << 16);
    reinterpret_cast<uint32_t*>(xq + cols)[b] = ds;
  }
}

// Stages the 16-byte chunk at byte g of buf (16-aligned address) into dst (16-aligned): one vector
// load when the chunk lies inside the buffer's size bytes, else only its bytes within the wanted
// range [start, start + n), one at a time (a chunk sticking out of either end of the buffer).
WB_DEVICE void wb_stage16(uint8_t* dst, const uint8_t* buf, unsigned long long g,
                          unsigned long long start, int n, unsigned long long size) {
  if (g + 16 <= size && (long long)g >= 0) {
    *reinterpret_cast<wb_u32x4*>(dst) = wb_ld16(buf + g);
    return;
  }
  for (int k = 0; k < 16; ++k)
    if (g + k >= start && g + k < start + n) dst[k] = buf[g + k];
}

// Four codes of a staged block as the bytes of an int (every type's codes fit int8).
template <int QT>
WB_DEVICE int wb_codes4(const uint8_t* blk, int i) {
  typedef wb_q<QT> T;
  return (int)((uint32_t)(T::code(blk, i) & 255) | ((uint32_t)(T::code(blk, i + 1) & 255) << 8) |
               ((uint32_t)(T::code(blk, i + 2) & 255) << 16) |
               ((uint32_t)(T::code(blk, i + 3) & 255) << 24));
}

// The quantized types: shared-memory staging and integer dot products (see the header comment).
template <int QT, bool IS_FLOAT = wb_q<QT>::IS_FLOAT>
struct wb_matvec {
  typedef wb_q<QT> T;
  static constexpr int BLOCKS = WB_MV_TILE / T::QK;                // QT blocks per row per tile
  static constexpr int STRIDE = (BLOCKS * T::BYTES + 31) / 16 * 16;  // staged bytes per row

  // Sum over the 32 elements [i0, i0 + 32) of the block at blk times x's codes xs (8 ints) with
  // x's scale d8 and fp16 sum term s8 = d8 * sum(q).
  WB_DEVICE float unit(const uint8_t* blk, int i0, const int* xs, float d8, float s8) {
    if (T::GROUP == 32) {
      int sumi = 0;
#pragma unroll
      for (int k = 0; k < 8; ++k) sumi = WB_DOT4_I8(wb_codes4<QT>(blk, i0 + 4 * k), xs[k], sumi);
      const int g = i0 / 32;
      float r = T::scale(blk, g) * (d8 * (float)sumi);
      if (T::AFFINE) {
        float sx = s8;
        if (T::QK != 32) {  // K-quants: the exact sum of x's codes
          int sq = 0;
#pragma unroll
          for (int k = 0; k < 8; ++k) sq = WB_DOT4_I8(xs[k], 0x01010101, sq);
          sx = d8 * (float)sq;
        }
        r = fmaf(T::offset(blk, g), sx, r);
      }
      return r;
    }
    float r = 0.0f;  // groups of 16: two per unit
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int sumi = 0, sq = 0;
#pragma unroll
      for (int k = 4 * h; k < 4 * h + 4; ++k) {
        sumi = WB_DOT4_I8(wb_codes4<QT>(blk, i0 + 4 * k), xs[k], sumi);
        if (T::AFFINE) sq = WB_DOT4_I8(xs[k], 0x01010101, sq);
      }
      const int g = i0 / 16 + h;
      r = fmaf(T::scale(blk, g), d8 * (float)sumi, r);
      if (T::AFFINE) r = fmaf(T::offset(blk, g), d8 * (float)sq, r);
    }
    return r;
  }

  WB_DEVICE float run(const uint8_t* W, const float*, const uint8_t* xq, int rows, int cols,
                      int row_bytes) {
    __shared__ WB_ALIGN(16) uint8_t sw[WB_MV_ROWS * STRIDE];  // staged rows of the tile
    __shared__ WB_ALIGN(16) uint8_t sx[WB_MV_TILE];           // x's codes of the tile
    __shared__ uint32_t sd[WB_MV_TILE / WB_Q8_1_QK];          // x's (d, s) of the tile
    const int tid = (int)threadIdx.x;
    const int r = tid / WB_MV_LANES, l = tid % WB_MV_LANES;
    const int row0 = (int)blockIdx.x * WB_MV_ROWS;
    const int nb = cols / T::QK;
    const unsigned long long lo = wb_addr(W), hi = lo + (unsigned long long)rows * row_bytes;
    const uint32_t* ds = wb_q8_1_ds(xq, cols);
    float acc = 0.0f;
    for (int b0 = 0; b0 < nb; b0 += BLOCKS) {
      const int nbt = nb - b0 < BLOCKS ? nb - b0 : BLOCKS;  // blocks in this tile
      const int nbytes = nbt * T::BYTES;
      const int units = nbt * T::QK / WB_Q8_1_QK;
      // Stage the tile: one range per row, or, when a tile holds whole rows, the block's rows as
      // one range (consecutive rows are consecutive bytes: no chunk is loaded twice).
      const bool whole = nb <= BLOCKS;
      const int nrows = rows - row0 < WB_MV_ROWS ? rows - row0 : WB_MV_ROWS;
      const int ranges = whole ? 1 : nrows;
      const int span = whole ? nrows * row_bytes : nbytes;  // bytes per range
      const int chunks = (span + 30) / 16;                  // covers any start misalignment
      for (int i = tid; i < ranges * chunks; i += WB_MV_THREADS) {
        const int rr = i / chunks, c = i % chunks;
        const unsigned long long src =
            lo + (unsigned long long)(row0 + rr) * row_bytes + (unsigned long long)b0 * T::BYTES;
        const unsigned long long g = (src & ~15ull) + 16ull * c;
        if (g < src + span) {
          wb_stage16(sw + rr * STRIDE + 16 * c, W, g - lo, src - lo, span, hi - lo);
        }
      }
      const uint8_t* xt = xq + b0 * T::QK;
      for (int i = tid; i < units * 2; i += WB_MV_THREADS)
        *reinterpret_cast<wb_u32x4*>(sx + 16 * i) = wb_ld16(xt + 16 * i);
      for (int i = tid; i < units; i += WB_MV_THREADS) sd[i] = ds[b0 * T::QK / WB_Q8_1_QK + i];
      __syncthreads();
      if (row0 + r < rows) {
        const unsigned long long src =
            lo + (unsigned long long)(row0 + r) * row_bytes + (unsigned long long)b0 * T::BYTES;
        const uint8_t* row = whole ? sw + (int)((lo + (unsigned long long)row0 * row_bytes) & 15) +
                                         r * row_bytes
                                   : sw + r * STRIDE + (int)(src & 15);
        for (int u = l; u < units; u += WB_MV_LANES) {
          const int e = u * WB_Q8_1_QK;  // first column of the unit within the tile
          const float d8 = wb_half_to_float((uint16_t)(sd[u] & 0xffffu));
          const float s8 = wb_half_to_float((uint16_t)(sd[u] >> 16));
          acc += unit(row + (e / T::QK) * T::BYTES, e % T::QK,
                      reinterpret_cast<const int*>(sx + e), d8, s8);
        }
      }
      __syncthreads();  // the next tile overwrites the staging buffers
    }
    return acc;
  }
};

// The float types: lane l of a row takes elements l, l + WB_MV_LANES, ...
template <int QT>
struct wb_matvec<QT, true> {
  WB_DEVICE float run(const uint8_t* W, const float* x, const uint8_t*, int rows, int cols,
                      int row_bytes) {
    const int row = (int)blockIdx.x * WB_MV_ROWS + (int)threadIdx.x / WB_MV_LANES;
    float acc = 0.0f;
    if (row >= rows) return acc;
    const uint8_t* w = W + (size_t)row * row_bytes;  // (row_bytes,)
    for (int e = (int)threadIdx.x % WB_MV_LANES; e < cols; e += WB_MV_LANES)
      acc = fmaf(wb_q<QT>::value(w + (size_t)e * wb_q<QT>::BYTES, 0), x[e], acc);
    return acc;
  }
};

template <int QT>
__global__ void matvec(const uint8_t* WB_RESTRICT W,   // (rows, row_bytes)
                       const float* WB_RESTRICT x,     // (cols,)
                       const uint8_t* WB_RESTRICT xq,  // (cols + cols / 8,) Q8_1, 16-aligned
                       float* WB_RESTRICT y,           // (rows,)
                       int rows, int cols, int row_bytes) {
  __shared__ float sy[WB_MV_ROWS];  // the block's results, stored by WB_MV_ROWS adjacent lanes
  float acc = wb_matvec<QT>::run(W, x, xq, rows, cols, row_bytes);
  for (int o = WB_MV_LANES / 2; o > 0; o /= 2) acc += WB_SHFL_XOR_W(acc, o, WB_MV_LANES);
  const int tid = (int)threadIdx.x, row0 = (int)blockIdx.x * WB_MV_ROWS;
  if (tid % WB_MV_LANES == 0) sy[tid / WB_MV_LANES] = acc;
  __syncthreads();
  if (tid < WB_MV_ROWS && row0 + tid < rows) y[row0 + tid] = sy[tid];
}

#define WB_INSTANCE(QT)                                                                     \
  template __global__ void matvec<QT>(const uint8_t* WB_RESTRICT, const float* WB_RESTRICT, \
                                      const uint8_t* WB_RESTRICT, float* WB_RESTRICT, int,  \
                                      int, int);
WB_FOR_EACH_QTYPE(WB_INSTANCE)
#undef WB_INSTANCE
