// What a kernel source sees when the CPU emulator compiles it with the host C++ compiler.
//
// The emulator (workbench/kernels/emulator.py) compiles a generated wrapper that includes this
// header, then the kernel source unchanged, then one launch trampoline per kernel. Everything a
// HIP/CUDA kernel takes from its compiler is provided here: the qualifiers (__global__,
// __shared__, ...), the built-in indices, barriers, warp shuffles and votes, atomics and the
// math intrinsics typical kernels use. The scheduling itself lives in the runtime library
// (wb_emu_runtime.cpp), reached through the `Api` table of wb_emu_abi.h.
//
// Rules that follow from emulating threads with fibers:
// - `__shared__` is `static thread_local`: an OS thread runs one block at a time, all of that
//   block's threads are fibers on it, so they share the variable and no other block does.
// - Dynamic shared memory cannot be an `extern __shared__` array; use WB_DYNAMIC_SHARED (wb.h).
// - Barriers and warp collectives are identified by their call site: the threads of a block must
//   meet at the same __syncthreads(), the lanes of a warp at the same shuffle/vote. Anything else
//   is undefined behaviour on a GPU and an error here.
// - A fiber runs until it reaches a barrier, a warp collective or its end, so implicit
//   warp-synchronous code (shared-memory steps between lanes with no __syncwarp()) is not
//   emulated; it is not correct on current GPUs either.
// - Include no system headers from kernel code (the GPU compilers have none either): the macros
//   below would break them.
#ifndef WB_EMU_H
#define WB_EMU_H

#ifndef WB_EMULATOR
#define WB_EMULATOR 1
#endif

#if defined(WB_EMU_DISCOVERY)
// Discovery pass: Python preprocesses the source to find its kernels. Only macros matter, so no
// system headers; `__global__` becomes a marker that survives preprocessing.
#define WB_EMU_GLOBAL_MARK __wb_emu_global__
#else
#define WB_EMU_GLOBAL_MARK

// All system headers come first: the macros below (__noinline__, assert, abort) would break them.
#include <time.h>

#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#if defined(WB_EMU_INSTRUMENTED)
#include <link.h>
#endif

#include "wb_emu_abi.h"

namespace wb_emu {

// The calling thread's context: fiber stacks are kStackBytes-aligned with the context at a known
// offset from the base, so any frame address of the running fiber leads to it.
__attribute__((always_inline)) inline ThreadCtx* self() {
  const std::uintptr_t base = reinterpret_cast<std::uintptr_t>(__builtin_frame_address(0)) &
                              ~static_cast<std::uintptr_t>(kStackBytes - 1);
  return reinterpret_cast<ThreadCtx*>(base + ctx_offset(base));
}

[[noreturn]] inline void trap(const char* what, const char* file, int line) {
  ThreadCtx* s = self();
  s->api->trap(s, what, file, line);
  __builtin_unreachable();
}

// Barriers and warp collectives are matched by call site: `site` is a __COUNTER__ value, distinct
// for every place the intrinsic is written (two __syncthreads() on one line are two sites).
inline int block_sync(const char* what, const char* file, int line, int site, int op,
                      int predicate) {
  ThreadCtx* s = self();
  return s->api->block_sync(s, what, file, line, site, op, predicate);
}

inline const unsigned char* warp_collective(const char* what, const char* file, int line,
                                            int site, std::uint64_t mask, int flags, int op,
                                            int src, const void* value, std::uint32_t nbytes) {
  ThreadCtx* s = self();
  return s->api->warp_collective(s, what, file, line, site, mask, flags, op, src, value, nbytes);
}

inline void syncwarp(const char* file, int line, int site) {
  warp_collective("__syncwarp()", file, line, site, 0, kWarpLegacy, kWarpSync, -1, nullptr, 0);
}
inline void syncwarp(const char* file, int line, int site, std::uint64_t mask) {
  warp_collective("__syncwarp()", file, line, site, mask, 0, kWarpSync, -1, nullptr, 0);
}

enum ShflMode : int { kShflIdx, kShflUp, kShflDown, kShflXor };

// CUDA's lane arithmetic: the warp splits into segments of `width` lanes; a lane reads within its
// segment, and an out-of-segment source (up/down past the edge, xor into a later segment) yields
// the caller's own value (src = -1).
template <class T>
inline T shfl(const char* what, const char* file, int line, int site, std::uint64_t mask,
              int flags, int mode, T var, int arg, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= kValueBytes,
                "the emulator shuffles trivially copyable values of up to 16 bytes");
  ThreadCtx* s = self();
  if (width <= 0 || width > s->warp_size || (width & (width - 1)) != 0)
    trap("shuffle width must be a power of two no larger than warpSize", file, line);
  const int lane = s->lane;
  const int in_seg = lane & (width - 1);
  const int seg = lane - in_seg;
  int src = -1;
  switch (mode) {
    case kShflIdx:
      src = seg + (arg & (width - 1));
      break;
    case kShflUp:
      src = in_seg - arg >= 0 ? lane - arg : -1;
      break;
    case kShflDown:
      src = in_seg + arg < width ? lane + arg : -1;
      break;
    default:
      src = lane ^ arg;
      if (src < 0 || src >= seg + width) src = -1;
      break;
  }
  const unsigned char* r =
      warp_collective(what, file, line, site, mask, flags, kWarpShfl, src, &var, sizeof(T));
  T out;
  std::memcpy(&out, r, sizeof(T));
  return out;
}
template <class T>
inline T shfl(const char* what, const char* file, int line, int site, std::uint64_t mask,
              int flags, int mode, T var, int arg) {
  return shfl(what, file, line, site, mask, flags, mode, var, arg, self()->warp_size);
}

// Ballot result and the mask of lanes that took part.
struct Vote {
  unsigned long long ballot;
  unsigned long long members;
};
inline Vote vote(const char* what, const char* file, int line, int site, std::uint64_t mask,
                 int flags, int predicate) {
  const unsigned char value = predicate != 0;
  const unsigned char* r =
      warp_collective(what, file, line, site, mask, flags, kWarpBallot, -1, &value, 1);
  Vote v;
  std::memcpy(&v.ballot, r, 8);
  std::memcpy(&v.members, r + 8, 8);
  return v;
}

// --- instrumented builds ---------------------------------------------------------------------
// The instrumented variant of a module is compiled by clang with SanitizerCoverage's load/store
// tracing: before every load and store of kernel code the compiler calls __sanitizer_cov_loadN /
// __sanitizer_cov_storeN (defined below), which hand the address and the return address (the
// accessing instruction, for the line table) to the runtime. Functions of this header are left
// uninstrumented (an ignore list names them); atomics and __ldg report themselves instead.
#if defined(WB_EMU_INSTRUMENTED)
inline void access(const void* addr, std::uint32_t size, int op, const void* pc) {
  ThreadCtx* s = self();
  s->api->access(s, addr, size, op, pc);
}
#define WB_EMU_NOTE(p, op) \
  ::wb_emu::access((p), sizeof(*(p)), ::wb_emu::op, __builtin_return_address(0))
#define WB_EMU_MEMFN inline __attribute__((noinline))
#else
#define WB_EMU_NOTE(p, op) ((void)0)
#define WB_EMU_MEMFN inline
#endif

// --- argument passing for the launch trampolines ---------------------------------------------

// Parameter type codes for Python's argument checks: i8..i64, u8..u64, f32, f64, bool, b<N> (any
// other trivially copyable value of N bytes); pointers are "p:" (or "p:c:" when the pointee is
// const) + the pointee's code.
struct SigWriter {
  char* buf;
  std::size_t len;
  std::size_t pos;
  void put(const char* s) {
    while (*s != '\0') {
      if (pos + 1 < len) buf[pos] = *s;
      ++pos;
      ++s;
    }
    if (len != 0) buf[pos + 1 < len ? pos : len - 1] = '\0';
  }
  void put_num(std::size_t n) {
    char tmp[24];
    std::snprintf(tmp, sizeof tmp, "%zu", n);
    put(tmp);
  }
};

template <class T>
void put_value_code(SigWriter& w) {
  if constexpr (std::is_same<T, bool>::value) {
    w.put("bool");
  } else if constexpr (std::is_integral<T>::value) {
    w.put(std::is_signed<T>::value ? "i" : "u");
    w.put_num(sizeof(T) * 8);
  } else if constexpr (std::is_floating_point<T>::value) {
    w.put("f");
    w.put_num(sizeof(T) * 8);
  } else if constexpr (std::is_void<T>::value) {
    w.put("void");
  } else if constexpr (std::is_pointer<T>::value) {
    w.put("ptr");
  } else {
    w.put("b");
    w.put_num(sizeof(T));
  }
}

template <class T>
void put_code(SigWriter& w) {
  if constexpr (std::is_pointer<T>::value) {
    // "p:c:" for a pointer to const: the emulator passes writable buffers with guard zones
    w.put(std::is_const<typename std::remove_pointer<T>::type>::value ? "p:c:" : "p:");
    put_value_code<typename std::remove_cv<typename std::remove_pointer<T>::type>::type>(w);
  } else {
    put_value_code<T>(w);
  }
}

template <class... P>
int signature(void (*)(P...), char* buf, std::size_t len) {
  SigWriter w{buf, len, 0};
  if (len != 0) buf[0] = '\0';
  int i = 0;
  ((i++ != 0 ? w.put(",") : void(), put_code<typename std::decay<P>::type>(w)), ...);
  return static_cast<int>(w.pos);
}

template <class... P>
struct Closure {
  void (*kernel)(P...);
  std::tuple<typename std::decay<P>::type...> args;
};

// The body each fiber runs: a by-value call, so every thread gets its own copy of the
// parameters (kernels may modify them), as on a GPU.
template <class... P>
void run_closure(void* p) {
  auto* c = static_cast<Closure<P...>*>(p);
  std::apply(c->kernel, c->args);
}

// argv[i] points at the bytes of argument i (for pointers: at a void* holding the address).
template <class T>
T load_arg(void* const* argv, std::size_t i) {
  T v;
  std::memcpy(static_cast<void*>(&v), argv[i], sizeof(T));
  return v;
}

template <class... P, std::size_t... I>
std::tuple<typename std::decay<P>::type...> load_args(void* const* argv,
                                                      std::index_sequence<I...>) {
  return std::tuple<typename std::decay<P>::type...>(
      load_arg<typename std::decay<P>::type>(argv, I)...);
}

template <class... P>
int launch_kernel(void (*kernel)(P...), const Api* api, const LaunchDesc* desc,
                  void* const* argv, ErrorInfo* error) {
  if (api->abi_version != kAbiVersion || api->stack_bytes != kStackBytes) {
    std::memset(error, 0, sizeof *error);
    error->kind = kAbiMismatch;
    std::snprintf(error->message, sizeof error->message,
                  "kernel module (ABI %u) and emulator runtime (ABI %u) do not match",
                  kAbiVersion, api->abi_version);
    return error->kind;
  }
  Closure<P...> c{kernel, load_args<P...>(argv, std::index_sequence_for<P...>{})};
  return api->launch(api, desc, &run_closure<P...>, &c, error);
}

// --- atomics (real atomics: blocks run in parallel on several OS threads) --------------------

// In instrumented builds each atomic is an out-of-line function that reports itself (WB_EMU_NOTE)
// with its caller's address, so the access is attributed to the kernel line and counted once.
#define WB_EMU_ATOMIC_INT(T)                                                                 \
  WB_EMU_MEMFN T atomicAdd(T* p, T v) {                                                      \
    WB_EMU_NOTE(p, kAtomic);                                                                 \
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                          \
  WB_EMU_MEMFN T atomicSub(T* p, T v) {                                                      \
    WB_EMU_NOTE(p, kAtomic);                                                                 \
    return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                          \
  WB_EMU_MEMFN T atomicExch(T* p, T v) {                                                     \
    WB_EMU_NOTE(p, kAtomic);                                                                 \
    return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);                                      \
  }                                                                                          \
  WB_EMU_MEMFN T atomicAnd(T* p, T v) {                                                      \
    WB_EMU_NOTE(p, kAtomic);                                                                 \
    return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                          \
  WB_EMU_MEMFN T atomicOr(T* p, T v) {                                                       \
    WB_EMU_NOTE(p, kAtomic);                                                                 \
    return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);                                        \
  }                                                                                          \
  WB_EMU_MEMFN T atomicXor(T* p, T v) {                                                      \
    WB_EMU_NOTE(p, kAtomic);                                                                 \
    return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                          \
  WB_EMU_MEMFN T atomicCAS(T* p, T compare, T v) {                                           \
    WB_EMU_NOTE(p, kAtomic);                                                                 \
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);  \
    return compare;                                                                          \
  }                                                                                          \
  WB_EMU_MEMFN T atomicMin(T* p, T v) {                                                      \
    WB_EMU_NOTE(p, kAtomic);                                                                 \
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                            \
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST,       \
                                                   __ATOMIC_SEQ_CST)) {                      \
    }                                                                                        \
    return old;                                                                              \
  }                                                                                          \
  WB_EMU_MEMFN T atomicMax(T* p, T v) {                                                      \
    WB_EMU_NOTE(p, kAtomic);                                                                 \
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                            \
    while (v > old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST,       \
                                                   __ATOMIC_SEQ_CST)) {                      \
    }                                                                                        \
    return old;                                                                              \
  }

}  // namespace wb_emu

// Atomics, intrinsics and vector types live at global scope, where kernels expect them.
WB_EMU_ATOMIC_INT(int)
WB_EMU_ATOMIC_INT(unsigned int)
WB_EMU_ATOMIC_INT(long long)
WB_EMU_ATOMIC_INT(unsigned long long)
#undef WB_EMU_ATOMIC_INT

// Floating-point atomics through compare-and-swap on the value's bits.
template <class T, class F>
inline T wb_emu_atomic_update(T* p, F update) {
  T old;
  __atomic_load(p, &old, __ATOMIC_SEQ_CST);
  T desired = update(old);
  while (!__atomic_compare_exchange(p, &old, &desired, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
    desired = update(old);
  return old;
}
WB_EMU_MEMFN float atomicAdd(float* p, float v) {
  WB_EMU_NOTE(p, kAtomic);
  return wb_emu_atomic_update(p, [v](float o) { return o + v; });
}
WB_EMU_MEMFN double atomicAdd(double* p, double v) {
  WB_EMU_NOTE(p, kAtomic);
  return wb_emu_atomic_update(p, [v](double o) { return o + v; });
}
WB_EMU_MEMFN float atomicSub(float* p, float v) {
  WB_EMU_NOTE(p, kAtomic);
  return wb_emu_atomic_update(p, [v](float o) { return o - v; });
}
WB_EMU_MEMFN float atomicMax(float* p, float v) {
  WB_EMU_NOTE(p, kAtomic);
  return wb_emu_atomic_update(p, [v](float o) { return v > o ? v : o; });
}
WB_EMU_MEMFN float atomicMin(float* p, float v) {
  WB_EMU_NOTE(p, kAtomic);
  return wb_emu_atomic_update(p, [v](float o) { return v < o ? v : o; });
}
WB_EMU_MEMFN double atomicMax(double* p, double v) {
  WB_EMU_NOTE(p, kAtomic);
  return wb_emu_atomic_update(p, [v](double o) { return v > o ? v : o; });
}
WB_EMU_MEMFN double atomicMin(double* p, double v) {
  WB_EMU_NOTE(p, kAtomic);
  return wb_emu_atomic_update(p, [v](double o) { return v < o ? v : o; });
}
WB_EMU_MEMFN float atomicExch(float* p, float v) {
  WB_EMU_NOTE(p, kAtomic);
  float old;
  __atomic_exchange(p, &v, &old, __ATOMIC_SEQ_CST);
  return old;
}
WB_EMU_MEMFN unsigned int atomicInc(unsigned int* p, unsigned int limit) {
  WB_EMU_NOTE(p, kAtomic);
  return wb_emu_atomic_update(p, [limit](unsigned int o) { return o >= limit ? 0u : o + 1; });
}
WB_EMU_MEMFN unsigned int atomicDec(unsigned int* p, unsigned int limit) {
  WB_EMU_NOTE(p, kAtomic);
  return wb_emu_atomic_update(
      p, [limit](unsigned int o) { return (o == 0 || o > limit) ? limit : o - 1; });
}

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// --- math intrinsics ---------------------------------------------------------------------------
// The fast GPU variants (__expf, __fdividef, ...) are computed exactly here: tests compare the
// emulator against NumPy with tolerances that cover the GPU's approximations.

inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { sincosf(x, s, c); }
inline float __fdividef(float a, float b) { return a / b; }
inline float fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_ru(float x) { return static_cast<int>(ceilf(x)); }
inline int __float2int_rd(float x) { return static_cast<int>(floorf(x)); }
inline unsigned int __float2uint_rn(float x) { return static_cast<unsigned int>(nearbyintf(x)); }
inline unsigned int __float2uint_rz(float x) { return static_cast<unsigned int>(x); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned int x) { return static_cast<float>(x); }
inline int __float_as_int(float x) {
  int i;
  std::memcpy(&i, &x, 4);
  return i;
}
inline unsigned int __float_as_uint(float x) {
  unsigned int i;
  std::memcpy(&i, &x, 4);
  return i;
}
inline float __int_as_float(int i) {
  float x;
  std::memcpy(&x, &i, 4);
  return x;
}
inline float __uint_as_float(unsigned int i) {
  float x;
  std::memcpy(&x, &i, 4);
  return x;
}
inline long long __double_as_longlong(double x) {
  long long i;
  std::memcpy(&i, &x, 8);
  return i;
}
inline double __longlong_as_double(long long i) {
  double x;
  std::memcpy(&x, &i, 8);
  return x;
}

inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
  return (static_cast<unsigned long long>(__brev(static_cast<unsigned int>(x))) << 32) |
         __brev(static_cast<unsigned int>(x >> 32));
}
inline int __mulhi(int a, int b) { return static_cast<int>((static_cast<long long>(a) * b) >> 32); }
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline long long __mul64hi(long long a, long long b) {
  return static_cast<long long>((static_cast<__int128>(a) * b) >> 64);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __mul24(int a, int b) { return ((a << 8) >> 8) * ((b << 8) >> 8); }
inline unsigned int __umul24(unsigned int a, unsigned int b) {
  return (a & 0xFFFFFFu) * (b & 0xFFFFFFu);
}
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
  const unsigned long long v = (static_cast<unsigned long long>(y) << 32) | x;
  unsigned int r = 0;
  for (int i = 0; i < 4; ++i) r |= ((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFFu) << (8 * i);
  return r;
}
inline unsigned int __funnelshift_l(unsigned int lo, unsigned int hi, unsigned int shift) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned int>((v << (shift & 31)) >> 32);
}
inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, unsigned int shift) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned int>(v >> (shift & 31));
}

template <class T>
WB_EMU_MEMFN T __ldg(const T* p) {
  WB_EMU_NOTE(p, kLoad);
  return *p;
}

inline long long clock64() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<long long>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}
inline long long wall_clock64() { return clock64(); }

// CUDA's device min/max accept mixed arithmetic types and return their common type.
template <class A, class B,
          class = typename std::enable_if<std::is_arithmetic<A>::value &&
                                          std::is_arithmetic<B>::value>::type>
inline typename std::common_type<A, B>::type min(A a, B b) {
  using C = typename std::common_type<A, B>::type;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B,
          class = typename std::enable_if<std::is_arithmetic<A>::value &&
                                          std::is_arithmetic<B>::value>::type>
inline typename std::common_type<A, B>::type max(A a, B b) {
  using C = typename std::common_type<A, B>::type;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// --- vector types (same sizes and alignments as CUDA's, no operators: CUDA has none) ----------

#define WB_EMU_VEC(name, T, A2, A4)                                     \
  struct alignas(A2) name##2 {                                          \
    T x, y;                                                             \
  };                                                                    \
  struct alignas(A4) name##4 {                                          \
    T x, y, z, w;                                                       \
  };                                                                    \
  inline name##2 make_##name##2(T x, T y) { return name##2{x, y}; }     \
  inline name##4 make_##name##4(T x, T y, T z, T w) { return name##4{x, y, z, w}; }
#define WB_EMU_VEC3(name, T)                                            \
  struct name##3 {                                                      \
    T x, y, z;                                                          \
  };                                                                    \
  inline name##3 make_##name##3(T x, T y, T z) { return name##3{x, y, z}; }

WB_EMU_VEC(char, signed char, 2, 4)
WB_EMU_VEC(uchar, unsigned char, 2, 4)
WB_EMU_VEC(short, short, 4, 8)
WB_EMU_VEC(ushort, unsigned short, 4, 8)
WB_EMU_VEC(int, int, 8, 16)
WB_EMU_VEC(uint, unsigned int, 8, 16)
WB_EMU_VEC(longlong, long long, 16, 16)
WB_EMU_VEC(ulonglong, unsigned long long, 16, 16)
WB_EMU_VEC(float, float, 8, 16)
WB_EMU_VEC(double, double, 16, 16)
WB_EMU_VEC3(char, signed char)
WB_EMU_VEC3(uchar, unsigned char)
WB_EMU_VEC3(short, short)
WB_EMU_VEC3(ushort, unsigned short)
WB_EMU_VEC3(int, int)
WB_EMU_VEC3(float, float)
WB_EMU_VEC3(double, double)
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }
#undef WB_EMU_VEC
#undef WB_EMU_VEC3

#define WB_EMU_EXPORT extern "C" __attribute__((visibility("default")))

#if defined(WB_EMU_INSTRUMENTED)
// SanitizerCoverage's callbacks: `a` is the address about to be read or written.
#define WB_EMU_COV(N, T)                                                                     \
  extern "C" __attribute__((noinline)) void __sanitizer_cov_load##N(T* a) {                 \
    ::wb_emu::access(a, N, ::wb_emu::kLoad, __builtin_return_address(0));                    \
  }                                                                                          \
  extern "C" __attribute__((noinline)) void __sanitizer_cov_store##N(T* a) {                \
    ::wb_emu::access(a, N, ::wb_emu::kStore, __builtin_return_address(0));                   \
  }
WB_EMU_COV(1, std::uint8_t)
WB_EMU_COV(2, std::uint16_t)
WB_EMU_COV(4, std::uint32_t)
WB_EMU_COV(8, std::uint64_t)
WB_EMU_COV(16, __int128)
#undef WB_EMU_COV

namespace wb_emu {
// Every `__shared__` variable is a thread_local of this module (and nothing else is): the
// module's TLS block on the calling OS thread is the static shared memory of the block it runs.
// The anchor makes sure the block exists and lets us find it.
static thread_local char tls_anchor;

struct RangesQuery {
  std::uintptr_t anchor;
  ModuleRanges* out;
};

inline int ranges_of_module(dl_phdr_info* info, std::size_t, void* data) {
  auto* q = static_cast<RangesQuery*>(data);
  const auto tls = reinterpret_cast<std::uintptr_t>(info->dlpi_tls_data);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_TLS && tls != 0 && q->anchor >= tls && q->anchor < tls + ph.p_memsz) {
      q->out->tls_lo = tls;
      q->out->tls_size = ph.p_memsz;
      std::uintptr_t lo = ~std::uintptr_t(0), hi = 0;
      for (int j = 0; j < info->dlpi_phnum; ++j) {
        const ElfW(Phdr)& seg = info->dlpi_phdr[j];
        if (seg.p_type != PT_LOAD) continue;
        const std::uintptr_t a = info->dlpi_addr + seg.p_vaddr;
        if (a < lo) lo = a;
        if (a + seg.p_memsz > hi) hi = a + seg.p_memsz;
      }
      q->out->image_lo = lo;
      q->out->image_hi = hi;
      return 1;
    }
  }
  return 0;
}
}  // namespace wb_emu

WB_EMU_EXPORT void wb_emu_module_ranges(::wb_emu::ModuleRanges* out) {
  *out = ::wb_emu::ModuleRanges{0, 0, 0, 0};
  volatile char* anchor = &::wb_emu::tls_anchor;
  *anchor = 0;  // allocates this thread's TLS block of the module
  ::wb_emu::RangesQuery q{reinterpret_cast<std::uintptr_t>(anchor), out};
  dl_iterate_phdr(::wb_emu::ranges_of_module, &q);
}
#endif  // WB_EMU_INSTRUMENTED

#endif  // !WB_EMU_DISCOVERY

// --- qualifiers and built-ins (macros: also needed by the discovery pass) ----------------------

#define __global__ WB_EMU_GLOBAL_MARK
#define __device__
#define __host__
#define __shared__ static thread_local
#define __constant__
#define __managed__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

#define threadIdx (::wb_emu::self()->thread_idx)
#define blockIdx (::wb_emu::self()->block_idx)
#define blockDim (::wb_emu::self()->block_dim)
#define gridDim (::wb_emu::self()->grid_dim)
#define warpSize (::wb_emu::self()->warp_size)
#define __lane_id() (::wb_emu::self()->lane)

// Each intrinsic passes (what, __FILE__, __LINE__, __COUNTER__): a description for messages and
// the site id that barriers and collectives are matched by.
#define WB_EMU_SITE(what) what, __FILE__, __LINE__, __COUNTER__
#define __syncthreads() \
  ((void)::wb_emu::block_sync(WB_EMU_SITE("__syncthreads()"), ::wb_emu::kBlockPlain, 1))
#define __syncthreads_count(p) \
  ::wb_emu::block_sync(WB_EMU_SITE("__syncthreads_count()"), ::wb_emu::kBlockCount, (p))
#define __syncthreads_and(p) \
  ::wb_emu::block_sync(WB_EMU_SITE("__syncthreads_and()"), ::wb_emu::kBlockAnd, (p))
#define __syncthreads_or(p) \
  ::wb_emu::block_sync(WB_EMU_SITE("__syncthreads_or()"), ::wb_emu::kBlockOr, (p))
#define __syncwarp(...) ::wb_emu::syncwarp(__FILE__, __LINE__, __COUNTER__, ##__VA_ARGS__)

// CUDA forms (explicit lane mask) and HIP's maskless forms (every lane still alive takes part).
#define WB_EMU_SHFL(what, mask, flags, mode, ...) \
  ::wb_emu::shfl(WB_EMU_SITE(what), (mask), flags, ::wb_emu::mode, __VA_ARGS__)
#define __shfl_sync(mask, ...) WB_EMU_SHFL("__shfl_sync", mask, 0, kShflIdx, __VA_ARGS__)
#define __shfl_up_sync(mask, ...) WB_EMU_SHFL("__shfl_up_sync", mask, 0, kShflUp, __VA_ARGS__)
#define __shfl_down_sync(mask, ...) \
  WB_EMU_SHFL("__shfl_down_sync", mask, 0, kShflDown, __VA_ARGS__)
#define __shfl_xor_sync(mask, ...) WB_EMU_SHFL("__shfl_xor_sync", mask, 0, kShflXor, __VA_ARGS__)
#define __shfl(...) WB_EMU_SHFL("__shfl", 0, ::wb_emu::kWarpLegacy, kShflIdx, __VA_ARGS__)
#define __shfl_up(...) WB_EMU_SHFL("__shfl_up", 0, ::wb_emu::kWarpLegacy, kShflUp, __VA_ARGS__)
#define __shfl_down(...) \
  WB_EMU_SHFL("__shfl_down", 0, ::wb_emu::kWarpLegacy, kShflDown, __VA_ARGS__)
#define __shfl_xor(...) WB_EMU_SHFL("__shfl_xor", 0, ::wb_emu::kWarpLegacy, kShflXor, __VA_ARGS__)

#define WB_EMU_VOTE(what, mask, flags, p) ::wb_emu::vote(WB_EMU_SITE(what), (mask), flags, (p))
#define WB_EMU_ALL(vote_expr) ([](::wb_emu::Vote v) { return v.ballot == v.members; }(vote_expr))
#define __ballot_sync(mask, p) (WB_EMU_VOTE("__ballot_sync", mask, 0, p).ballot)
#define __any_sync(mask, p) (WB_EMU_VOTE("__any_sync", mask, 0, p).ballot != 0)
#define __all_sync(mask, p) WB_EMU_ALL(WB_EMU_VOTE("__all_sync", mask, 0, p))
#define __ballot(p) (WB_EMU_VOTE("__ballot", 0, ::wb_emu::kWarpLegacy, p).ballot)
#define __any(p) (WB_EMU_VOTE("__any", 0, ::wb_emu::kWarpLegacy, p).ballot != 0)
#define __all(p) WB_EMU_ALL(WB_EMU_VOTE("__all", 0, ::wb_emu::kWarpLegacy, p))
#define __activemask() (::wb_emu::self()->api->active_mask(::wb_emu::self()))

#define __trap() ::wb_emu::trap("__trap()", __FILE__, __LINE__)
#define __builtin_trap() ::wb_emu::trap("__builtin_trap()", __FILE__, __LINE__)
#define abort() ::wb_emu::trap("abort()", __FILE__, __LINE__)
#undef assert
#if defined(NDEBUG)
#define assert(e) ((void)0)
#else
#define assert(e) ((e) ? (void)0 : ::wb_emu::trap("assert(" #e ") failed", __FILE__, __LINE__))
#endif

// Integer dot-product builtins, with the exact semantics of the instructions they name:
//   __builtin_amdgcn_sdot4(a, b, c, clamp)  v_dot4_i32_i8 (AMD, gfx906+ / gfx908+ / RDNA2):
//       c + the four products of the signed bytes of a and b; clamp=false wraps modulo 2^32,
//       clamp=true saturates to the int32 range
//   __builtin_amdgcn_udot4(a, b, c, clamp)  v_dot4_u32_u8: the same on unsigned bytes, uint32
//   __dp4a(a, b, c)                         CUDA sm_61+ (int: signed bytes; unsigned: unsigned
//                                           bytes), wrapping: PTX dp4a is modulo 2^32
// The sum is formed exactly in 64 bits, then wrapped or saturated once, as the hardware does.
namespace wb_emu {
inline int64_t dot4_exact(uint32_t a, uint32_t b, bool is_signed) {
  int64_t s = 0;
  for (int k = 0; k < 32; k += 8) {
    const int64_t x = is_signed ? (int64_t)(int8_t)(a >> k) : (int64_t)(uint8_t)(a >> k);
    const int64_t y = is_signed ? (int64_t)(int8_t)(b >> k) : (int64_t)(uint8_t)(b >> k);
    s += x * y;
  }
  return s;
}
inline int sdot4(int a, int b, int c, bool clamp) {
  const int64_t s = dot4_exact((uint32_t)a, (uint32_t)b, true) + (int64_t)c;
  if (clamp) return s > INT32_MAX ? INT32_MAX : s < INT32_MIN ? INT32_MIN : (int)s;
  return (int)(uint32_t)(uint64_t)s;
}
inline unsigned udot4(unsigned a, unsigned b, unsigned c, bool clamp) {
  const int64_t s = dot4_exact(a, b, false) + (int64_t)c;
  if (clamp) return s > (int64_t)UINT32_MAX ? UINT32_MAX : (unsigned)s;
  return (unsigned)(uint64_t)s;
}
inline int dp4a(int a, int b, int c) { return sdot4(a, b, c, false); }
inline unsigned dp4a(unsigned a, unsigned b, unsigned c) { return udot4(a, b, c, false); }
}  // namespace wb_emu
#define __builtin_amdgcn_sdot4(a, b, c, clamp) ::wb_emu::sdot4((a), (b), (c), (clamp))
#define __builtin_amdgcn_udot4(a, b, c, clamp) ::wb_emu::udot4((a), (b), (c), (clamp))
#define __dp4a(a, b, c) ::wb_emu::dp4a((a), (b), (c))

// Matrix fused multiply-add (MFMA) builtins, with the lane layouts of AMD's documentation.
#include "wb_emu_mfma.h"

#endif  // WB_EMU_H
