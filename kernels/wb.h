// wb.h: the one portability header every kernel includes.
//
// One kernel source is compiled by four compilers:
//   hiprtc (ROCm, through CuPy)     __HIPCC_RTC__             WB_COMPILER_HIPRTC
//   NVRTC (CUDA, through CuPy)      __CUDACC_RTC__            WB_COMPILER_NVRTC
//   hipcc / clang -x hip (offline)  __HIP__ or __HIPCC__      WB_COMPILER_HIPCC
//   nvcc (offline)                  __CUDACC__                WB_COMPILER_NVCC
//   host C++ (the CPU emulator)     WB_EMULATOR (or nothing)  WB_COMPILER_EMULATOR
// and exactly one WB_COMPILER_* is defined to 1, plus the family: WB_HIP (AMD HIP), WB_CUDA
// (CUDA, including HIP on the NVIDIA platform) or WB_EMULATOR.
//
// What it gives kernels:
//   int8_t ... uint64_t            fixed-width integers (the RTC compilers have no <cstdint>)
//   WB_KERNEL                      extern "C" __global__  (a symbol CuPy can find by name)
//   WB_LAUNCH_BOUNDS(n)            __launch_bounds__(n)  (max threads per block; one argument:
//                                  the second one means different things on HIP and CUDA)
//   WB_DEVICE                      device helper: static __device__ __forceinline__
//   WB_RESTRICT                    __restrict__
//   WB_ALIGN(n)                    alignment attribute for types and shared arrays
//   WB_DYNAMIC_SHARED(type, name)  declares `type* name` pointing at the dynamic shared memory
//                                  (the launch's shared_mem bytes); the emulator cannot do
//                                  `extern __shared__`
//   WB_FULL_MASK, wb_lanemask_t    a lane mask as wide as the widest warp (64 bits on HIP, where
//                                  ROCm 7 requires it; 32 bits on CUDA)
//   WB_SHFL(v, src)  WB_SHFL_XOR(v, lane_mask)  WB_SHFL_DOWN(v, delta)  WB_SHFL_UP(v, delta)
//   WB_SHFL_*_W(..., width)        the same within segments of `width` lanes
//   WB_BALLOT(p) -> uint64_t, WB_ANY(p), WB_ALL(p), WB_SYNCWARP()
//                                  whole-warp collectives; never hard-code the warp size: loop
//                                  `for (int o = warpSize / 2; o > 0; o /= 2)`
//   WB_HAS_WARP_SYNC               1 where the masked __shfl_*_sync forms exist (all but HIP
//                                  before 6.2), for the rare kernel that needs a partial mask
//   WB_WARP_SIZE_MAX (64), WB_MAX_WARPS_PER_BLOCK (32)
//                                  compile-time bounds for sizing per-warp shared arrays
//   wb_thread_linear(), wb_lane_id(), wb_warp_id()
//   wb_half_to_float(uint16_t), wb_bf16_to_float(uint16_t), wb_float_to_half(float),
//   wb_float_to_bf16(float)        pure-integer conversions: GGUF fp16 scales are read as
//                                  uint16_t, so no compiler's half type is needed
//   WB_TRAP(), WB_ASSERT(cond)     stop the kernel (the emulator names the block and thread)
//   WB_DOT4_I8(a, b, c)            c + the four products of the signed bytes of the ints a and b
//                                  (int32, wrapping): v_dot4_i32_i8 on AMD targets that have it,
//                                  __dp4a on sm_61+, the emulator's exact model of the AMD
//                                  builtin, and an exact scalar form elsewhere; WB_HAS_DOT4 says
//                                  whether it is one instruction
//   WB_HAS_MFMA, wb_f16x4, wb_f32x4, wb_f16x4_from_bits(uint64_t), WB_MFMA_F32_16X16X16F16(a, b, c)
//                                  AMD matrix cores (CDNA: gfx908, gfx90a, gfx94x, gfx950; the
//                                  emulator when it emulates one of them): one wave's
//                                  v_mfma_f32_16x16x16f16, D (16x16 fp32) = A B + C with A and B
//                                  16x16 fp16, four values of each per lane (layout in
//                                  emulator/wb_emu_mfma.h); WB_HAS_MFMA is 0 and the rest absent
//                                  elsewhere
#ifndef WB_H
#define WB_H

// --- which compiler ------------------------------------------------------------------------------
#if defined(WB_EMULATOR) || !(defined(__HIPCC_RTC__) || defined(__CUDACC_RTC__) || \
                              defined(__HIP__) || defined(__HIPCC__) || defined(__CUDACC__))
#define WB_COMPILER_EMULATOR 1
#include "emulator/wb_emu.h"  // defines WB_EMULATOR
#elif defined(__HIPCC_RTC__)
#define WB_COMPILER_HIPRTC 1
#define WB_HIP 1
#elif defined(__CUDACC_RTC__)
#define WB_COMPILER_NVRTC 1
#define WB_CUDA 1
#elif defined(__HIP_PLATFORM_NVIDIA__) || defined(__HIP_PLATFORM_NVCC__)
// hipcc on the NVIDIA platform is nvcc underneath: CUDA rules apply.
#define WB_COMPILER_NVCC 1
#define WB_CUDA 1
#include <hip/hip_runtime.h>
#elif defined(__HIP__) || defined(__HIPCC__)
#define WB_COMPILER_HIPCC 1
#define WB_HIP 1
#include <hip/hip_runtime.h>
#else
#define WB_COMPILER_NVCC 1
#define WB_CUDA 1
#endif

// --- fixed-width integers ------------------------------------------------------------------------
#if defined(WB_COMPILER_HIPRTC)
// hiprtc declares some of these itself (ROCm 5: the 32- and 64-bit ones, with int and long long);
// declaring the very same types again is legal C++, a different type (clang's __INT64_TYPE__ is
// long) would not be.
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#elif defined(WB_COMPILER_NVRTC)
// No system headers under NVRTC; follow the compiler's own type macros where it has them, so the
// types match <cuda/std/cstdint> should a kernel include it too.
#if defined(__INT64_TYPE__)
typedef __INT8_TYPE__ int8_t;
typedef __INT16_TYPE__ int16_t;
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT8_TYPE__ uint8_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __UINT64_TYPE__ uint64_t;
#else
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
#endif
#elif defined(WB_COMPILER_NVCC)
#include <cstdint>
#include <cstdio>  // device printf (WB_ASSERT); NVRTC and hip_runtime.h declare it themselves
#endif  // hipcc gets them from hip_runtime.h, the emulator from its shim

// --- declarations ------------------------------------------------------------------------------
#define WB_KERNEL extern "C" __global__
#define WB_LAUNCH_BOUNDS(max_threads) __launch_bounds__(max_threads)
#define WB_DEVICE static __device__ __forceinline__
#define WB_RESTRICT __restrict__
#if defined(WB_CUDA)
#define WB_ALIGN(n) __align__(n)
#else
#define WB_ALIGN(n) __attribute__((aligned(n)))
#endif

// One raw byte array shared by every use: a typed `extern __shared__ T name[]` conflicts between
// kernels (and template instances) that use different types in one module.
#if defined(WB_EMULATOR)
#define WB_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(::wb_emu::self()->dynamic_shared)
#else
#define WB_DYNAMIC_SHARED(type, name)                                     \
  extern __shared__ WB_ALIGN(16) unsigned char wb_dynamic_shared_bytes[]; \
  type* name = reinterpret_cast<type*>(wb_dynamic_shared_bytes)
#endif

// --- warp collectives --------------------------------------------------------------------------
#define WB_WARP_SIZE_MAX 64
#define WB_MAX_WARPS_PER_BLOCK 32  // 1024 threads / the narrowest warp (32)

#if defined(WB_CUDA)
#define WB_HAS_WARP_SYNC 1
typedef unsigned int wb_lanemask_t;
#define WB_FULL_MASK 0xffffffffu
#define WB_SHFL_W(v, src, w) __shfl_sync(WB_FULL_MASK, (v), (src), (w))
#define WB_SHFL_XOR_W(v, m, w) __shfl_xor_sync(WB_FULL_MASK, (v), (m), (w))
#define WB_SHFL_DOWN_W(v, d, w) __shfl_down_sync(WB_FULL_MASK, (v), (d), (w))
#define WB_SHFL_UP_W(v, d, w) __shfl_up_sync(WB_FULL_MASK, (v), (d), (w))
#define WB_BALLOT(p) ((uint64_t)__ballot_sync(WB_FULL_MASK, (p)))
#define WB_ANY(p) __any_sync(WB_FULL_MASK, (p))
#define WB_ALL(p) __all_sync(WB_FULL_MASK, (p))
#define WB_SYNCWARP() __syncwarp()
#elif defined(WB_HIP) && ((HIP_VERSION >= 70000000 && !defined(HIP_DISABLE_WARP_SYNC_BUILTINS)) || \
                          (HIP_VERSION >= 60200000 && defined(HIP_ENABLE_WARP_SYNC_BUILTINS)))
// ROCm 7 (or 6.2+ opted in): the _sync forms exist and static_assert a 64-bit mask.
#define WB_HAS_WARP_SYNC 1
typedef unsigned long long wb_lanemask_t;
#define WB_FULL_MASK 0xffffffffffffffffull
#define WB_SHFL_W(v, src, w) __shfl_sync(WB_FULL_MASK, (v), (src), (w))
#define WB_SHFL_XOR_W(v, m, w) __shfl_xor_sync(WB_FULL_MASK, (v), (m), (w))
#define WB_SHFL_DOWN_W(v, d, w) __shfl_down_sync(WB_FULL_MASK, (v), (d), (w))
#define WB_SHFL_UP_W(v, d, w) __shfl_up_sync(WB_FULL_MASK, (v), (d), (w))
#define WB_BALLOT(p) ((uint64_t)__ballot_sync(WB_FULL_MASK, (p)))
#define WB_ANY(p) __any_sync(WB_FULL_MASK, (p))
#define WB_ALL(p) __all_sync(WB_FULL_MASK, (p))
#define WB_SYNCWARP() __syncwarp(WB_FULL_MASK)
#elif defined(WB_HIP)
// Older HIP: only the maskless forms (a wavefront always executes in lockstep).
#define WB_HAS_WARP_SYNC 0
typedef unsigned long long wb_lanemask_t;
#define WB_FULL_MASK 0xffffffffffffffffull
#define WB_SHFL_W(v, src, w) __shfl((v), (src), (w))
#define WB_SHFL_XOR_W(v, m, w) __shfl_xor((v), (m), (w))
#define WB_SHFL_DOWN_W(v, d, w) __shfl_down((v), (d), (w))
#define WB_SHFL_UP_W(v, d, w) __shfl_up((v), (d), (w))
#define WB_BALLOT(p) ((uint64_t)__ballot(p))
#define WB_ANY(p) __any(p)
#define WB_ALL(p) __all(p)
#define WB_SYNCWARP() ((void)0)
#else  // the emulator: checks the mask against the warp width it was launched with
#define WB_HAS_WARP_SYNC 1
typedef unsigned long long wb_lanemask_t;
#define WB_FULL_MASK 0xffffffffffffffffull
#define WB_SHFL_W(v, src, w) __shfl_sync(WB_FULL_MASK, (v), (src), (w))
#define WB_SHFL_XOR_W(v, m, w) __shfl_xor_sync(WB_FULL_MASK, (v), (m), (w))
#define WB_SHFL_DOWN_W(v, d, w) __shfl_down_sync(WB_FULL_MASK, (v), (d), (w))
#define WB_SHFL_UP_W(v, d, w) __shfl_up_sync(WB_FULL_MASK, (v), (d), (w))
#define WB_BALLOT(p) ((uint64_t)__ballot_sync(WB_FULL_MASK, (p)))
#define WB_ANY(p) __any_sync(WB_FULL_MASK, (p))
#define WB_ALL(p) __all_sync(WB_FULL_MASK, (p))
#define WB_SYNCWARP() __syncwarp(WB_FULL_MASK)
#endif
#define WB_SHFL(v, src) WB_SHFL_W(v, src, warpSize)
#define WB_SHFL_XOR(v, m) WB_SHFL_XOR_W(v, m, warpSize)
#define WB_SHFL_DOWN(v, d) WB_SHFL_DOWN_W(v, d, warpSize)
#define WB_SHFL_UP(v, d) WB_SHFL_UP_W(v, d, warpSize)

// Lane and warp of the calling thread; blocks are laid out x fastest, as the hardware does.
WB_DEVICE int wb_thread_linear() {
  return (int)(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}
WB_DEVICE int wb_lane_id() { return wb_thread_linear() % warpSize; }
WB_DEVICE int wb_warp_id() { return wb_thread_linear() / warpSize; }

// --- stopping a kernel -------------------------------------------------------------------------
#if defined(WB_EMULATOR)
#define WB_TRAP() ::wb_emu::trap("WB_TRAP()", __FILE__, __LINE__)
#define WB_ASSERT(cond) \
  ((cond) ? (void)0 : ::wb_emu::trap("WB_ASSERT(" #cond ") failed", __FILE__, __LINE__))
#else
#if defined(WB_CUDA)
#define WB_TRAP() __trap()
#else
#define WB_TRAP() __builtin_trap()
#endif
#define WB_ASSERT(cond)                                                                       \
  do {                                                                                        \
    if (!(cond)) {                                                                            \
      printf("WB_ASSERT(%s) failed at %s:%d, block (%d,%d,%d) thread (%d,%d,%d)\n", #cond,    \
             __FILE__, __LINE__, (int)blockIdx.x, (int)blockIdx.y, (int)blockIdx.z,           \
             (int)threadIdx.x, (int)threadIdx.y, (int)threadIdx.z);                           \
      WB_TRAP();                                                                              \
    }                                                                                         \
  } while (0)
#endif

// --- integer dot product of four bytes ---------------------------------------------------------
// The AMD targets with v_dot4_i32_i8 (LLVM's dot1/dot7 features: gfx906, CDNA gfx908/gfx90a/
// gfx94x/gfx950, RDNA2 gfx103x); ggml's HIP backend uses the same builtin on the same families.
#if defined(WB_EMULATOR)
#define WB_HAS_DOT4 1
#define WB_DOT4_I8(a, b, c) __builtin_amdgcn_sdot4((a), (b), (c), false)
#elif defined(WB_HIP) &&                                                                   \
    (defined(__gfx906__) || defined(__gfx908__) || defined(__gfx90a__) ||                  \
     defined(__gfx940__) || defined(__gfx941__) || defined(__gfx942__) ||                  \
     defined(__gfx950__) || defined(__gfx1030__) || defined(__gfx1031__) ||                \
     defined(__gfx1032__) || defined(__gfx1033__) || defined(__gfx1034__) ||               \
     defined(__gfx1035__) || defined(__gfx1036__))
#define WB_HAS_DOT4 1
#define WB_DOT4_I8(a, b, c) __builtin_amdgcn_sdot4((a), (b), (c), false)
#elif defined(WB_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 610
#define WB_HAS_DOT4 1
#define WB_DOT4_I8(a, b, c) __dp4a((int)(a), (int)(b), (int)(c))
#else
#define WB_HAS_DOT4 0
#define WB_DOT4_I8(a, b, c) wb_dot4_i8_scalar((a), (b), (c))
#endif

// The exact scalar form: each product fits 16 bits, the sum wraps like the instruction's.
WB_DEVICE int wb_dot4_i8_scalar(int a, int b, int c) {
  uint32_t s = (uint32_t)c;
#pragma unroll
  for (int k = 0; k < 32; k += 8) s += (uint32_t)((int)(int8_t)(a >> k) * (int)(int8_t)(b >> k));
  return (int)s;
}

// --- matrix fused multiply-add (AMD matrix cores) ---------------------------------------------
// The targets with v_mfma_f32_16x16x16f16 (LLVM's mai-insts feature: CDNA1-3). hipcc and hiprtc
// define the __gfx*__ macro of the target they compile for; the emulator defines it when asked to
// emulate that target (EmulatorModule(arch="gfx90a")), so the same branch is the one emulated.
#if (defined(WB_HIP) || defined(WB_EMULATOR)) &&                                         \
    (defined(__gfx908__) || defined(__gfx90a__) || defined(__gfx940__) ||                \
     defined(__gfx941__) || defined(__gfx942__) || defined(__gfx950__))
#define WB_HAS_MFMA 1
#if defined(WB_EMULATOR)
typedef uint16_t wb_f16x4 __attribute__((vector_size(8)));  // four fp16 bit patterns
typedef float wb_f32x4 __attribute__((vector_size(16)));
#else
typedef _Float16 wb_f16x4 __attribute__((ext_vector_type(4)));
typedef float wb_f32x4 __attribute__((ext_vector_type(4)));
#endif
// Four fp16 bit patterns, element 0 in the low 16 bits (as a little-endian load of four halves).
WB_DEVICE wb_f16x4 wb_f16x4_from_bits(uint64_t bits) {
  return __builtin_bit_cast(wb_f16x4, bits);
}
#define WB_MFMA_F32_16X16X16F16(a, b, c) \
  __builtin_amdgcn_mfma_f32_16x16x16f16((a), (b), (c), 0, 0, 0)
#else
#define WB_HAS_MFMA 0
#endif

// --- fp16 / bf16 <-> fp32 with integer operations only -----------------------------------------
// The same bits on every compiler; no __half, no hip_fp16.h.

WB_DEVICE float wb_bits_to_float(uint32_t bits) { return __uint_as_float(bits); }
WB_DEVICE uint32_t wb_float_to_bits(float x) { return __float_as_uint(x); }

// IEEE binary16 -> binary32, exact for every input (subnormals, infinities, NaN payloads).
WB_DEVICE float wb_half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // zero or subnormal: mant * 2^-24, exact in fp32 (mant < 2^10, the scale a power of two)
    const float mag = (float)mant * 5.9604644775390625e-8f;
    return wb_bits_to_float(wb_float_to_bits(mag) | sign);
  }
  if (exp == 31) return wb_bits_to_float(sign | 0x7f800000u | (mant << 13));
  return wb_bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));  // rebias 15 -> 127
}

// bfloat16 is the top half of a binary32.
WB_DEVICE float wb_bf16_to_float(uint16_t b) { return wb_bits_to_float((uint32_t)b << 16); }

// binary32 -> binary16, round to nearest even (as numpy's float16 cast), overflow to infinity.
WB_DEVICE uint16_t wb_float_to_half(float f) {
  const uint32_t x = wb_float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t absx = x & 0x7fffffffu;
  if (absx > 0x7f800000u) {  // NaN: keep the top payload bits, and keep it a NaN (as NumPy)
    const uint32_t payload = (absx >> 13) & 0x3ffu;
    return (uint16_t)(sign | 0x7c00u | (payload != 0u ? payload : 1u));
  }
  if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // inf, or rounds past 65504
  if (absx < 0x38800000u) {
    // result is subnormal or zero: shift the implicit-one mantissa into place, round to even
    if (absx < 0x33000000u) return (uint16_t)sign;  // below half the smallest subnormal
    const uint32_t e = absx >> 23;
    const uint32_t m = (absx & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24 bits
    const uint32_t half = 1u << (shift - 1);
    const uint32_t rest = m & ((1u << shift) - 1u);
    uint32_t r = m >> shift;
    if (rest > half || (rest == half && (r & 1u))) ++r;
    return (uint16_t)(sign | r);
  }
  uint32_t r = absx - 0x38000000u;  // rebias 127 -> 15 (exponent field moves down by 112)
  const uint32_t rest = r & 0x1fffu;
  r >>= 13;
  if (rest > 0x1000u || (rest == 0x1000u && (r & 1u))) ++r;  // a carry into the exponent is right
  return (uint16_t)(sign | r);
}

// binary32 -> bfloat16, round to nearest even; NaN stays NaN.
WB_DEVICE uint16_t wb_float_to_bf16(float f) {
  const uint32_t x = wb_float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

#endif  // WB_H
