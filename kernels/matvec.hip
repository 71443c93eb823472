// matvec.hip: y = W @ x straight from GGUF blocks (the decode step's GEMV); the float32 matrix
// never exists. Also the decode step's fused kernels around it (see "Fusion" below).
//
//   quantize_q8_1(x, xq, cols)                        x (cols,) float32 -> xq: Q8_1 (quant.h)
//   matvec<QT>(W, x, xq, y, rows, cols, row_bytes)    QT: a wb_qtype tag from quant.h
//   W: (rows, row_bytes) uint8, rows of QT blocks    x: (cols,) float32 (read by the float
//   types)    xq: x as Q8_1 (read by the quantized types)    y: (rows,) float32
//   quantize_q8_1_rows(x, xq, cols, xq_stride)       x (n, cols) -> xq (n, xq_stride), row by row
//   matvec_batch<QT>(W, x, xq, y, n, rows, cols, row_bytes, xq_stride)   y (n, rows): below
//   quantize_q8_1: block (256,), grid (ceil(cols / 32 * 8 / 256),): 8 lanes per 32-element block
//   matvec: block (WB_MV_THREADS,), grid (ceil(rows / WB_MV_ROWS),): WB_MV_LANES lanes per row
//   rmsnorm_q8_1, matvec_fused<QT>: see their comments (workbench/kernels/fused_kernels.py)
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
// unaligned and the row itself starts anywhere. A block of WB_MV_ROWS rows works through the
// columns in tiles of WB_MV_TILE; for each tile it copies every row's bytes into shared memory by
// the aligned 16-byte chunks that cover them, counted from the 64-byte boundary below the row's
// start so that a warp's loads cover whole 64-byte segments (one vector load per lane; chunks
// that stick out of the matrix at its two ends copy only the bytes inside it), and the tile of
// x's codes (16-byte loads) and scales (4-byte loads) once for all its rows. The codes are then
// decoded from shared memory by quant.h's traits, so every quantized type takes this path.
//
// The float types (F32/F16/BF16) have no codes: x's tile is staged in shared memory by 16-byte
// loads, and each row's lanes read its aligned 16-byte chunks of weights straight from global
// memory (4 or 8 values per load), accumulating by fmaf in float32 (x is not quantized for them).
//
// Reduction: each row's WB_MV_LANES lanes combine their sums by an xor butterfly of width
// WB_MV_LANES; results at wave32 and wave64 are identical (the lanes of a row never depend on the
// warp width).
#include "quant.h"

#define WB_MV_THREADS 256                          // threads per block
#define WB_MV_ROWS 16                              // rows per block
#define WB_MV_LANES (WB_MV_THREADS / WB_MV_ROWS)   // lanes per row (16: within any warp)
#define WB_MV_TILE 2048                            // columns per tile: 4 Q8_1 blocks per lane
#define WB_MV_ALIGN 128  // staging starts at this boundary below a range: whole 128-byte segments
                         // (gfx942's) per warp load, none split between two warps' loads

// Lane k (0..7) of the 8 lanes of Q8_1 block b holds elements 4k .. 4k+3 of the block in v:
// max and sum combined by a butterfly of width 8, the codes and (d, s) written to xq (see
// quant.h). Every lane of the warp calls it (the shuffles); lanes with ok == false write nothing.
WB_DEVICE void wb_q8_1_store(const float* v, int b, int k, bool ok, uint8_t* xq, int cols) {
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

// Four floats at p into v: one 16-byte load where p is 16-aligned.
WB_DEVICE void wb_ld_f4(const float* p, float* v) {
  if ((wb_addr(p) & 15) == 0) {
    const wb_u32x4 u = wb_ld16(reinterpret_cast<const uint8_t*>(p));
    const uint32_t* bits = reinterpret_cast<const uint32_t*>(&u);
    for (int j = 0; j < 4; ++j) v[j] = wb_bits_to_float(bits[j]);
  } else {
    for (int j = 0; j < 4; ++j) v[j] = p[j];
  }
}

// x -> Q8_1 (see quant.h). Lanes 8b .. 8b+7 take elements 4k .. 4k+3 of block b: one 16-byte
// load each where x is 16-aligned, max and sum combined by a butterfly of width 8. Thread t of
// the grid's x dimension takes part t of the row (quantize_q8_1_rows: of row blockIdx.y).
WB_DEVICE void wb_quantize_q8_1_row(const float* WB_RESTRICT x, uint8_t* WB_RESTRICT xq, int cols) {
  const int t = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  const int b = t / 8, k = t % 8;
  const bool ok = b < cols / WB_Q8_1_QK;  // no early return: the whole warp shuffles below
  float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (ok) wb_ld_f4(x + b * WB_Q8_1_QK + k * 4, v);
  wb_q8_1_store(v, b, k, ok, xq, cols);
}

WB_KERNEL void quantize_q8_1(const float* WB_RESTRICT x,  // (cols,)
                             uint8_t* WB_RESTRICT xq,     // (cols + cols / 8,)
                             int cols) {
  wb_quantize_q8_1_row(x, xq, cols);
}

// The rows of a batch, each as quantize_q8_1 would: grid (as quantize_q8_1's, n).
WB_KERNEL void quantize_q8_1_rows(const float* WB_RESTRICT x,  // (n, cols)
                                  uint8_t* WB_RESTRICT xq,     // (n, xq_stride), 16-aligned rows
                                  int cols, int xq_stride) {
  const size_t r = blockIdx.y;
  wb_quantize_q8_1_row(x + r * (size_t)cols, xq + r * (size_t)xq_stride, cols);
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

// matvec_batch's staging. Stages bytes [off, off + nbytes) of rows row0 .. row0 + WB_MV_ROWS - 1
// (those < rows) of W into sw, one range per row `stride` bytes apart; or, when `whole` (a tile
// holds whole rows), the rows as one range (consecutive rows are consecutive bytes: no chunk is
// loaded twice). Every thread of the block takes chunks; the caller synchronizes.
WB_DEVICE void wb_stage_rows(uint8_t* sw, int stride, const uint8_t* W, int rows, int row_bytes,
                             int row0, int off, int nbytes, bool whole) {
  const unsigned long long lo = wb_addr(W), hi = lo + (unsigned long long)rows * row_bytes;
  const int nrows = rows - row0 < WB_MV_ROWS ? rows - row0 : WB_MV_ROWS;
  const int ranges = whole ? 1 : nrows;
  const int span = whole ? nrows * row_bytes : nbytes;  // bytes per range
  const int chunks = (span + 30) / 16;                  // covers any start misalignment
  for (int i = (int)threadIdx.x; i < ranges * chunks; i += (int)blockDim.x) {
    const int rr = i / chunks, c = i % chunks;
    const unsigned long long src =
        lo + (unsigned long long)(row0 + rr) * row_bytes + (unsigned long long)off;
    const unsigned long long g = (src & ~15ull) + 16ull * c;
    if (g < src + span) wb_stage16(sw + rr * stride + 16 * c, W, g - lo, src - lo, span, hi - lo);
  }
}

// Where row row0 + r's bytes from `off` begin in what wb_stage_rows staged.
WB_DEVICE const uint8_t* wb_staged_row(const uint8_t* sw, int stride, const uint8_t* W,
                                       int row_bytes, int row0, int r, int off, bool whole) {
  const unsigned long long lo = wb_addr(W);
  if (whole) return sw + (int)((lo + (unsigned long long)row0 * row_bytes) & 15) + r * row_bytes;
  const unsigned long long src =
      lo + (unsigned long long)(row0 + r) * row_bytes + (unsigned long long)off;
  return sw + r * stride + (int)(src & 15);
}

// Four codes of a staged block as the bytes of an int (every type's codes fit int8).
template <int QT>
WB_DEVICE int wb_codes4(const uint8_t* blk, int i) {
  typedef wb_q<QT> T;
  return (int)((uint32_t)(T::code(blk, i) & 255) | ((uint32_t)(T::code(blk, i + 1) & 255) << 8) |
               ((uint32_t)(T::code(blk, i + 2) & 255) << 16) |
               ((uint32_t)(T::code(blk, i + 3) & 255) << 24));
}

// Where a block's rows come from: `segs` (1 or 2) matrices worked one after the other through
// each tile, WB_MV_ROWS consecutive rows of each (a thread's row of matrix s is rows row0[s] + r
// of the (rows[s], row_bytes) matrix at base[s]); x's tile is staged once for both. SwiGLU's
// gate and up take two: the same rows of both, with x read once per tile for both.
struct wb_mv_rows {
  const uint8_t* base[2];
  int rows[2];
  int row0[2];
  int segs;
};
WB_DEVICE int wb_mv_nrows(const wb_mv_rows& R, int s) {  // rows of matrix s inside it
  const int n = R.rows[s] - R.row0[s];
  return n < 0 ? 0 : n < WB_MV_ROWS ? n : WB_MV_ROWS;
}
WB_DEVICE wb_mv_rows wb_mv_one(const uint8_t* W, int rows, int row0) {
  const wb_mv_rows R = {{W, W}, {rows, rows}, {row0, row0}, 1};
  return R;
}
WB_DEVICE wb_mv_rows wb_mv_two(const uint8_t* A, const uint8_t* B, int rows, int row0) {
  const wb_mv_rows R = {{A, B}, {rows, rows}, {row0, row0}, 2};
  return R;
}

// The quantized types: shared-memory staging and integer dot products (see the header comment).
template <int QT, bool IS_FLOAT = wb_q<QT>::IS_FLOAT>
struct wb_matvec {
  typedef wb_q<QT> T;
  static constexpr int BLOCKS = WB_MV_TILE / T::QK;                // QT blocks per row per tile
  static constexpr int STRIDE = (BLOCKS * T::BYTES + WB_MV_ALIGN + 14) / 16 * 16;  // per row

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

  // acc[m]: this thread's partial sum of its row of matrix m (m < R.segs).
  WB_DEVICE void run(const wb_mv_rows& R, const float*, const uint8_t* xq, int cols,
                     int row_bytes, float* acc) {
    __shared__ WB_ALIGN(16) uint8_t sw[WB_MV_ROWS * STRIDE];  // staged rows of the tile
    __shared__ WB_ALIGN(16) uint8_t sx[WB_MV_TILE];           // x's codes of the tile
    __shared__ uint32_t sd[WB_MV_TILE / WB_Q8_1_QK];          // x's (d, s) of the tile
    const int tid = (int)threadIdx.x;
    const int r = tid / WB_MV_LANES, l = tid % WB_MV_LANES;
    const int nb = cols / T::QK;
    const bool whole = nb <= BLOCKS;  // a tile holds whole rows
    const uint32_t* ds = wb_q8_1_ds(xq, cols);
    for (int b0 = 0; b0 < nb; b0 += BLOCKS) {
      const int nbt = nb - b0 < BLOCKS ? nb - b0 : BLOCKS;  // blocks in this tile
      const int nbytes = nbt * T::BYTES;
      const int units = nbt * T::QK / WB_Q8_1_QK;
      const uint8_t* xt = xq + b0 * T::QK;
      for (int i = tid; i < units * 2; i += WB_MV_THREADS)
        *reinterpret_cast<wb_u32x4*>(sx + 16 * i) = wb_ld16(xt + 16 * i);
      for (int i = tid; i < units; i += WB_MV_THREADS) sd[i] = ds[b0 * T::QK / WB_Q8_1_QK + i];
#pragma unroll
      for (int m = 0; m < 2; ++m) {  // constant bounds: acc stays in registers
        if (m >= R.segs) break;
        // Stage the tile of matrix m: one range per row, or, when a tile holds whole rows, the
        // rows as one range (consecutive rows are consecutive bytes: no chunk is loaded twice).
        const int nrows = wb_mv_nrows(R, m);
        const unsigned long long lo = wb_addr(R.base[m]);
        const unsigned long long size = (unsigned long long)R.rows[m] * row_bytes;
        const unsigned long long first =
            lo + (unsigned long long)R.row0[m] * row_bytes;  // the block's row 0
        const int ranges = whole ? 1 : nrows;
        const int span = whole ? nrows * row_bytes : nbytes;  // bytes per range
        const int chunks = (span + WB_MV_ALIGN + 14) / 16;    // from the boundary below the start
        for (int i = tid; i < ranges * chunks; i += WB_MV_THREADS) {
          const int rr = i / chunks, c = i % chunks;
          const unsigned long long src =
              first + (unsigned long long)rr * row_bytes + (unsigned long long)b0 * T::BYTES;
          const unsigned long long g = (src & ~(WB_MV_ALIGN - 1ull)) + 16ull * c;
          if (g < src + span && g + 16 > src)
            wb_stage16(sw + rr * STRIDE + 16 * c, R.base[m], g - lo, src - lo, span, size);
        }
        __syncthreads();  // the tile (and, for m == 0, x's) is staged
        if (r < nrows) {
          const unsigned long long src =
              first + (unsigned long long)r * row_bytes + (unsigned long long)b0 * T::BYTES;
          const uint8_t* row = whole ? sw + (int)(first & (WB_MV_ALIGN - 1)) + r * row_bytes
                                     : sw + r * STRIDE + (int)(src & (WB_MV_ALIGN - 1));
          float a = acc[m];
          for (int u = l; u < units; u += WB_MV_LANES) {
            const int e = u * WB_Q8_1_QK;  // first column of the unit within the tile
            const float d8 = wb_half_to_float((uint16_t)(sd[u] & 0xffffu));
            const float s8 = wb_half_to_float((uint16_t)(sd[u] >> 16));
            a += unit(row + (e / T::QK) * T::BYTES, e % T::QK,
                      reinterpret_cast<const int*>(sx + e), d8, s8);
          }
          acc[m] = a;
        }
        __syncthreads();  // the next matrix or tile overwrites the staging buffers
      }
    }
  }
};

// Element j of a 16-byte chunk of F32 (4), F16 or BF16 (8) values.
template <int QT>
WB_DEVICE float wb_chunk_value(const uint32_t* bits, int j) {
  if (QT == WB_F32) return wb_bits_to_float(bits[j]);
  const uint16_t h = (uint16_t)(bits[j / 2] >> (16 * (j % 2)));
  return QT == WB_F16 ? wb_half_to_float(h) : wb_bf16_to_float(h);
}

// The float types: no codes and no scales, so nothing to stage but x. Per tile of WB_MV_FTILE
// columns, x is copied into shared memory by 16-byte loads; the WB_MV_LANES lanes of a row then
// read the row's aligned 16-byte chunks straight from global memory (one vector load each,
// consecutive lanes on consecutive chunks) and accumulate by fmaf in float32, chunk by chunk in
// column order. Chunks at a row's ends that reach outside the row, or a matrix whose elements are
// not aligned to their size, are read element by element.
#define WB_MV_FTILE 2048  // columns per tile of the float types (8 KiB of x)
template <int QT>
struct wb_matvec<QT, true> {
  static constexpr int B = wb_q<QT>::BYTES;  // bytes per element: 4 or 2
  WB_DEVICE void run(const wb_mv_rows& R, const float* x, const uint8_t*, int cols,
                     int row_bytes, float* acc) {
    __shared__ WB_ALIGN(16) float sxf[WB_MV_FTILE];  // x's tile
    const int tid = (int)threadIdx.x;
    const int r = tid / WB_MV_LANES, l = tid % WB_MV_LANES;
    for (int c0 = 0; c0 < cols; c0 += WB_MV_FTILE) {
      const int n = cols - c0 < WB_MV_FTILE ? cols - c0 : WB_MV_FTILE;  // columns in the tile
      for (int i = tid; 4 * i < n; i += WB_MV_THREADS) {
        const float* p = x + c0 + 4 * i;
        if (4 * i + 4 <= n && (wb_addr(p) & 15) == 0) {
          *reinterpret_cast<wb_u32x4*>(sxf + 4 * i) = wb_ld16(reinterpret_cast<const uint8_t*>(p));
        } else {
          for (int j = 0; j < 4 && 4 * i + j < n; ++j) sxf[4 * i + j] = p[j];
        }
      }
      __syncthreads();
#pragma unroll
      for (int m = 0; m < 2; ++m)  // constant bounds: acc stays in registers
        if (m < R.segs && r < wb_mv_nrows(R, m)) acc[m] = row_tile(R, m, r, l, c0, n, row_bytes, sxf, acc[m]);
      __syncthreads();  // the next tile overwrites sxf
    }
  }

  // Row r of matrix m times x's tile (columns c0 .. c0 + n - 1, in sxf), added to acc.
  WB_DEVICE float row_tile(const wb_mv_rows& R, int m, int r, int l, int c0, int n,
                           int row_bytes, const float* sxf, float acc) {
    const uint8_t* w = R.base[m] + (size_t)(R.row0[m] + r) * row_bytes;  // (row_bytes,)
    const unsigned long long lo = wb_addr(R.base[m]);
    const unsigned long long hi = lo + (unsigned long long)R.rows[m] * row_bytes;
    const unsigned long long start = wb_addr(w) + (unsigned long long)c0 * B;
    const unsigned long long end = start + (unsigned long long)n * B;
    if (start % B) {  // elements straddle the chunks: element by element
      for (int e = l; e < n; e += WB_MV_LANES)
        acc = fmaf(wb_q<QT>::value(w + (size_t)(c0 + e) * B, 0), sxf[e], acc);
      return acc;
    }
    for (unsigned long long g = (start & ~15ull) + 16ull * l; g < end; g += 16ull * WB_MV_LANES) {
      const long long e0 = ((long long)g - (long long)start) / B;  // column of byte 0
      if (g >= start && g + 16 <= end && g + 16 <= hi) {
        const wb_u32x4 u = wb_ld16(R.base[m] + (g - lo));
        const uint32_t* bits = reinterpret_cast<const uint32_t*>(&u);
#pragma unroll
        for (int j = 0; j < 16 / B; ++j) acc = fmaf(wb_chunk_value<QT>(bits, j), sxf[e0 + j], acc);
      } else {
        for (int j = 0; j < 16 / B; ++j) {
          if (e0 + j < 0 || e0 + j >= n) continue;
          acc = fmaf(wb_q<QT>::value(w + (size_t)(c0 + e0 + j) * B, 0), sxf[e0 + j], acc);
        }
      }
    }
    return acc;
  }
};

// The block's row sums, reduced over each row's lanes into sy (R.segs, WB_MV_ROWS).
template <int QT>
WB_DEVICE void wb_matvec_rows(const wb_mv_rows& R, const float* x, const uint8_t* xq, int cols,
                              int row_bytes, float (*sy)[WB_MV_ROWS]) {
  float acc[2] = {0.0f, 0.0f};
  wb_matvec<QT>::run(R, x, xq, cols, row_bytes, acc);
  const int tid = (int)threadIdx.x;
#pragma unroll
  for (int m = 0; m < 2; ++m) {  // every lane of the block takes the same m: all shuffle
    if (m >= R.segs) break;
    float a = acc[m];
    for (int o = WB_MV_LANES / 2; o > 0; o /= 2) a += WB_SHFL_XOR_W(a, o, WB_MV_LANES);
    if (tid % WB_MV_LANES == 0) sy[m][tid / WB_MV_LANES] = a;
  }
  __syncthreads();
}

template <int QT>
__global__ void matvec(const uint8_t* WB_RESTRICT W,   // (rows, row_bytes)
                       const float* WB_RESTRICT x,     // (cols,)
                       const uint8_t* WB_RESTRICT xq,  // (cols + cols / 8,) Q8_1, 16-aligned
                       float* WB_RESTRICT y,           // (rows,)
                       int rows, int cols, int row_bytes) {
  __shared__ float sy[1][WB_MV_ROWS];  // the block's results
  const int row0 = (int)blockIdx.x * WB_MV_ROWS;
  wb_matvec_rows<QT>(wb_mv_one(W, rows, row0), x, xq, cols, row_bytes, sy);
  const int tid = (int)threadIdx.x;
  if (tid < WB_MV_ROWS && row0 + tid < rows) y[row0 + tid] = sy[0][tid];
}

// matvec_batch<QT>(W, x, xq, y, n, rows, cols, row_bytes, xq_stride): Y = X @ W.T for the n
// rows of X (decode tokens of n sequences), n <= WB_MB_MAX. The block shape is matvec's (16 rows
// of W, 16 lanes each) and every weight block is staged into shared memory once per tile for all
// n rows of X: the weights are read once whatever n. Each (row of W, row of X) accumulates
// exactly as matvec does (lane l takes the Q8_1 units l, l + 16, ... in ascending order, then the
// same butterfly; the float types fmaf over l, l + 16, ...), so row b of Y is bit-identical to
// matvec of row b alone: a sequence's logits do not depend on what it is batched with.
//   x: (n, cols) float32 (the float types)    xq: (n, xq_stride) Q8_1 rows from
//   quantize_q8_1_rows, xq_stride a multiple of 16    y: (n, rows) float32
//   grid (ceil(rows / WB_MV_ROWS),), block (WB_MV_THREADS,)
#define WB_MB_MAX 32    // rows of X per launch (the wrapper splits larger batches)
#define WB_MB_TILE 512  // columns per tile: WB_MV_LANES Q8_1 units, one per lane of a row

template <int QT, bool IS_FLOAT = wb_q<QT>::IS_FLOAT>
struct wb_matvec_batch {
  typedef wb_q<QT> T;
  static constexpr int BLOCKS = WB_MB_TILE / T::QK;                  // QT blocks per row per tile
  static constexpr int STRIDE = (BLOCKS * T::BYTES + 31) / 16 * 16;  // staged bytes per row
  static constexpr int UNITS = WB_MB_TILE / WB_Q8_1_QK;              // Q8_1 units per tile

  WB_DEVICE void run(const uint8_t* W, const float*, const uint8_t* xq, int n, int rows, int cols,
                     int row_bytes, int xq_stride, float* acc) {
    __shared__ WB_ALIGN(16) uint8_t sw[WB_MV_ROWS * STRIDE];       // staged rows of the tile
    __shared__ WB_ALIGN(16) uint8_t sx[WB_MB_MAX][WB_MB_TILE];     // X's codes of the tile
    __shared__ uint32_t sd[WB_MB_MAX][UNITS];                      // X's (d, s) of the tile
    const int tid = (int)threadIdx.x;
    const int r = tid / WB_MV_LANES, l = tid % WB_MV_LANES;
    const int row0 = (int)blockIdx.x * WB_MV_ROWS;
    const int nb = cols / T::QK;
    for (int b0 = 0; b0 < nb; b0 += BLOCKS) {
      const int nbt = nb - b0 < BLOCKS ? nb - b0 : BLOCKS;  // blocks in this tile
      const int units = nbt * T::QK / WB_Q8_1_QK;
      const int u0 = b0 * T::QK / WB_Q8_1_QK;  // the tile's first unit
      wb_stage_rows(sw, STRIDE, W, rows, row_bytes, row0, b0 * T::BYTES, nbt * T::BYTES,
                    nb <= BLOCKS);
      for (int i = tid; i < n * units * 2; i += WB_MV_THREADS) {
        const int b = i / (units * 2), c = i % (units * 2);
        *reinterpret_cast<wb_u32x4*>(&sx[b][16 * c]) =
            wb_ld16(xq + (size_t)b * xq_stride + (size_t)u0 * WB_Q8_1_QK + 16 * c);
      }
      for (int i = tid; i < n * units; i += WB_MV_THREADS) {
        const int b = i / units, u = i % units;
        sd[b][u] = wb_q8_1_ds(xq + (size_t)b * xq_stride, cols)[u0 + u];
      }
      __syncthreads();
      if (row0 + r < rows) {
        const uint8_t* row =
            wb_staged_row(sw, STRIDE, W, row_bytes, row0, r, b0 * T::BYTES, nb <= BLOCKS);
        for (int u = l; u < units; u += WB_MV_LANES) {
          const int e = u * WB_Q8_1_QK;  // first column of the unit within the tile
          const uint8_t* blk = row + (e / T::QK) * T::BYTES;
#pragma unroll
          for (int b = 0; b < WB_MB_MAX; ++b) {  // unrolled: acc stays in registers
            if (b < n) {
              const float d8 = wb_half_to_float((uint16_t)(sd[b][u] & 0xffffu));
              const float s8 = wb_half_to_float((uint16_t)(sd[b][u] >> 16));
              acc[b] += wb_matvec<QT>::unit(blk, e % T::QK,
                                            reinterpret_cast<const int*>(&sx[b][e]), d8, s8);
            }
          }
        }
      }
      __syncthreads();  // the next tile overwrites the staging buffers
    }
  }
};

// The float types: each weight chunk is loaded once and multiplied into every row of X, in the
// order matvec's float body takes them (tiles of WB_MV_FTILE columns; lane l's 16-byte chunks
// l, l + 16, ... from the 16-byte boundary below the tile's start, element by element at the
// ends and when the elements straddle chunks), so each row of Y has matvec's bits.
template <int QT>
struct wb_matvec_batch<QT, true> {
  static constexpr int B = wb_q<QT>::BYTES;  // bytes per element: 4 or 2
  WB_DEVICE void run(const uint8_t* W, const float* x, const uint8_t*, int n, int rows, int cols,
                     int row_bytes, int, float* acc) {
    const int row = (int)blockIdx.x * WB_MV_ROWS + (int)threadIdx.x / WB_MV_LANES;
    const int l = (int)threadIdx.x % WB_MV_LANES;
    if (row >= rows) return;
    const uint8_t* w = W + (size_t)row * row_bytes;  // (row_bytes,)
    const unsigned long long lo = wb_addr(W), hi = lo + (unsigned long long)rows * row_bytes;
    for (int c0 = 0; c0 < cols; c0 += WB_MV_FTILE) {
      const int nc = cols - c0 < WB_MV_FTILE ? cols - c0 : WB_MV_FTILE;  // columns in the tile
      const float* xt = x + c0;  // (n, cols) from the tile's first column
      const unsigned long long start = wb_addr(w) + (unsigned long long)c0 * B;
      const unsigned long long end = start + (unsigned long long)nc * B;
      if (start % B) {
        for (int e = l; e < nc; e += WB_MV_LANES) {
          const float wv = wb_q<QT>::value(w + (size_t)(c0 + e) * B, 0);
#pragma unroll
          for (int b = 0; b < WB_MB_MAX; ++b)  // unrolled: acc stays in registers
            if (b < n) acc[b] = fmaf(wv, xt[(size_t)b * cols + e], acc[b]);
        }
        continue;
      }
      for (unsigned long long g = (start & ~15ull) + 16ull * l; g < end;
           g += 16ull * WB_MV_LANES) {
        const long long e0 = ((long long)g - (long long)start) / B;  // column of byte 0
        const bool whole = g >= start && g + 16 <= end && g + 16 <= hi;
        wb_u32x4 u;
        if (whole) u = wb_ld16(W + (g - lo));
        const uint32_t* bits = reinterpret_cast<const uint32_t*>(&u);
        for (int j = 0; j < 16 / B; ++j) {
          if (!whole && (e0 + j < 0 || e0 + j >= nc)) continue;
          const float wv = whole ? wb_chunk_value<QT>(bits, j)
                                 : wb_q<QT>::value(w + (size_t)(c0 + e0 + j) * B, 0);
#pragma unroll
          for (int b = 0; b < WB_MB_MAX; ++b)
            if (b < n) acc[b] = fmaf(wv, xt[(size_t)b * cols + e0 + j], acc[b]);
        }
      }
    }
  }
};

template <int QT>
__global__ WB_LAUNCH_BOUNDS(WB_MV_THREADS) void matvec_batch(const uint8_t* WB_RESTRICT W,   // (rows, row_bytes)
                             const float* WB_RESTRICT x,     // (n, cols)
                             const uint8_t* WB_RESTRICT xq,  // (n, xq_stride) Q8_1 rows
                             float* WB_RESTRICT y,           // (n, rows)
                             int n, int rows, int cols, int row_bytes, int xq_stride) {
  __shared__ float sy[WB_MB_MAX][WB_MV_ROWS];  // the block's results
  float acc[WB_MB_MAX];
#pragma unroll
  for (int b = 0; b < WB_MB_MAX; ++b) acc[b] = 0.0f;
  wb_matvec_batch<QT>::run(W, x, xq, n, rows, cols, row_bytes, xq_stride, acc);
  const int tid = (int)threadIdx.x, row0 = (int)blockIdx.x * WB_MV_ROWS;
#pragma unroll
  for (int b = 0; b < WB_MB_MAX; ++b) {
    if (b < n) {  // n is the same for the whole block: every lane shuffles
      float a = acc[b];
      for (int o = WB_MV_LANES / 2; o > 0; o /= 2) a += WB_SHFL_XOR_W(a, o, WB_MV_LANES);
      if (tid % WB_MV_LANES == 0) sy[b][tid / WB_MV_LANES] = a;
    }
  }
  __syncthreads();
  for (int i = tid; i < n * WB_MV_ROWS; i += WB_MV_THREADS) {
    const int b = i / WB_MV_ROWS, rr = i % WB_MV_ROWS;
    if (row0 + rr < rows) y[(size_t)b * rows + row0 + rr] = sy[b][rr];
  }
}

// --- Fusion: the decode step's matvecs with what comes before and after them ----------------------
//
// A decoded token runs, per layer, matvec_fused (Q, K, V) -> rope_kv -> attention_decode ->
// attention_decode_reduce_q8_1 -> matvec_fused (output projection + residual, RMSNorm + Q8_1 tail)
// -> matvec_fused (gate, up, SwiGLU, Q8_1 tail) -> matvec_fused (down + residual, the next RMSNorm
// + Q8_1 tail): 7 launches (the first layer adds rmsnorm_q8_1), from 24 unfused.
//
// RMSNorm and Q8_1 of a whole vector, by one block of WB_MV_THREADS: the sum of squares in float
// (16-lane butterflies, then the 16 partials in order: the same bits at any warp width), then
// h = (x * scale) * w as rmsnorm.hip computes it, and h's Q8_1 blocks by 8 lanes each from the
// values in registers (no read-back). norm == 0 quantizes x itself (h is then not written).
// Q8_1 needs cols % 32 == 0; quant == 0 (the float types' products read h) skips it.
WB_DEVICE void wb_norm_q8_1(const float* x, const float* w, float eps, int cols, int norm,
                            int quant, float* h, uint8_t* xq) {
  __shared__ float part[WB_MV_THREADS / 16];  // (16,) partial sums of squares
  const int tid = (int)threadIdx.x;
  float scale = 1.0f;
  if (norm) {
    float ss = 0.0f;
    for (int i = tid; i < cols; i += WB_MV_THREADS) ss = fmaf(x[i], x[i], ss);
    for (int o = 8; o > 0; o /= 2) ss += WB_SHFL_XOR_W(ss, o, 16);
    if (tid % 16 == 0) part[tid / 16] = ss;
    __syncthreads();
    ss = 0.0f;
    for (int i = 0; i < WB_MV_THREADS / 16; ++i) ss += part[i];
    scale = 1.0f / sqrtf(ss / (float)cols + eps);  // as rmsnorm.hip
  }
  if (!quant) {
    if (norm)
      for (int i = tid; i < cols; i += WB_MV_THREADS) h[i] = x[i] * scale * w[i];
    return;
  }
  const int blocks = cols / WB_Q8_1_QK;
  for (int b0 = 0; b0 < blocks; b0 += WB_MV_THREADS / 8) {  // uniform trip count: all shuffle
    const int b = b0 + tid / 8, k = tid % 8;
    const bool ok = b < blocks;
    float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (ok) {
      const int i = b * WB_Q8_1_QK + 4 * k;
      wb_ld_f4(x + i, v);
      if (norm) {
        float g[4];
        wb_ld_f4(w + i, g);
        for (int j = 0; j < 4; ++j) v[j] = v[j] * scale * g[j];
        if ((wb_addr(h + i) & 15) == 0) {
          wb_u32x4 u;
          uint32_t* ub = reinterpret_cast<uint32_t*>(&u);
          for (int j = 0; j < 4; ++j) ub[j] = wb_float_to_bits(v[j]);
          *reinterpret_cast<wb_u32x4*>(h + i) = u;
        } else {
          for (int j = 0; j < 4; ++j) h[i + j] = v[j];
        }
      }
    }
    wb_q8_1_store(v, b, k, ok, xq, cols);
  }
}

// x (cols,) -> h = rmsnorm(x) * w (cols,) and, when quant != 0, h as Q8_1 in xq. grid (1,),
// block (WB_MV_THREADS,): the first norm of a decode step (the later ones are matvec_fused tails).
WB_KERNEL WB_LAUNCH_BOUNDS(WB_MV_THREADS) void rmsnorm_q8_1(const float* WB_RESTRICT x,
                                                            const float* WB_RESTRICT w,
                                                            float* WB_RESTRICT h,
                                                            uint8_t* WB_RESTRICT xq, int cols,
                                                            float eps, int quant) {
  wb_norm_q8_1(x, w, eps, cols, 1, quant, h, xq);
}

// matvec_fused: one launch for what the decode step does around a product. mode:
#define WB_MV_SPLIT 0   // y_m = W_m x for up to three matrices (Q, K, V) by block ranges:
                        // blocks [0, B0) -> W0, [B0, B0 + B1) -> W1, the rest -> W2
#define WB_MV_SWIGLU 1  // y0 = silu(W0 x) * (W1 x) (gate, up): a block takes 16 rows of each
#define WB_MV_ADD 2     // y0 = y1 + W0 x (the residual stream; y1 may be y0: in place)
// tail (after every block has written y0, the last block to finish runs it on the whole of y0):
//   0 none, 1 y0 -> Q8_1 in tq, 2 th = rmsnorm(y0) * tw and th -> Q8_1 in tq (tq_on: quantize)
// "Last block": each block fences its stores (__threadfence) and counts itself on *counter; the
// block that counts gridDim.x runs the tail and resets the counter to 0 for the next launch.
template <int QT>
__global__ void matvec_fused(const uint8_t* WB_RESTRICT W0, const uint8_t* WB_RESTRICT W1,
                             const uint8_t* WB_RESTRICT W2,
                             const float* WB_RESTRICT x,     // (cols,)
                             const uint8_t* WB_RESTRICT xq,  // (cols + cols / 8,) Q8_1
                             float* y0, float* y1, float* WB_RESTRICT y2,
                             int rows0, int rows1, int rows2, int cols, int row_bytes, int mode,
                             int tail, const float* WB_RESTRICT tw, float eps, int tq_on,
                             float* WB_RESTRICT th, uint8_t* WB_RESTRICT tq,
                             unsigned int* counter) {
  __shared__ float sy[2][WB_MV_ROWS];  // the block's row sums (swiglu: gate's, then up's)
  __shared__ int last;
  const int tid = (int)threadIdx.x, blk = (int)blockIdx.x;
  const int nb0 = (rows0 + WB_MV_ROWS - 1) / WB_MV_ROWS;  // blocks of W0, then of W1
  const int nb1 = (rows1 + WB_MV_ROWS - 1) / WB_MV_ROWS;
  if (mode == WB_MV_SWIGLU) {
    const int row0 = blk * WB_MV_ROWS;
    wb_matvec_rows<QT>(wb_mv_two(W0, W1, rows0, row0), x, xq, cols, row_bytes, sy);
    if (tid < WB_MV_ROWS && row0 + tid < rows0) {
      const float g = sy[0][tid];
      y0[row0 + tid] = g / (1.0f + expf(-g)) * sy[1][tid];  // as swiglu
    }
  } else {
    const int m = blk < nb0 ? 0 : blk < nb0 + nb1 ? 1 : 2;
    const uint8_t* W = m == 0 ? W0 : m == 1 ? W1 : W2;
    float* y = m == 0 ? y0 : m == 1 ? y1 : y2;
    const int rows = m == 0 ? rows0 : m == 1 ? rows1 : rows2;
    const int row0 = (blk - (m == 0 ? 0 : m == 1 ? nb0 : nb0 + nb1)) * WB_MV_ROWS;
    wb_matvec_rows<QT>(wb_mv_one(W, rows, row0), x, xq, cols, row_bytes, sy);
    if (tid < WB_MV_ROWS && row0 + tid < rows)
      y[row0 + tid] = mode == WB_MV_ADD ? y1[row0 + tid] + sy[0][tid] : sy[0][tid];
  }
  if (!tail) return;
  __threadfence();  // this block's y0 stores reach device scope before it is counted
  __syncthreads();
  if (tid == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();  // and the other blocks' stores are seen by this one
  wb_norm_q8_1(y0, tw, eps, rows0, tail == 2, tq_on, th, tq);
  if (tid == 0) atomicExch(counter, 0u);
}

#define WB_INSTANCE(QT)                                                                        \
  template __global__ void matvec<QT>(const uint8_t* WB_RESTRICT, const float* WB_RESTRICT,    \
                                      const uint8_t* WB_RESTRICT, float* WB_RESTRICT, int,     \
                                      int, int);                                               \
  template __global__ void matvec_fused<QT>(                                                   \
      const uint8_t* WB_RESTRICT, const uint8_t* WB_RESTRICT, const uint8_t* WB_RESTRICT,      \
      const float* WB_RESTRICT, const uint8_t* WB_RESTRICT, float*, float*, float* WB_RESTRICT, \
      int, int, int, int, int, int, int, const float* WB_RESTRICT, float, \
      int, float* WB_RESTRICT, uint8_t* WB_RESTRICT, unsigned int*);
WB_FOR_EACH_QTYPE(WB_INSTANCE)
#undef WB_INSTANCE
#define WB_INSTANCE(QT)                                                                          \
  template __global__ void matvec_batch<QT>(const uint8_t* WB_RESTRICT, const float* WB_RESTRICT, \
                                            const uint8_t* WB_RESTRICT, float* WB_RESTRICT, int,  \
                                            int, int, int, int);
WB_FOR_EACH_QTYPE(WB_INSTANCE)
#undef WB_INSTANCE
