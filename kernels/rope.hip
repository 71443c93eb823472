// Rotary position embedding, in place on q or k: x (n, heads, head_dim) float32, token t at
// position pos0 + t. The first rope_dim dims of each head are rotated in rope_dim/2 pairs, the
// rest are left untouched:
//   rope_norm  pairs (2i, 2i+1)            (llama.cpp's "norm" mode: llama, SmolLM2)
//   rope_neox  pairs (i, i + rope_dim/2)   (GPT-NeoX / Qwen style)
// Pair i turns by  angle = (pos / rope_scale) * base^(-2i/rope_dim) / freq_factors[i]
// (freq_factors (rope_dim/2,) float32, or null for all ones), exactly as the NumPy engine's
// Transformer.rope_tables, and (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos).
//
// Launch: one thread per (token, head, pair): n * heads * rope_dim/2 threads, 1D grid of any
// block size (grid-stride). Reference: workbench.kernels.ops_kernels.rope_reference.
#include "wb.h"

// The angle is computed in double, then reduced to [-pi, pi] in double, and only the reduced
// angle is rounded to float for sincosf. In float the angle itself would be wrong at long
// positions: at pos 2048, pair 0 turns by 2048 rad, whose float spacing is 1.2e-4 rad, so cos/sin
// would be off by ~1e-4, where the engine (float64 angles) is exact to float rounding. Double
// costs one pow and a few multiplies per thread; on GPUs with slow FP64 that is still negligible
// next to the memory traffic. After the reduction the float sincosf is accurate to a few ulp.
WB_DEVICE void rope_angle(int pos, int i, int rope_dim, float base, float rope_scale,
                          const float* freq_factors, float* c, float* s) {
  double inv_freq = pow((double)base, -2.0 * (double)i / (double)rope_dim) / (double)rope_scale;
  if (freq_factors != nullptr) inv_freq /= (double)freq_factors[i];
  double a = (double)pos * inv_freq;
  const double two_pi = 6.283185307179586476925;
  a -= two_pi * rint(a / two_pi);  // now in [-pi, pi], exact to double rounding
  sincosf((float)a, s, c);
}

template <bool NEOX>
WB_DEVICE void rope_impl(float* x, int n, int heads, int head_dim, int rope_dim, int pos0,
                         float base, float rope_scale, const float* freq_factors) {
  const int half = rope_dim / 2;
  const long long total = (long long)n * heads * half;
  for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (long long)gridDim.x * blockDim.x) {
    const int i = (int)(idx % half);            // pair
    const long long row = idx / half;           // token * heads + head
    const int t = (int)(row / heads);           // token
    float c, s;
    rope_angle(pos0 + t, i, rope_dim, base, rope_scale, freq_factors, &c, &s);
    float* h = x + row * head_dim;
    const int i0 = NEOX ? i : 2 * i;
    const int i1 = NEOX ? i + half : 2 * i + 1;
    const float x0 = h[i0];
    const float x1 = h[i1];
    h[i0] = x0 * c - x1 * s;
    h[i1] = x0 * s + x1 * c;
  }
}

// x: (n, heads, head_dim) float32, rotated in place; freq_factors: (rope_dim/2,) float32 or null.
WB_KERNEL void rope_norm(float* x, int n, int heads, int head_dim, int rope_dim, int pos0,
                         float base, float rope_scale, const float* freq_factors) {
  rope_impl<false>(x, n, heads, head_dim, rope_dim, pos0, base, rope_scale, freq_factors);
}

WB_KERNEL void rope_neox(float* x, int n, int heads, int head_dim, int rope_dim, int pos0,
                         float base, float rope_scale, const float* freq_factors) {
  rope_impl<true>(x, n, heads, head_dim, rope_dim, pos0, base, rope_scale, freq_factors);
}
