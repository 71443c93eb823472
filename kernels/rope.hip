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
