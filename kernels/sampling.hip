// Picking the next token from logits: argmax, softmax with temperature, and top-k / top-p /
// min-p filtering with a draw from a given uniform number u (so the choice is deterministic and
// the NumPy reference reproduces it exactly; the caller draws u from its seeded generator).
//
// Every kernel works on whole rows with one block per row and block-wide reductions (warp
// shuffles, then shared memory across warps): blockDim.x a multiple of the warp size, at most
// 1024. One block is plenty for vocabularies up to ~256k (a few hundred loads per thread).
// References: workbench.kernels.ops_kernels.{argmax,softmax,sample}_reference.
#include "wb.h"

#define SAMPLE_MAX_K 128  // top-k limit of sample_top_k_top_p (the wrapper refuses more)

WB_DEVICE float smp_neg_inf() { return wb_bits_to_float(0xff800000u); }
WB_DEVICE bool smp_isnan(float v) { return v != v; }

// The selection order: larger value first, equal values by lower index, and NaN before
// everything (as numpy.argmax, which returns the first NaN). A strict total order on (v, i).
WB_DEVICE bool smp_before(float va, int ia, float vb, int ib) {
  const bool na = smp_isnan(va), nb = smp_isnan(vb);
  if (na || nb) return na && (!nb || ia < ib);
  return va > vb || (va == vb && ia < ib);
}

// Block-wide best (v, i) under smp_before; every thread gets it. sv, si: (warps,) shared.
// The "nothing" element (-inf, INT_MAX) loses to every real element, -inf ones included.
WB_DEVICE void smp_block_best(float* v, int* i, float* sv, int* si) {
  for (int o = warpSize / 2; o > 0; o /= 2) {
    const float v2 = WB_SHFL_XOR(*v, o);
    const int i2 = WB_SHFL_XOR(*i, o);
    if (smp_before(v2, i2, *v, *i)) *v = v2, *i = i2;
  }
  const int lane = wb_lane_id(), warp = wb_warp_id();
  const int n_warps = (int)blockDim.x / warpSize;
  if (lane == 0) sv[warp] = *v, si[warp] = *i;
  __syncthreads();
  *v = lane < n_warps ? sv[lane] : smp_neg_inf();
  *i = lane < n_warps ? si[lane] : 0x7fffffff;
  for (int o = warpSize / 2; o > 0; o /= 2) {
    const float v2 = WB_SHFL_XOR(*v, o);
    const int i2 = WB_SHFL_XOR(*i, o);
    if (smp_before(v2, i2, *v, *i)) *v = v2, *i = i2;
  }
  __syncthreads();  // the next call's lane 0 rewrites sv, si: without it, a write-after-read race
}

WB_DEVICE float smp_block_max(float v, float* red) {
  for (int o = warpSize / 2; o > 0; o /= 2) v = fmaxf(v, WB_SHFL_XOR(v, o));
  const int lane = wb_lane_id(), warp = wb_warp_id();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < (int)blockDim.x / warpSize ? red[lane] : smp_neg_inf();
  for (int o = warpSize / 2; o > 0; o /= 2) v = fmaxf(v, WB_SHFL_XOR(v, o));
  __syncthreads();
  return v;
}

WB_DEVICE float smp_block_sum(float v, float* red) {
  for (int o = warpSize / 2; o > 0; o /= 2) v += WB_SHFL_XOR(v, o);
  const int lane = wb_lane_id(), warp = wb_warp_id();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < (int)blockDim.x / warpSize ? red[lane] : 0.0f;
  for (int o = warpSize / 2; o > 0; o /= 2) v += WB_SHFL_XOR(v, o);
  __syncthreads();
  return v;
}

// x: (rows, vocab) float32, out: (rows,) int32 = index of the largest element of each row
// (first one on ties, first NaN if any). grid (rows,).
WB_KERNEL WB_LAUNCH_BOUNDS(1024) void argmax(const float* WB_RESTRICT x, int vocab,
                                             int* WB_RESTRICT out) {
  __shared__ float sv[WB_MAX_WARPS_PER_BLOCK];  // (warps,) partial best values
  __shared__ int si[WB_MAX_WARPS_PER_BLOCK];    // (warps,) their indices
  const float* row = x + (size_t)blockIdx.x * vocab;
  float v = smp_neg_inf();
  int i = 0x7fffffff;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    if (smp_before(row[j], j, v, i)) v = row[j], i = j;
  }
  smp_block_best(&v, &i, sv, si);
  if (threadIdx.x == 0) out[blockIdx.x] = i;
}

// out = softmax(x / temperature) per row; x, out: (rows, vocab) float32, temperature > 0.
// Computed as exp((x - max) / T) / sum: every exponent <= 0, so nothing overflows. Sums in float
// over vocab/B terms per thread plus a tree: relative error ~1e-6 against the float64 reference.
WB_KERNEL WB_LAUNCH_BOUNDS(1024) void softmax(const float* WB_RESTRICT x, float* WB_RESTRICT out,
                                              int vocab, float temperature) {
  __shared__ float red[WB_MAX_WARPS_PER_BLOCK];  // (warps,) partial max / sum
  const float* row = x + (size_t)blockIdx.x * vocab;
  float* orow = out + (size_t)blockIdx.x * vocab;
  float m = smp_neg_inf();
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, row[j]);
  m = smp_block_max(m, red);
  float s = 0.0f;
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float e = expf((row[j] - m) / temperature);
    orow[j] = e;  // each thread rereads only its own elements below: no barrier needed
    s += e;
  }
  s = smp_block_sum(s, red);
  for (int j = threadIdx.x; j < vocab; j += blockDim.x) orow[j] = orow[j] / s;
}

// Sample one token id from logits (vocab,) float32 (finite or -inf; NaN is not supported) into
// out (1,) int32, in the order of the engine's Sampler (llama.cpp's chain):
//   1. top-k: the k best logits, sorted by value descending, ties by lower index (k <= 128,
//      k <= vocab);
//   2. top-p on the temperature-1 probabilities of those k (p_c = exp(z_c - z_0) / sum): keep
//      the smallest prefix whose cumulative probability reaches top_p (top_p >= 1: keep all);
//   3. min-p: keep the candidates with p_c >= min_p * p_0 (a prefix; min_p = 0: keep all);
//   4. temperature: q_c = exp((z_c - z_0) / T) over the kept ones, and return the first
//      candidate whose cumulative q exceeds u * sum(q) (u in [0, 1)), which is what
//      numpy's Generator.choice does with the u it draws.
// Step 1 runs k block-wide argmax passes over the vocabulary, each finding the best element
// after the previous winner in the selection order (no mask needed, and ties cannot repeat);
// k * vocab / B loads per thread, fine for one token per step. Steps 2-4 are serial on thread 0
// over at most 128 candidates.
WB_KERNEL WB_LAUNCH_BOUNDS(1024) void sample_top_k_top_p(const float* WB_RESTRICT logits,
                                                         int vocab, int top_k, float top_p,
                                                         float min_p, float temperature, float u,
                                                         int* WB_RESTRICT out) {
  __shared__ float sv[WB_MAX_WARPS_PER_BLOCK];  // (warps,) partial best values
  __shared__ int si[WB_MAX_WARPS_PER_BLOCK];    // (warps,) their indices
  __shared__ float cand_v[SAMPLE_MAX_K];        // (k,) selected logits, best first
  __shared__ int cand_i[SAMPLE_MAX_K];          // (k,) their token ids
  const int k = min(min(top_k, vocab), SAMPLE_MAX_K);

  float last_v = 0.0f;
  int last_i = -1;  // -1: nothing selected yet, every element is eligible
  for (int c = 0; c < k; ++c) {
    float v = smp_neg_inf();
    int i = 0x7fffffff;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
      const float x = logits[j];
      if ((last_i < 0 || smp_before(last_v, last_i, x, j)) && smp_before(x, j, v, i)) v = x, i = j;
    }
    smp_block_best(&v, &i, sv, si);
    if (threadIdx.x == 0) cand_v[c] = v, cand_i[c] = i;
    last_v = v;
    last_i = i;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;

  const float z0 = cand_v[0];
  // exp(z_c - z_0) for the top-p and min-p steps, accumulated in the order the reference
  // accumulates its cumulative sum (float here, float64 there: boundaries can differ only
  // when a cumulative sum lies within ~1e-7 of the threshold).
  float total = 0.0f;
  for (int c = 0; c < k; ++c) total += expf(cand_v[c] - z0);
  int keep = k;
  if (top_p < 1.0f) {
    float cum = 0.0f;
    for (int c = 0; c < k; ++c) {
      cum += expf(cand_v[c] - z0);
      if (cum >= top_p * total) {
        keep = c + 1;
        break;
      }
    }
  }
  if (min_p > 0.0f) {
    int n_min = 1;  // the best candidate always stays (its p / p_0 is 1)
    while (n_min < keep && expf(cand_v[n_min] - z0) >= min_p) ++n_min;
    keep = n_min;
  }
  float qsum = 0.0f;
  for (int c = 0; c < keep; ++c) qsum += expf((cand_v[c] - z0) / temperature);
  const float target = u * qsum;
  int pick = keep - 1;  // if rounding leaves the cumulative sum short of target, the last one
  float cum = 0.0f;
  for (int c = 0; c < keep; ++c) {
    cum += expf((cand_v[c] - z0) / temperature);
    if (cum > target) {
      pick = c;
      break;
    }
  }
  out[0] = cand_i[pick];
}
