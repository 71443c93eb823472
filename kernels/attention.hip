// Causal grouped-query attention over the KV cache, flash-attention style: K/V are streamed
// through shared memory in tiles, and each query row keeps a running max m and running sum l of
// its softmax (the "online softmax"): when a tile raises the max from m to m', what was
// accumulated so far is rescaled by exp(m - m'). Nothing of size (n, t) is ever stored, and the
// exponentials never overflow (every exponent is <= 0).
//
// Layouts (the NumPy engine's):
//   q    (n, heads, hd)        float32, the queries at positions start..start+n-1
//   k, v (kv_heads, ctx, hd)   float32, or fp16 (uint16 bits) when kv_half != 0: one layer of the
//                              cache; rows 0..t-1 are used, t = start+n. fp16 halves the KV
//                              traffic; scores and sums stay float32.
//   out  (n, heads * hd)       float32
// Query head h reads KV head h / (heads / kv_heads) (heads = g * group + j share KV head g).
// scale is 1/sqrt(hd) as a float32 (the score is (q . k) * scale, as the reference).
// hd <= ATTN_HD_MAX (128); shared arrays are sized for it.
//
//   attention_prefill  grid (ceil(n / 16), heads), block (256,): a tile of 16 query positions of
//                      one head per block, keys in tiles of 16; row i sees keys <= start + i.
//   attention_decode   flash-decoding over chunks of the keys for one query (n = 1), GQA
//                      groups sharing their K/V reads, then attention_decode_reduce (below).
// Reference: workbench.kernels.ops_kernels.attention_reference (= NumpyBackend.attention).
#include "wb.h"

#define ATTN_HD_MAX 128
#define PF_BQ 16                  // prefill: query positions per block
#define PF_TK 16                  // prefill: keys per tile, and lanes per query row
#define PF_THREADS (PF_BQ * PF_TK)  // 256: one score per thread per tile
#define PF_OUT_PER_THREAD (PF_BQ * ATTN_HD_MAX / PF_THREADS)  // 8 accumulators per thread
#define DC_TK 32                  // decode: keys per tile
#define DC_THREADS 256
#define DC_LANES_PER_KEY (DC_THREADS / DC_TK)  // 8 lanes share one score's dot product

WB_DEVICE float attn_neg_inf() { return wb_bits_to_float(0xff800000u); }

// Element i of a KV cache layer stored as float32 or, when half != 0, fp16.
WB_DEVICE float attn_kv(const void* p, size_t i, int half) {
  return half ? wb_half_to_float(reinterpret_cast<const uint16_t*>(p)[i])
              : reinterpret_cast<const float*>(p)[i];
}

WB_KERNEL WB_LAUNCH_BOUNDS(PF_THREADS) void attention_prefill(
    const float* WB_RESTRICT q, const void* WB_RESTRICT k, const void* WB_RESTRICT v,
    float* WB_RESTRICT out, int n, int heads, int kv_heads, int hd, int ctx, int start,
    float scale, int kv_half) {
  __shared__ float qs[PF_BQ][ATTN_HD_MAX];      // this block's query rows (zeros past n)
  __shared__ float ks[PF_TK][ATTN_HD_MAX + 1];  // key tile; +1 pads rows apart in the banks:
                                                // the 16 lanes of a row read 16 keys at one d
  __shared__ float vs[PF_TK][ATTN_HD_MAX];      // value tile
  __shared__ float ps[PF_BQ][PF_TK];            // exp(score - running max) of the tile
  __shared__ float row_corr[PF_BQ];             // exp(old max - new max) per row, this tile
  __shared__ float row_sum[PF_BQ];              // final softmax denominators

  const int tid = threadIdx.x;
  const int h = blockIdx.y;
  const int g = h / (heads / kv_heads);
  const int i0 = blockIdx.x * PF_BQ;
  const int rows = min(PF_BQ, n - i0);  // valid query rows of this block
  const int t = start + n;
  const int kend = min(t, start + i0 + rows);  // the last valid row sees keys < kend
  const size_t kv0 = (size_t)g * ctx * hd;    // (t, hd) of KV head g starts here

  for (int e = tid; e < PF_BQ * hd; e += PF_THREADS) {
    const int r = e / hd, d = e % hd;
    qs[r][d] = r < rows ? q[((size_t)(i0 + r) * heads + h) * hd + d] : 0.0f;
  }

  // Score role: row r, key j of the tile; the 16 lanes of a row are one aligned segment of a
  // warp (16 divides 32 and 64), so row max and row sum are width-16 shuffles.
  const int r = tid / PF_TK, j = tid % PF_TK;
  // Rows past n get the last valid row's mask and zero queries: finite scores, never written.
  const int qpos = start + i0 + min(r, rows - 1);
  float m = attn_neg_inf();  // running max of row r (all 16 lanes hold it)
  float l = 0.0f;            // running sum of exp(score - m)
  float acc[PF_OUT_PER_THREAD];  // output elements tid + c * PF_THREADS of the (BQ, hd) tile
  for (int c = 0; c < PF_OUT_PER_THREAD; ++c) acc[c] = 0.0f;

  for (int j0 = 0; j0 < kend; j0 += PF_TK) {
    __syncthreads();  // the previous tile is consumed (and, the first time, qs is written)
    for (int e = tid; e < PF_TK * hd; e += PF_THREADS) {
      const int jj = e / hd, d = e % hd;
      const bool in = j0 + jj < kend;  // zero past the end: p is 0 there, and 0 * 0 stays 0
      ks[jj][d] = in ? attn_kv(k, kv0 + (size_t)(j0 + jj) * hd + d, kv_half) : 0.0f;
      vs[jj][d] = in ? attn_kv(v, kv0 + (size_t)(j0 + jj) * hd + d, kv_half) : 0.0f;
    }
    __syncthreads();

    const int key = j0 + j;
    float s = attn_neg_inf();
    if (key <= qpos && key < kend) {
      float dot = 0.0f;
      for (int d = 0; d < hd; ++d) dot = fmaf(qs[r][d], ks[j][d], dot);
      s = dot * scale;
    }
    float mt = s;
    for (int o = PF_TK / 2; o > 0; o /= 2) mt = fmaxf(mt, WB_SHFL_XOR_W(mt, o, PF_TK));
    // Key 0 is visible to every row and lies in the first tile, so m_new is finite from the
    // first tile on: no exp(-inf - -inf) = NaN. On the first tile exp(m - m_new) = exp(-inf) = 0.
    const float m_new = fmaxf(m, mt);
    const float p = expf(s - m_new);  // masked keys: exp(-inf) = 0
    float ls = p;
    for (int o = PF_TK / 2; o > 0; o /= 2) ls += WB_SHFL_XOR_W(ls, o, PF_TK);
    const float corr = expf(m - m_new);
    l = l * corr + ls;
    m = m_new;
    ps[r][j] = p;
    if (j == 0) row_corr[r] = corr;
    __syncthreads();

    // Output role: element e = tid + c * 256 of the (BQ, hd) tile -> row e / hd, dim e % hd.
    for (int c = 0; c < PF_OUT_PER_THREAD; ++c) {
      const int e = tid + c * PF_THREADS;
      if (e < PF_BQ * hd) {
        const int rr = e / hd, d = e % hd;
        float a = acc[c] * row_corr[rr];
        for (int jj = 0; jj < PF_TK; ++jj) a = fmaf(ps[rr][jj], vs[jj][d], a);
        acc[c] = a;
      }
    }
  }

  if (j == 0) row_sum[r] = l;
  __syncthreads();
  for (int c = 0; c < PF_OUT_PER_THREAD; ++c) {
    const int e = tid + c * PF_THREADS;
    if (e < rows * hd) {
      const int rr = e / hd, d = e % hd;
      out[((size_t)(i0 + rr) * heads + h) * hd + d] = acc[c] / row_sum[rr];
    }
  }
}

// Decode, flash-decoding style: the keys 0..t-1 are cut into chunks of `chunk` keys (a multiple of
// DC_TK), and block (g, c, z) runs the online softmax of up to DC_GMAX query heads of KV head g's
// group (heads z * DC_GMAX ...) over chunk c only; attention_decode_reduce then merges the chunks.
// Long contexts thus fill the GPU (kv_heads x chunks x groups blocks instead of heads), and each KV
// head's keys and values are read once for its whole GQA group instead of once per query head.
//
//   attention_decode         grid (kv_heads, chunks, ceil(group / DC_GMAX)), block (256,)
//                            part (heads, chunks, hd + 2): per head and chunk the unnormalized
//                            output sum_j exp(s_j - m) v_j, then m (the chunk's max score) and
//                            l = sum_j exp(s_j - m)
//   attention_decode_reduce  grid (heads,), block (256,): out = sum_c e^(m_c - M) o_c /
//                            sum_c e^(m_c - M) l_c, M = max_c m_c
//
// Per tile of DC_TK keys: 8 lanes per key compute the scores of every query head of the block
// (ss); thread (j, jj) = (tid / 32, tid % 32) keeps head j's running max and turns score jj into
// p = exp(s - m_new) (ps), and its lane jj = 0 keeps the running sum; then every thread updates the
// output elements it owns (e = tid + 256 i of the block's (heads, hd)) by corr and the p's.
#define DC_GMAX 8  // query heads per decode block (one GQA group, or a slice of a larger one)

// Where key j's row of KV head g starts in a cache layer: a contiguous (kv_heads, ctx, hd) layer,
// or pages of a paged pool (attn_paged_rows, below).
struct attn_contiguous_rows {
  size_t kv0;  // (ctx, hd) of KV head g starts here
  int hd;
  WB_DEVICE size_t at(const attn_contiguous_rows& a, int j) { return a.kv0 + (size_t)j * a.hd; }
};

// One decode block (see above): query heads h0 .. h0 + nh - 1 of q (hd each), keys j_begin ..
// j_end - 1 at the rows ROWS::at gives, its partials written to part_h (per head: chunks x
// (hd + 2)) at chunk c. j_begin >= j_end (a chunk past a short sequence's end) writes o = 0,
// m = -inf, l = 0, which the reduction weighs by exp(-inf) = 0 exactly.
template <class ROWS>
WB_DEVICE void attn_decode_chunk(const float* WB_RESTRICT q, const void* WB_RESTRICT k,
                                 const void* WB_RESTRICT v, float* WB_RESTRICT part, int nh,
                                 int hd, int chunks, int c, int j_begin, int j_end, float scale,
                                 int kv_half, const ROWS& rows) {
  __shared__ float qs[DC_GMAX][ATTN_HD_MAX];    // the block's queries
  __shared__ float ks[DC_TK][ATTN_HD_MAX + 1];  // key tile (padded: 8 keys at one d per warp step)
  __shared__ float vs[DC_TK][ATTN_HD_MAX];      // value tile
  __shared__ float ss[DC_GMAX][DC_TK];          // scores of the tile (-inf past the chunk)
  __shared__ float ps[DC_GMAX][DC_TK];          // exp(score - running max)
  __shared__ float corr[DC_GMAX];               // exp(old max - new max) per head

  const int tid = (int)threadIdx.x;
  for (int e = tid; e < nh * hd; e += DC_THREADS) qs[e / hd][e % hd] = q[e];

  const int key_lane = tid % DC_LANES_PER_KEY, key_slot = tid / DC_LANES_PER_KEY;
  const int pj = tid / DC_TK, pjj = tid % DC_TK;  // the (head, key) this thread turns into p
  float m = attn_neg_inf(), l = 0.0f;             // head pj's running max and (lane 0) sum
  float acc[DC_GMAX * ATTN_HD_MAX / DC_THREADS];  // owned outputs e = tid + DC_THREADS * i
  for (int i = 0; i < DC_GMAX * ATTN_HD_MAX / DC_THREADS; ++i) acc[i] = 0.0f;

  for (int j0 = j_begin; j0 < j_end; j0 += DC_TK) {
    __syncthreads();  // the previous tile is consumed (and, the first time, qs is written)
    for (int e = tid; e < DC_TK * hd; e += DC_THREADS) {
      const int jj = e / hd, d = e % hd;
      const bool in = j0 + jj < j_end;
      const size_t at = in ? ROWS::at(rows, j0 + jj) + d : 0;
      ks[jj][d] = in ? attn_kv(k, at, kv_half) : 0.0f;
      vs[jj][d] = in ? attn_kv(v, at, kv_half) : 0.0f;
    }
    __syncthreads();
    for (int j = 0; j < nh; ++j) {
      float dot = 0.0f;
      for (int d = key_lane; d < hd; d += DC_LANES_PER_KEY) {
        dot = fmaf(qs[j][d], ks[key_slot][d], dot);
      }
      for (int o = DC_LANES_PER_KEY / 2; o > 0; o /= 2) {
        dot += WB_SHFL_XOR_W(dot, o, DC_LANES_PER_KEY);
      }
      if (key_lane == 0) ss[j][key_slot] = j0 + key_slot < j_end ? dot * scale : attn_neg_inf();
    }
    __syncthreads();
    if (pj < nh) {
      float mt = ss[pj][0];
      for (int jj = 1; jj < DC_TK; ++jj) mt = fmaxf(mt, ss[pj][jj]);
      const float m_new = fmaxf(m, mt);  // finite: key j0 < j_end is in every tile
      ps[pj][pjj] = expf(ss[pj][pjj] - m_new);
      if (pjj == 0) corr[pj] = expf(m - m_new);
      m = m_new;
    }
    __syncthreads();
    if (pj < nh && pjj == 0) {
      float sum = 0.0f;
      for (int jj = 0; jj < DC_TK; ++jj) sum += ps[pj][jj];
      l = fmaf(l, corr[pj], sum);
    }
    for (int i = 0; i < DC_GMAX * ATTN_HD_MAX / DC_THREADS; ++i) {
      const int e = tid + DC_THREADS * i, j = e / hd, d = e % hd;
      if (j >= nh) break;
      float a = acc[i] * corr[j];
      for (int jj = 0; jj < DC_TK; ++jj) a = fmaf(ps[j][jj], vs[jj][d], a);
      acc[i] = a;
    }
  }
  for (int i = 0; i < DC_GMAX * ATTN_HD_MAX / DC_THREADS; ++i) {
    const int e = tid + DC_THREADS * i, j = e / hd, d = e % hd;
    if (j >= nh) break;
    part[((size_t)j * chunks + c) * (hd + 2) + d] = acc[i];
  }
  if (pj < nh && pjj == 0) {
    float* mh = part + ((size_t)pj * chunks + c) * (hd + 2) + hd;
    mh[0] = m;
    mh[1] = l;
  }
}

WB_KERNEL WB_LAUNCH_BOUNDS(DC_THREADS) void attention_decode(
    const float* WB_RESTRICT q, const void* WB_RESTRICT k, const void* WB_RESTRICT v,
    float* WB_RESTRICT part, int heads, int kv_heads, int hd, int ctx, int t, int chunk,
    float scale, int kv_half) {
  const int group = heads / kv_heads;
  const int g = (int)blockIdx.x, c = (int)blockIdx.y;
  const int h0 = g * group + (int)blockIdx.z * DC_GMAX;  // first query head of the block
  const int left = group - (int)blockIdx.z * DC_GMAX;
  const int nh = left < DC_GMAX ? left : DC_GMAX;
  const int j_begin = c * chunk, j_end = j_begin + chunk < t ? j_begin + chunk : t;
  const attn_contiguous_rows rows = {(size_t)g * ctx * hd, hd};
  attn_decode_chunk(q + (size_t)h0 * hd, k, v, part + (size_t)h0 * gridDim.y * (hd + 2), nh, hd,
                    (int)gridDim.y, c, j_begin, j_end, scale, kv_half, rows);
}

// Paged decode: n sequences at once, each with its own length and page table over one layer of
// a page pool. Sequence s's key j is row j % page_size of page tables[s][j / page_size]:
//   q       (n, heads, hd) float32, one query per sequence (its last position)
//   k, v    (pages, page_size, kv_heads, hd) float32, or fp16 when kv_half (one pool layer)
//   tables  (n, max_pages) int32     lens (n,) int32, keys of each sequence (>= 1)
//   chunks  (n,) int32 keys per chunk of each sequence (a multiple of DC_TK)
//   part    (n, heads, max_chunks, hd + 2): attention_decode's partials per sequence
//   grid (kv_heads, max_chunks, n * ceil(group / DC_GMAX)), block (256,); then
//   attention_decode_reduce over n * heads "heads".
// Each sequence is chunked as attention_decode would chunk it alone (the host picks each chunk
// from the sequence's own length), so its result is bit-identical to attention_decode on its
// gathered keys, whatever else is in the batch; chunks past its end weigh nothing.
struct attn_paged_rows {
  const int* table;  // (max_pages,) of this sequence
  int page_size, kv_heads, g, hd;
  WB_DEVICE size_t at(const attn_paged_rows& a, int j) {
    const size_t page = (size_t)a.table[j / a.page_size];
    return ((page * a.page_size + j % a.page_size) * a.kv_heads + a.g) * a.hd;
  }
};

WB_KERNEL WB_LAUNCH_BOUNDS(DC_THREADS) void attention_decode_paged(
    const float* WB_RESTRICT q, const void* WB_RESTRICT k, const void* WB_RESTRICT v,
    const int* WB_RESTRICT tables, const int* WB_RESTRICT lens, const int* WB_RESTRICT chunk_of,
    float* WB_RESTRICT part, int heads, int kv_heads, int hd, int page_size, int max_pages,
    float scale, int kv_half) {
  const int group = heads / kv_heads;
  const int zg = (group + DC_GMAX - 1) / DC_GMAX;  // blocks per GQA group
  const int s = (int)blockIdx.z / zg, z = (int)blockIdx.z % zg;
  const int g = (int)blockIdx.x, c = (int)blockIdx.y, chunks = (int)gridDim.y;
  const int h0 = g * group + z * DC_GMAX;
  const int left = group - z * DC_GMAX;
  const int nh = left < DC_GMAX ? left : DC_GMAX;
  const int t = lens[s], chunk = chunk_of[s];
  const int j_begin = c * chunk < t ? c * chunk : t;
  const int j_end = j_begin + chunk < t ? j_begin + chunk : t;
  const attn_paged_rows rows = {tables + (size_t)s * max_pages, page_size, kv_heads, g, hd};
  const size_t sh = (size_t)s * heads + h0;  // the block's first (sequence, head) row
  attn_decode_chunk(q + sh * hd, k, v, part + sh * chunks * (hd + 2), nh, hd, chunks, c, j_begin,
                    j_end, scale, kv_half, rows);
}

// Head h's merged output element d (see attention_decode_reduce).
WB_DEVICE float attn_reduce(const float* part, int h, int hd, int chunks, int d) {
  const float* ph = part + (size_t)h * chunks * (hd + 2);  // (chunks, hd + 2)
  float mx = attn_neg_inf();
  for (int c = 0; c < chunks; ++c) mx = fmaxf(mx, ph[(size_t)c * (hd + 2) + hd]);
  float o = 0.0f, s = 0.0f;
  for (int c = 0; c < chunks; ++c) {
    const float* pc = ph + (size_t)c * (hd + 2);
    const float w = expf(pc[hd] - mx);
    o = fmaf(w, pc[d], o);
    s = fmaf(w, pc[hd + 1], s);
  }
  return o / s;
}

WB_KERNEL WB_LAUNCH_BOUNDS(DC_THREADS) void attention_decode_reduce(
    const float* WB_RESTRICT part, float* WB_RESTRICT out, int heads, int hd, int chunks) {
  const int h = (int)blockIdx.x;
  for (int d = (int)threadIdx.x; d < hd; d += DC_THREADS)
    out[(size_t)h * hd + d] = attn_reduce(part, h, hd, chunks, d);
}

// attention_decode_reduce fused with the Q8_1 quantization of its output (the input of the output
// projection's integer matvec): grid (ceil(heads * hd / 256),), thread e of the flattened
// (heads * hd,) output merges its element, and each Q8_1 block of 32 is held by 32 consecutive
// threads (one element each) that combine max and sum by a butterfly of width 32 (heads * hd
// % 32 == 0; a block may span heads). xq: (heads * hd * 9 / 8,) laid out as quant.h's Q8_1; the
// same bits as quantize_q8_1 of out.
WB_KERNEL WB_LAUNCH_BOUNDS(DC_THREADS) void attention_decode_reduce_q8_1(
    const float* WB_RESTRICT part, float* WB_RESTRICT out, uint8_t* WB_RESTRICT xq, int heads,
    int hd, int chunks) {
  const int cols = heads * hd, e = (int)(blockIdx.x * DC_THREADS + threadIdx.x);
  const bool ok = e < cols;
  const float val = ok ? attn_reduce(part, e / hd, hd, chunks, e % hd) : 0.0f;
  if (ok) out[e] = val;
  float amax = fabsf(val);
  for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, WB_SHFL_XOR_W(amax, o, 32));
  const float dq = amax / 127.0f;
  const int q = amax == 0.0f ? 0 : (int)roundf(val / dq);
  int sum = q;
  for (int o = 16; o > 0; o /= 2) sum += WB_SHFL_XOR_W(sum, o, 32);
  if (!ok) return;
  xq[e] = (uint8_t)(q & 255);
  if (e % 32 == 0) {
    const uint32_t ds = (uint32_t)wb_float_to_half(dq) |
                        ((uint32_t)wb_float_to_half(dq * (float)sum) << 16);
    reinterpret_cast<uint32_t*>(xq + cols)[e / 32] = ds;
  }
}
