// Rotary position embedding, in place on q or k: x (n, heads, head_dim) float32, token t at
// position pos0 + t. The first rope_dim dims of each head are rotated in rope_dim/2 pairs, the
// rest are left untouched:
//   rope_norm  pairs (2i, 2i+1)            (llama.cpp's "norm" mode: llama, SmolLM2)
//   rope_neox  pairs (i, i + rope_dim/2)   (GPT-NeoX / Qwen style)
// Pair i of position p turns by  angle = (p / rope_scale) * base^(-2i/rope_dim) / freq_factors[i],
// (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), with cos and sin read from a table computed
// once on the host in float64 and rounded to float32 (workbench.kernels.ops_kernels.rope_table),
// exactly as the NumPy engine's Transformer.rope_tables: no pow, no double arithmetic and no
// range reduction on the device, and the same bits as the engine.
//
//   table (positions, rope_dim/2, 2) float32: (cos, sin) of row p - table_pos0 for position p;
//   the caller guarantees table_pos0 <= pos0 and pos0 + n - table_pos0 <= positions.
//
// Launch: one thread per (token, head, pair): n * heads * rope_dim/2 threads, 1D grid of any
// block size (grid-stride). Reference: workbench.kernels.ops_kernels.rope_reference.
#include "wb.h"

template <bool NEOX>
WB_DEVICE void rope_impl(float* x, int n, int heads, int head_dim, int rope_dim, int pos0,
                         const float* table, int table_pos0) {
  const int half = rope_dim / 2;
  const long long total = (long long)n * heads * half;
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    const int i = (int)(idx % half);   // pair
    const long long row = idx / half;  // token * heads + head
    const int t = (int)(row / heads);  // token
    const float* cs = table + ((size_t)(pos0 + t - table_pos0) * half + i) * 2;
    const float c = cs[0], s = cs[1];
    float* h = x + row * head_dim;
    const int i0 = NEOX ? i : 2 * i;
    const int i1 = NEOX ? i + half : 2 * i + 1;
    const float x0 = h[i0];
    const float x1 = h[i1];
    h[i0] = x0 * c - x1 * s;
    h[i1] = x0 * s + x1 * c;
  }
}

// x: (n, heads, head_dim) float32, rotated in place; table: see above.
WB_KERNEL void rope_norm(float* x, int n, int heads, int head_dim, int rope_dim, int pos0,
                         const float* table, int table_pos0) {
  rope_impl<false>(x, n, heads, head_dim, rope_dim, pos0, table, table_pos0);
}

WB_KERNEL void rope_neox(float* x, int n, int heads, int head_dim, int rope_dim, int pos0,
                         const float* table, int table_pos0) {
  rope_impl<true>(x, n, heads, head_dim, rope_dim, pos0, table, table_pos0);
}

// The decode step's RoPE fused with the KV-cache write (one launch instead of rope q, rope k and
// kv_append): q (heads, head_dim) is rotated into q_out (may be q: in place; a separate buffer
// makes a repeated launch give the same result), k (kv_heads, head_dim) is rotated into row
// pos of k_cache and v copied into row pos of v_cache, both (kv_heads, ctx, head_dim) float32 or,
// when kv_half != 0, fp16 (rounded to nearest even, as kv_append).
//
// Launch: one block of head_dim threads (grid (1,)); thread d owns element d of every row: the q
// rows, then the k rows, then the v rows, one after the other. The position's table row and each
// q/k row are staged in shared memory, each thread loading its own element, so every global
// access is one element per lane with consecutive lanes on consecutive elements, the table is
// read once, and a pair's partner comes from shared memory; the rotation is rope_impl's
// expression. head_dim <= ROPE_KV_HD_MAX.
#define ROPE_KV_HD_MAX 1024
WB_KERNEL void rope_kv(const float* q, float* q_out, const float* WB_RESTRICT k,
                       const float* WB_RESTRICT v, void* WB_RESTRICT k_cache,
                       void* WB_RESTRICT v_cache, int heads, int kv_heads, int head_dim,
                       int rope_dim, int neox, int pos, const float* WB_RESTRICT table,
                       int table_pos0, int ctx, int kv_half) {
  __shared__ float ts[ROPE_KV_HD_MAX];  // (rope_dim/2, 2): (cos, sin) of position pos
  __shared__ float xs[ROPE_KV_HD_MAX];  // the q or k row being turned
  const int d = (int)threadIdx.x, half = rope_dim / 2;
  // d's pair (i) and whether d is its first element; dims from rope_dim on are not rotated
  const bool rot = d < rope_dim;
  const int i = neox ? d % half : d / 2;
  const bool first = neox ? d < half : d % 2 == 0;
  const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
  if (rot) ts[d] = table[(size_t)(pos - table_pos0) * rope_dim + d];
  for (int row = 0; row < heads + 2 * kv_heads; ++row) {  // the same trip count for every thread
    const bool is_q = row < heads, is_k = !is_q && row < heads + kv_heads;
    const int g = is_q ? row : is_k ? row - heads : row - heads - kv_heads;  // head of its kind
    const float* src = (is_q ? q : is_k ? k : v) + (size_t)g * head_dim;
    float val = src[d];
    if (is_q || is_k) {  // uniform across the block: the barriers are reached by all
      __syncthreads();   // the previous row's partners are read (and, the first time, ts written)
      xs[d] = val;
      __syncthreads();
      if (rot) {
        const float c = ts[2 * i], s = ts[2 * i + 1];
        const float x0 = xs[i0], x1 = xs[i1];
        val = first ? x0 * c - x1 * s : x0 * s + x1 * c;
      }
    }
    if (is_q) {
      q_out[(size_t)g * head_dim + d] = val;
      continue;
    }
    const size_t dst = ((size_t)g * ctx + pos) * head_dim + d;
    void* cache = is_k ? k_cache : v_cache;
    if (kv_half) {
      reinterpret_cast<uint16_t*>(cache)[dst] = wb_float_to_half(val);
    } else {
      reinterpret_cast<float*>(cache)[dst] = val;
    }
  }
}
