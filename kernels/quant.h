// quant.h: how each GGUF tensor type is laid out and decoded. The ONE place in the HIP sources
// where block layouts live; dequant.hip, get_rows.hip, matvec.hip and matmul.hip all decode
// through the traits below (Python's twin is workbench/backends/quant_cpu.py).
//
// Each type is a tag (WB_Q4_1 = ggml's own type id) and a traits struct wb_q<TAG> with
//   QK        elements per block        BYTES      bytes per block
//   GROUP     elements sharing one scale (and offset); 1 for the float types
//   AFFINE    value = scale * code + offset (offset != 0), else value = scale * code
//   IS_FLOAT  F32 / F16 / BF16: the "code" is the value itself, no scale
//   code(b, i)    integer code of element i of the block at b        (quantized types)
//   scale(b, g)   scale of group g = i / GROUP                        (quantized types)
//   offset(b, g)  additive offset of group g (AFFINE types: +m or -dmin*m)
//   value(b, i)   element i as float32, bit-identical to gguf.quants.dequantize
//
// Bit-identity with gguf-py (NumPy, float32 throughout) needs the same float operations in the
// same order, each rounded to float32:
//   Q4_0/Q5_0/Q8_0   d * q                  Q4_1/Q5_1   (d * q) + m
//   Q2_K             (d*sc) * q - (dmin*m)  Q3_K/Q6_K   (d*sc) * q
//   Q4_K/Q5_K        (d*sc) * q - (dmin*m)
// so products and sums go through wb_qmul/wb_qadd, which must never fuse into an FMA (one
// rounding instead of two would change the low bit): __fmul_rn is never contracted by
// nvcc/NVRTC; on clang (hipcc, hiprtc) the product is fenced off (see wb_qmul). x - y is computed
// as x + (-y): IEEE defines subtraction that way, so the result is the same bits, signed zeros
// included. fp16 fields are read as uint16_t and widened with wb_half_to_float (exact, as NumPy's
// astype(float32)).
//
// Block sizes are checked against gguf's table (gguf.GGML_QUANT_SIZES): the Python registry
// (workbench/kernels/quant_kernels.py) passes -DWB_GGUF_QK_<T>=... -DWB_GGUF_BYTES_<T>=... from
// workbench.gguf.quants.block_layout and the static_asserts at the end of this file fail the
// build if a struct here and the table disagree. An offline compile without those defines skips
// the check (the registry's builds, emulated and on the GPU, always carry them).
//
// The traits read bytes: blocks of 18, 22, 34, 110 ... bytes leave multi-byte fields unaligned
// (Q5_0's 32-bit qh sits at byte 2 of a 22-byte block), which a wider load cannot assume. Kernels
// that want wide global loads stage whole rows with aligned 16-byte loads (wb_ld16, see
// matvec.hip) and decode from shared memory.
#ifndef WB_QUANT_H
#define WB_QUANT_H

#include "wb.h"

// ggml type ids (enum ggml_type / gguf.GGMLQuantizationType).
enum wb_qtype {
  WB_F32 = 0,
  WB_F16 = 1,
  WB_Q4_0 = 2,
  WB_Q4_1 = 3,
  WB_Q5_0 = 6,
  WB_Q5_1 = 7,
  WB_Q8_0 = 8,
  WB_Q2_K = 10,
  WB_Q3_K = 11,
  WB_Q4_K = 12,
  WB_Q5_K = 13,
  WB_Q6_K = 14,
  WB_BF16 = 30,
};

#define WB_QK_K 256  // super-block of the K-quants (ggml's QK_K)

// --- exact float32 arithmetic and byte-level reads ----------------------------------------------

WB_DEVICE float wb_qmul(float a, float b) {
#if defined(WB_HIP)
  // clang's HIP __fmul_rn is a plain `*`, and with HIP's default -ffp-contract=fast the backend
  // fuses it with a following add into v_fmac_f32 whatever pragma the source carries (seen with
  // ROCm 5.2 on gfx90a). An empty asm that "modifies" the product hides it from that combine.
  float r = a * b;
  asm volatile("" : "+v"(r));
  return r;
#else
  return __fmul_rn(a, b);  // CUDA: never contracted; the emulator: plain `*` (no -ffp-contract)
#endif
}
WB_DEVICE float wb_qadd(float a, float b) { return __fadd_rn(a, b); }

WB_DEVICE uint32_t wb_ld_u16(const uint8_t* p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }
WB_DEVICE float wb_ld_f16(const uint8_t* p) { return wb_half_to_float((uint16_t)wb_ld_u16(p)); }

// Bit k (0..31) of the little-endian 32-bit word at p, one byte read.
WB_DEVICE int wb_bit(const uint8_t* p, int k) { return (p[k >> 3] >> (k & 7)) & 1; }

// --- the traits ---------------------------------------------------------------------------------

template <int QT>
struct wb_q;

// Defaults for the quantized types; the float types override value().
struct wb_q_float_base {
  static constexpr int GROUP = 1;
  static constexpr bool AFFINE = false;
  static constexpr bool IS_FLOAT = true;
};
struct wb_q_quant_base {
  static constexpr bool IS_FLOAT = false;
};

// float (4 bytes, little-endian)
template <>
struct wb_q<WB_F32> : wb_q_float_base {
  static constexpr int QK = 1, BYTES = 4;
  WB_DEVICE float value(const uint8_t* b, int) {
    const uint32_t bits = (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) |
                          ((uint32_t)b[3] << 24);
    return wb_bits_to_float(bits);
  }
};

// ggml_fp16_t
template <>
struct wb_q<WB_F16> : wb_q_float_base {
  static constexpr int QK = 1, BYTES = 2;
  WB_DEVICE float value(const uint8_t* b, int) { return wb_ld_f16(b); }
};

// ggml_bf16_t: the top half of a float32
template <>
struct wb_q<WB_BF16> : wb_q_float_base {
  static constexpr int QK = 1, BYTES = 2;
  WB_DEVICE float value(const uint8_t* b, int) { return wb_bf16_to_float((uint16_t)wb_ld_u16(b)); }
};

// block_q4_0 { ggml_half d; uint8_t qs[16]; }: element i < 16 is the low nibble of qs[i],
// element i >= 16 the high nibble of qs[i - 16]; value d * (q - 8).
template <>
struct wb_q<WB_Q4_0> : wb_q_quant_base {
  static constexpr int QK = 32, BYTES = 18, GROUP = 32;
  static constexpr bool AFFINE = false;
  WB_DEVICE int code(const uint8_t* b, int i) {
    return ((b[2 + (i & 15)] >> ((i >> 4) * 4)) & 15) - 8;
  }
  WB_DEVICE float scale(const uint8_t* b, int) { return wb_ld_f16(b); }
  WB_DEVICE float offset(const uint8_t*, int) { return 0.0f; }
};

// block_q4_1 { ggml_half d; ggml_half m; uint8_t qs[16]; }: value d * q + m.
template <>
struct wb_q<WB_Q4_1> : wb_q_quant_base {
  static constexpr int QK = 32, BYTES = 20, GROUP = 32;
  static constexpr bool AFFINE = true;
  WB_DEVICE int code(const uint8_t* b, int i) { return (b[4 + (i & 15)] >> ((i >> 4) * 4)) & 15; }
  WB_DEVICE float scale(const uint8_t* b, int) { return wb_ld_f16(b); }
  WB_DEVICE float offset(const uint8_t* b, int) { return wb_ld_f16(b + 2); }
};

// block_q5_0 { ggml_half d; uint8_t qh[4]; uint8_t qs[16]; }: bit i of the 32-bit qh is bit 4 of
// element i; value d * (q - 16).
template <>
struct wb_q<WB_Q5_0> : wb_q_quant_base {
  static constexpr int QK = 32, BYTES = 22, GROUP = 32;
  static constexpr bool AFFINE = false;
  WB_DEVICE int code(const uint8_t* b, int i) {
    const int lo = (b[6 + (i & 15)] >> ((i >> 4) * 4)) & 15;
    return (lo | (wb_bit(b + 2, i) << 4)) - 16;
  }
  WB_DEVICE float scale(const uint8_t* b, int) { return wb_ld_f16(b); }
  WB_DEVICE float offset(const uint8_t*, int) { return 0.0f; }
};

// block_q5_1 { ggml_half d; ggml_half m; uint8_t qh[4]; uint8_t qs[16]; }: value d * q + m.
template <>
struct wb_q<WB_Q5_1> : wb_q_quant_base {
  static constexpr int QK = 32, BYTES = 24, GROUP = 32;
  static constexpr bool AFFINE = true;
  WB_DEVICE int code(const uint8_t* b, int i) {
    const int lo = (b[8 + (i & 15)] >> ((i >> 4) * 4)) & 15;
    return lo | (wb_bit(b + 4, i) << 4);
  }
  WB_DEVICE float scale(const uint8_t* b, int) { return wb_ld_f16(b); }
  WB_DEVICE float offset(const uint8_t* b, int) { return wb_ld_f16(b + 2); }
};

// block_q8_0 { ggml_half d; int8_t qs[32]; }: value q * d.
template <>
struct wb_q<WB_Q8_0> : wb_q_quant_base {
  static constexpr int QK = 32, BYTES = 34, GROUP = 32;
  static constexpr bool AFFINE = false;
  WB_DEVICE int code(const uint8_t* b, int i) { return (int)(int8_t)b[2 + i]; }
  WB_DEVICE float scale(const uint8_t* b, int) { return wb_ld_f16(b); }
  WB_DEVICE float offset(const uint8_t*, int) { return 0.0f; }
};

// The K-quants' 2-bit planes (Q2_K qs, Q3_K qs) and Q6_K's qh: each half of the super-block
// (128 elements) takes 32 bytes, element r of the half is bits 2*(r/32).. of byte r % 32.
WB_DEVICE int wb_k_2bit(const uint8_t* q, int i) {
  const int r = i & 127;
  return (q[(i >> 7) * 32 + (r & 31)] >> ((r >> 5) * 2)) & 3;
}

// block_q2_K { uint8_t scales[16]; uint8_t qs[64]; ggml_half d; ggml_half dmin; }: 16 groups of
// 16, scales[g] = 4-bit scale | 4-bit min << 4; value (d * sc) * q - (dmin * m).
template <>
struct wb_q<WB_Q2_K> : wb_q_quant_base {
  static constexpr int QK = WB_QK_K, BYTES = 84, GROUP = 16;
  static constexpr bool AFFINE = true;
  WB_DEVICE int code(const uint8_t* b, int i) { return wb_k_2bit(b + 16, i); }
  WB_DEVICE float scale(const uint8_t* b, int g) {
    return wb_qmul(wb_ld_f16(b + 80), (float)(b[g] & 15));
  }
  WB_DEVICE float offset(const uint8_t* b, int g) {
    return -wb_qmul(wb_ld_f16(b + 82), (float)(b[g] >> 4));
  }
};

// block_q3_K { uint8_t hmask[32]; uint8_t qs[64]; uint8_t scales[12]; ggml_half d; }: 16 groups of
// 16 with 6-bit scales (low 4 bits: nibbles of scales[0..7], high 2 bits: 2-bit fields of
// scales[8..11]) biased by 32; code = low 2 bits - 4 unless the hmask bit is set; value
// (d * sc) * q.
template <>
struct wb_q<WB_Q3_K> : wb_q_quant_base {
  static constexpr int QK = WB_QK_K, BYTES = 110, GROUP = 16;
  static constexpr bool AFFINE = false;
  WB_DEVICE int code(const uint8_t* b, int i) {
    const int hm = (b[i & 31] >> (i >> 5)) & 1;
    return wb_k_2bit(b + 32, i) - ((hm ^ 1) << 2);
  }
  WB_DEVICE float scale(const uint8_t* b, int g) {
    const uint8_t* s = b + 96;
    const int lo = (s[g & 7] >> ((g >> 3) * 4)) & 15;
    const int hi = (s[8 + (g & 3)] >> ((g >> 2) * 2)) & 3;
    return wb_qmul(wb_ld_f16(b + 108), (float)((lo | (hi << 4)) - 32));
  }
  WB_DEVICE float offset(const uint8_t*, int) { return 0.0f; }
};

// The 12-byte 6-bit scale/min packing of Q4_K and Q5_K (ggml's get_scale_min_k4), sub-block j.
WB_DEVICE int wb_k4_scale(const uint8_t* s, int j) {
  return j < 4 ? (s[j] & 63) : ((s[j + 4] & 15) | ((s[j - 4] >> 6) << 4));
}
WB_DEVICE int wb_k4_min(const uint8_t* s, int j) {
  return j < 4 ? (s[j + 4] & 63) : ((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
}

// block_q4_K { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qs[128]; }: 8 sub-blocks
// of 32; sub-blocks 2c and 2c+1 are the low and high nibbles of qs[32c .. 32c+31];
// value (d * sc) * q - (dmin * m).
template <>
struct wb_q<WB_Q4_K> : wb_q_quant_base {
  static constexpr int QK = WB_QK_K, BYTES = 144, GROUP = 32;
  static constexpr bool AFFINE = true;
  WB_DEVICE int code(const uint8_t* b, int i) {
    const int s = i >> 5;
    return (b[16 + (s >> 1) * 32 + (i & 31)] >> ((s & 1) * 4)) & 15;
  }
  WB_DEVICE float scale(const uint8_t* b, int g) {
    return wb_qmul(wb_ld_f16(b), (float)wb_k4_scale(b + 4, g));
  }
  WB_DEVICE float offset(const uint8_t* b, int g) {
    return -wb_qmul(wb_ld_f16(b + 2), (float)wb_k4_min(b + 4, g));
  }
};

// block_q5_K { ggml_half d; ggml_half dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; }:
// as Q4_K plus bit 4 of element i in bit i/32 of qh[i % 32].
template <>
struct wb_q<WB_Q5_K> : wb_q_quant_base {
  static constexpr int QK = WB_QK_K, BYTES = 176, GROUP = 32;
  static constexpr bool AFFINE = true;
  WB_DEVICE int code(const uint8_t* b, int i) {
    const int s = i >> 5;
    const int lo = (b[48 + (s >> 1) * 32 + (i & 31)] >> ((s & 1) * 4)) & 15;
    return lo | (((b[16 + (i & 31)] >> s) & 1) << 4);
  }
  WB_DEVICE float scale(const uint8_t* b, int g) {
    return wb_qmul(wb_ld_f16(b), (float)wb_k4_scale(b + 4, g));
  }
  WB_DEVICE float offset(const uint8_t* b, int g) {
    return -wb_qmul(wb_ld_f16(b + 2), (float)wb_k4_min(b + 4, g));
  }
};

// block_q6_K { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; ggml_half d; }: per half of 128
// elements, low 4 bits from 64 bytes of ql (low nibbles, then high nibbles), high 2 bits from 32
// bytes of qh (as wb_k_2bit); 16 groups of 16 with int8 scales; value (d * sc) * (q - 32).
template <>
struct wb_q<WB_Q6_K> : wb_q_quant_base {
  static constexpr int QK = WB_QK_K, BYTES = 210, GROUP = 16;
  static constexpr bool AFFINE = false;
  WB_DEVICE int code(const uint8_t* b, int i) {
    const int r = i & 127;
    const int lo = (b[(i >> 7) * 64 + (r & 63)] >> ((r >> 6) * 4)) & 15;
    return (lo | (wb_k_2bit(b + 128, i) << 4)) - 32;
  }
  WB_DEVICE float scale(const uint8_t* b, int g) {
    return wb_qmul(wb_ld_f16(b + 208), (float)(int8_t)b[192 + g]);
  }
  WB_DEVICE float offset(const uint8_t*, int) { return 0.0f; }
};

// --- decoding -----------------------------------------------------------------------------------

// Element i (0 <= i < QK) of the block at b, bit-identical to gguf.quants.dequantize. The float
// types have no code()/scale(): the struct-level dispatch keeps their branch from instantiating.
template <int QT, bool IS_FLOAT = wb_q<QT>::IS_FLOAT>
struct wb_decode {
  WB_DEVICE float value(const uint8_t* b, int i) {
    typedef wb_q<QT> T;
    const int g = i / T::GROUP;
    const float v = wb_qmul(T::scale(b, g), (float)T::code(b, i));
    // Adding +0.0 to a -0.0 product would make it +0.0: non-affine types add nothing.
    return T::AFFINE ? wb_qadd(v, T::offset(b, g)) : v;
  }
};
template <int QT>
struct wb_decode<QT, true> {
  WB_DEVICE float value(const uint8_t* b, int i) { return wb_q<QT>::value(b, i); }
};

// Element col of a row of blocks.
template <int QT>
WB_DEVICE float wb_row_value(const uint8_t* row, int col) {
  typedef wb_q<QT> T;
  return wb_decode<QT>::value(row + (size_t)(col / T::QK) * T::BYTES, col % T::QK);
}

// --- wide loads and the Q8_1 activations ---------------------------------------------------------

// 16 bytes, one vector load (global_load_dwordx4 / ld.global.v4.u32) from a 16-aligned address.
// A GCC/clang vector type rather than a struct: the emulator's host compiler then makes it one
// 16-byte access too (a struct copy may become two 8-byte ones, which the counters would see).
#if defined(WB_CUDA)
typedef uint4 wb_u32x4;
#else
typedef uint32_t wb_u32x4 __attribute__((vector_size(16)));
#endif
WB_DEVICE wb_u32x4 wb_ld16(const uint8_t* p) { return *reinterpret_cast<const wb_u32x4*>(p); }
WB_DEVICE unsigned long long wb_addr(const void* p) { return (unsigned long long)p; }

// x quantized for the integer dot products, with the fields of ggml's block_q8_1 { half2 ds;
// int8_t qs[32]; } per 32 elements: d = max|x| / 127, q = round(x / d) (half away from zero;
// q = 0 when d = 0), s = d * sum(q), d and s as fp16. The two fields live in two arrays of one
// buffer, so that the codes are read with aligned 16-byte loads:
//   xq = [qs (cols,) int8][ds (cols / 32,) uint32: fp16 d | fp16 s << 16]   (16-aligned)
#define WB_Q8_1_QK 32
WB_DEVICE const uint32_t* wb_q8_1_ds(const uint8_t* xq, int cols) {
  return reinterpret_cast<const uint32_t*>(xq + cols);
}

// --- the sizes, checked against gguf's table ----------------------------------------------------

#define WB_CHECK_LAYOUT(T)                                                                      \
  static_assert(wb_q<WB_##T>::QK == WB_GGUF_QK_##T && wb_q<WB_##T>::BYTES == WB_GGUF_BYTES_##T, \
                "block layout of " #T " in quant.h disagrees with gguf.GGML_QUANT_SIZES")
#if defined(WB_GGUF_QK_F32)
WB_CHECK_LAYOUT(F32);
WB_CHECK_LAYOUT(F16);
WB_CHECK_LAYOUT(BF16);
WB_CHECK_LAYOUT(Q4_0);
WB_CHECK_LAYOUT(Q4_1);
WB_CHECK_LAYOUT(Q5_0);
WB_CHECK_LAYOUT(Q5_1);
WB_CHECK_LAYOUT(Q8_0);
WB_CHECK_LAYOUT(Q2_K);
WB_CHECK_LAYOUT(Q3_K);
WB_CHECK_LAYOUT(Q4_K);
WB_CHECK_LAYOUT(Q5_K);
WB_CHECK_LAYOUT(Q6_K);
#endif
#undef WB_CHECK_LAYOUT

// Every template below is instantiated for this list (name expressions "dequant<WB_Q4_1>" ...).
#define WB_FOR_EACH_QTYPE(X)                                                            \
  X(WB_F32) X(WB_F16) X(WB_BF16) X(WB_Q4_0) X(WB_Q4_1) X(WB_Q5_0) X(WB_Q5_1) X(WB_Q8_0) \
  X(WB_Q2_K) X(WB_Q3_K) X(WB_Q4_K) X(WB_Q5_K) X(WB_Q6_K)

#endif  // WB_QUANT_H
