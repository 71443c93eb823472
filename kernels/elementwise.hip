// Elementwise kernels of the transformer block: SwiGLU, residual add, KV-cache append.
//
// All take flat element counts and use a grid-stride loop: any grid works, the wrappers launch
// ceil(count / B) blocks of B threads (capped). References: workbench.kernels.ops_kernels.
#include "wb.h"

// out = silu(gate) * up = gate / (1 + exp(-gate)) * up; gate, up, out: (count,) float32
// (n tokens * ffn). For very negative gate exp(-gate) overflows to inf and gate / inf = -0, the
// right limit (the NumPy backend does the same). expf, not __expf: the fast form loses accuracy
// for large |gate| on some targets, and the kernel is memory-bound anyway. out may alias gate or
// up.
WB_KERNEL void swiglu(const float* gate, const float* up, float* out, int count) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    const float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

// out = a + b; a, b, out: (count,) float32 (the residual stream). out may alias a or b.
WB_KERNEL void add(const float* a, const float* b, float* out, int count) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    out[i] = a[i] + b[i];
  }
}

// Write this step's keys and values into one layer of the cache.
// k, v: (n, kv_heads, hd) float32 as the projections produce them;
// k_cache, v_cache: (kv_heads, ctx, hd) float32 (fp16 bits when kv_half != 0), one layer of
// the (layer, kv_heads, ctx, hd) cache; rows start..start+n-1 of each head are written (the caller checks start + n <= ctx).
// One thread per element, indexed in cache order (h, t, d) so that the writes of a warp are
// contiguous runs of hd floats; reads stride by kv_heads*hd between tokens.
WB_KERNEL void kv_append(const float* WB_RESTRICT k, const float* WB_RESTRICT v,
                         void* WB_RESTRICT k_cache, void* WB_RESTRICT v_cache, int n,
                         int kv_heads, int hd, int ctx, int start, int kv_half) {
  const int count = n * kv_heads * hd;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    const int d = i % hd;
    const int t = (i / hd) % n;
    const int h = i / (hd * n);
    const size_t src = ((size_t)t * kv_heads + h) * hd + d;
    const size_t dst = ((size_t)h * ctx + (start + t)) * hd + d;
    if (kv_half) {  // fp16 cache: round to nearest even, as NumPy's astype(float16)
      reinterpret_cast<uint16_t*>(k_cache)[dst] = wb_float_to_half(k[src]);
      reinterpret_cast<uint16_t*>(v_cache)[dst] = wb_float_to_half(v[src]);
    } else {
      reinterpret_cast<float*>(k_cache)[dst] = k[src];
      reinterpret_cast<float*>(v_cache)[dst] = v[src];
    }
  }
}
