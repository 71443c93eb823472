// The contract between emulated kernel modules and the emulator runtime.
//
// A kernel module (the user's .hip source compiled by the host C++ compiler against wb_emu.h) and
// the runtime library (wb_emu_runtime.cpp: fibers, scheduler, thread pool, fault handling) are
// separate shared objects. They meet only through the plain structs below: Python loads the
// runtime, asks it for its `Api` table and hands that pointer to every launch. Keeping the
// runtime out of the kernel modules keeps kernel compiles fast (no Boost, no <thread>), lets
// one kernel module run on either fiber implementation, and leaves one stack pool and one set
// of signal handlers per process.
//
// Any change to these layouts must bump kAbiVersion; Python hashes this file into every cache key
// and the launch trampoline refuses a runtime with a different version.
#ifndef WB_EMU_ABI_H
#define WB_EMU_ABI_H

#include <cstddef>
#include <cstdint>

// CUDA's built-in index types. Defined at global scope because kernels name them unqualified.
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

namespace wb_emu {

constexpr std::uint32_t kAbiVersion = 3;

// Every fiber owns one region of kStackBytes, aligned to kStackBytes, with its ThreadCtx near the
// lowest address. Kernel code finds its own ThreadCtx by masking its frame address, so reading
// threadIdx costs a few instructions and needs no thread-local storage. Must be a power of two.
constexpr std::size_t kStackBytes = std::size_t(256) * 1024;

// The ThreadCtx sits `ctx_offset(base)` bytes into its region, a different cache line for each of
// kColours consecutive regions: at identical offsets, the records of a block's threads would all
// map to the same cache sets and evict each other on every fiber switch.
constexpr std::size_t kColours = 256;
constexpr std::uintptr_t ctx_offset(std::uintptr_t base) {
  return (base / kStackBytes) % kColours * 64;
}

constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kMaxWarpSize = 64;
constexpr int kMinWarpSize = 32;
constexpr int kMaxWarpsPerBlock = kMaxThreadsPerBlock / kMinWarpSize;
constexpr std::uint32_t kValueBytes = 16;  // the largest value one warp shuffle can carry

struct Api;

// What kernel code sees of its thread (the first member of the runtime's fiber record).
struct ThreadCtx {
  const Api* api;
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  int warp_size;
  int lane;    // linear thread index % warp_size
  int warp;    // linear thread index / warp_size
  int linear;  // x + y * blockDim.x + z * blockDim.x * blockDim.y
  unsigned char* dynamic_shared;
};

// Warp collectives. The calling lane hands in its value and, for shuffles, the lane it wants to
// read; the last lane to arrive computes every member's result while all values are still in
// place, so no lane can overwrite a value another lane has yet to read.
enum WarpOp : int {
  kWarpSync = 0,    // __syncwarp: no data
  kWarpShfl = 1,    // result = value of lane `src` if it took part, else the caller's own value
  kWarpBallot = 2,  // result bytes 0-7: ballot of (value byte 0 != 0); bytes 8-15: member mask
};

// Flags of a warp collective.
enum WarpFlags : int {
  kWarpLegacy = 1,  // maskless HIP form (__shfl_xor, __ballot): members are all lanes still alive
};

// Barrier flavours of __syncthreads*().
enum BlockOp : int { kBlockPlain = 0, kBlockCount = 1, kBlockAnd = 2, kBlockOr = 3 };

// --- instrumented runs (tools and counters; see wb_emu_instr.h) ------------------------------

// What an instrumented access does (Api::access).
enum AccessOp : int { kLoad = 0, kStore = 1, kAtomic = 2 };

enum InstrFlags : std::uint32_t {
  kMemcheck = 1,
  kRacecheck = 2,
  kInitcheck = 4,
  kSynccheck = 8,
  kCounters = 16,
};

// One pointer argument: the kernel may touch [base, base + size). [lo, hi) is the region around it
// that is the emulator's own (a staged copy with poisoned guard zones), equal to the array's bytes
// when the array is passed in place.
struct Buffer {
  std::uintptr_t base;
  std::size_t size;
  std::uintptr_t lo;
  std::uintptr_t hi;
  int arg;
};

// The module side of an instrumented launch: where this OS thread's copy of the module's
// `__shared__` (thread_local) variables lies, and the module's own loaded image (constant tables).
struct ModuleRanges {
  std::uintptr_t tls_lo;
  std::size_t tls_size;
  std::uintptr_t image_lo;
  std::uintptr_t image_hi;
};

struct Instr {
  std::uint32_t flags;  // InstrFlags
  std::uint32_t segment_bytes;
  std::uint32_t banks;
  std::uint32_t bank_bytes;
  const Buffer* buffers;
  int nbuffers;
  void (*module_ranges)(ModuleRanges* out);  // called on each OS thread that runs blocks
  void* results;  // the runtime's result sink (wb_emu_results_new)
};

enum Schedule : std::uint32_t { kScheduleFixed = 0, kScheduleRandom = 1 };

struct LaunchDesc {
  dim3 grid;
  dim3 block;
  std::uint32_t warp_size;
  std::uint32_t workers;  // OS threads that run blocks (the calling thread is one of them)
  std::size_t shared_bytes;
  const char* kernel_name;
  std::uint32_t schedule;  // Schedule: the order in which a block's runnable fibers run
  std::uint64_t seed;      // for kScheduleRandom
  const Instr* instr;      // null for a plain launch
};

enum ErrorKind : int {
  kOk = 0,
  kDeadlock = 1,    // threads wait at a barrier or warp collective that can never complete
  kDivergence = 2,  // threads of one barrier/collective reached different call sites or masks
  kTrap = 3,        // __trap(), assert(), abort() in kernel code
  kFault = 4,       // a signal (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT) while running kernel code
  kBadLaunch = 5,   // geometry or warp size the emulator cannot run
  kResource = 6,    // out of memory for stacks or shared memory
  kAbiMismatch = 7,
  kStopped = 8,     // an instrumented run stopped a write far outside any buffer
};

struct ErrorInfo {
  int kind;
  int has_thread;  // thread is meaningful (a trap or fault pins one thread)
  uint3 block;
  uint3 thread;
  char message[4096];
};

struct Api {
  std::uint32_t abi_version;
  std::uint32_t stack_bytes;
  const char* fiber_name;  // "fcontext" or "ucontext": which context switch this runtime uses
  int (*launch)(const Api* api, const LaunchDesc* desc, void (*body)(void*), void* closure,
                ErrorInfo* error);
  // `site` identifies the call (a __COUNTER__ value unique to each expansion of the intrinsic's
  // macro); `what`, `file` and `line` only describe it in messages.
  int (*block_sync)(ThreadCtx* self, const char* what, const char* file, int line, int site,
                    int op, int predicate);
  const unsigned char* (*warp_collective)(ThreadCtx* self, const char* what, const char* file,
                                          int line, int site, std::uint64_t mask, int flags,
                                          int op, int src, const void* value,
                                          std::uint32_t nbytes);
  std::uint64_t (*active_mask)(ThreadCtx* self);
  void (*trap)(ThreadCtx* self, const char* what, const char* file, int line);  // never returns
  // Instrumented modules call this before every load, store and atomic of kernel code; `pc` is
  // the return address into the accessing code (its line comes from the module's line table).
  void (*access)(ThreadCtx* self, const void* addr, std::uint32_t size, int op, const void* pc);
};

}  // namespace wb_emu

#endif  // WB_EMU_ABI_H
