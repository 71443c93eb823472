// The AMD matrix fused multiply-add builtins the kernels use, emulated with their exact lane
// layouts (included by wb_emu.h).
//
//   __builtin_amdgcn_mfma_f32_16x16x16f16(a, b, c, cbsz, abid, blgp) -> d
//       v_mfma_f32_16x16x16f16 (CDNA1/CDNA2; v_mfma_f32_16x16x16_f16 on CDNA3): D = A B + C for a
//       16x16 A (fp16), a 16x16 B (fp16) and a 16x16 C/D (fp32), spread over the 64 lanes of a
//       wave. Lane L (0..63) holds, with j = L % 16 and g = L / 16:
//         a: A[j][4g + e]          e = 0..3 (four fp16: row j, k-group g of A)
//         b: B[4g + e][j]          e = 0..3 (four fp16: column j, k-group g of B)
//         c, d: C/D[4g + e][j]     e = 0..3 (four fp32: column j, rows 4g..4g+3)
//       Source: AMD's Matrix Instruction Calculator (github.com/ROCm/amd_matrix_instruction_
//       calculator, `matrix_calculator.py --architecture cdna2 --instruction
//       v_mfma_f32_16x16x16f16 --register-layout`, the same for cdna1 and, as
//       v_mfma_f32_16x16x16_f16, cdna3), which prints these tables from the CDNA ISA guides:
//       e.g. A[5][9] = v0{37}.[31:16], B[9][5] = v0{37}.[31:16], D[9][5] = v1{37}.
//
// It is a wave64 instruction: at warp size 32 the emulator refuses it (a trap naming the builtin),
// and every one of the 64 lanes must reach the same call (as for a shuffle; a partial wave or a
// lane that left early is an error). The lanes meet three times: lane 0 hands out the address of
// a directory on its stack, each lane enters the address of its own operands there, and once all
// have, each computes its four outputs from the others' operands; a last meeting keeps every
// lane's operands alive until all have read them.
//
// Arithmetic: the products of two fp16 values are exact in fp32; the emulator sums the 16
// products and c in double and rounds once to fp32. The hardware's internal summation order and
// width are not documented, so a GPU may differ from this in the last bits of a result (never in
// which elements meet: that is the layout above). Only cbsz = abid = blgp = 0 (no broadcast, no
// lane swizzle of B) is emulated; other values are refused.
#ifndef WB_EMU_MFMA_H
#define WB_EMU_MFMA_H

#if !defined(WB_EMU_DISCOVERY)
namespace wb_emu {

// IEEE binary16 bits -> the exact value.
inline double half_bits_value(std::uint16_t h) {
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  double v;
  if (exp == 0) {
    v = std::ldexp(static_cast<double>(mant), -24);
  } else if (exp == 31) {
    v = mant == 0 ? HUGE_VAL : NAN;
  } else {
    v = std::ldexp(static_cast<double>(mant | 0x400), exp - 25);
  }
  return (h & 0x8000) ? -v : v;
}

struct MfmaOperands {
  std::uint16_t a[4];  // fp16 bits
  std::uint16_t b[4];
};
struct MfmaDirectory {
  const MfmaOperands* lane[kMaxWarpSize];
};

template <class A, class B, class C>
inline C mfma_f32_16x16x16f16(const char* what, const char* file, int line, int site, A a, B b,
                              C c, int cbsz, int abid, int blgp) {
  static_assert(sizeof(A) == 8 && sizeof(B) == 8 && sizeof(C) == 16,
                "__builtin_amdgcn_mfma_f32_16x16x16f16 takes four fp16 (a, b) and four floats (c)");
  ThreadCtx* s = self();
  if (s->warp_size != 64)
    trap("__builtin_amdgcn_mfma_f32_16x16x16f16 is a wave64 instruction: it needs warp size 64 "
         "(this launch runs warps of 32)",
         file, line);
  if (cbsz != 0 || abid != 0 || blgp != 0)
    trap("__builtin_amdgcn_mfma_f32_16x16x16f16: the emulator implements cbsz = abid = blgp = 0 "
         "only",
         file, line);
  const std::uint64_t all = ~std::uint64_t(0);
  MfmaOperands mine;
  std::memcpy(mine.a, &a, 8);
  std::memcpy(mine.b, &b, 8);
  MfmaDirectory directory{};  // lane 0's is the one every lane uses
  MfmaDirectory* dir =
      shfl(what, file, line, site, all, 0, kShflIdx, &directory, 0, s->warp_size);
  dir->lane[s->lane] = &mine;
  warp_collective(what, file, line, site, all, 0, kWarpSync, -1, nullptr, 0);
  for (int l = 0; l < 64; ++l)
    if (dir->lane[l] == nullptr)
      trap("__builtin_amdgcn_mfma_f32_16x16x16f16 needs all 64 lanes of the wave (this wave is "
           "partial: the block's thread count is not a multiple of 64)",
           file, line);
  float cin[4], out[4];
  std::memcpy(cin, &c, 16);
  const int j = s->lane % 16, g = s->lane / 16;
  for (int e = 0; e < 4; ++e) {
    const int i = 4 * g + e;  // this output is D[i][j]
    double acc = cin[e];
    for (int k = 0; k < 16; ++k) {
      const double x = half_bits_value(dir->lane[i + 16 * (k / 4)]->a[k % 4]);  // A[i][k]
      const double y = half_bits_value(dir->lane[j + 16 * (k / 4)]->b[k % 4]);  // B[k][j]
      acc += x * y;
    }
    out[e] = static_cast<float>(acc);
  }
  // Nobody leaves (and frees its operands or lane 0's directory) before all have read.
  warp_collective(what, file, line, site, all, 0, kWarpSync, -1, nullptr, 0);
  C d;
  std::memcpy(static_cast<void*>(&d), out, 16);
  return d;
}

}  // namespace wb_emu
#endif  // !WB_EMU_DISCOVERY

#define __builtin_amdgcn_mfma_f32_16x16x16f16(a, b, c, cbsz, abid, blgp)                         \
  ::wb_emu::mfma_f32_16x16x16f16(WB_EMU_SITE("__builtin_amdgcn_mfma_f32_16x16x16f16"), (a), (b), \
                                 (c), (cbsz), (abid), (blgp))

#endif  // WB_EMU_MFMA_H
