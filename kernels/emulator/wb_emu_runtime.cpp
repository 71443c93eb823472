// The emulator runtime: runs a kernel's blocks on the CPU, every GPU thread a fiber.
//
// Compiled once per process cache (not per kernel) into its own shared object, with exactly one
// of WB_EMU_FIBER_FCONTEXT (Boost.Context's hand-written assembly switch, ~20 ns) or
// WB_EMU_FIBER_UCONTEXT (glibc swapcontext: portable, but it saves the signal mask with a
// system call, ~40x slower). Kernel modules reach it only through the `Api` table (wb_emu_abi.h).
//
// Execution model:
// - A block runs on one OS thread; its threads are fibers scheduled round-robin. A fiber runs
//   until it waits at __syncthreads() or a warp collective, or finishes; the last thread to
//   arrive releases the others and carries on without a switch.
// - Blocks are spread over a small pool of OS threads (the calling thread is one of them). Each
//   OS thread runs its blocks one after another, so `__shared__` (= `static thread_local`) is
//   shared by the fibers of the block that thread is running, and by no other block.
// - When no fiber of a block can run but some have not finished, the block has deadlocked: the
//   runtime stops and reports which threads wait where and which have exited.
// - A signal raised by kernel code (bad pointer, division by zero, abort) is caught and turned
//   into an error naming the block and thread; the launch is abandoned, Python keeps running.
#include "wb_emu_abi.h"

#include <dlfcn.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#if defined(WB_EMU_FIBER_FCONTEXT)
#include <boost/context/detail/fcontext.hpp>
#elif defined(WB_EMU_FIBER_UCONTEXT)
#include <ucontext.h>
#else
#error "define WB_EMU_FIBER_FCONTEXT or WB_EMU_FIBER_UCONTEXT"
#endif

#define WB_EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace wb_emu {
namespace {

#if defined(WB_EMU_FIBER_FCONTEXT)
constexpr const char* kFiberName = "fcontext";
namespace bctx = boost::context::detail;

// A suspended execution context. jump_fcontext hands the resumed side the context it left, so
// every switch passes a pointer to the leaving side's Ctx and the arriving side stores it there.
struct Ctx {
  bctx::fcontext_t fctx = nullptr;
};

inline void switch_ctx(Ctx* from, Ctx* to) {
  bctx::transfer_t t = bctx::jump_fcontext(to->fctx, from);
  static_cast<Ctx*>(t.data)->fctx = t.fctx;
}
#else
constexpr const char* kFiberName = "ucontext";

struct Ctx {
  ucontext_t uc;
};

inline void switch_ctx(Ctx* from, Ctx* to) { swapcontext(&from->uc, &to->uc); }
#endif

enum class State : unsigned char { Runnable, AtBarrier, AtWarp, Done };

struct Block;

// One GPU thread. Lives in the first pages of its stack region, at ctx_offset(base); `pub` must
// stay the first member because kernel code finds it from its frame address.
struct Fiber {
  ThreadCtx pub;
  Ctx ctx;
  Block* block;
  const char* what;  // where the fiber waits, for diagnostics
  const char* file;
  int line;
  int site;  // which call it waits at (see Api::block_sync)
  char* stack_lo;  // lowest usable stack byte (just above the guard)
  char* stack_hi;  // initial stack pointer
  char* guard;     // the PROT_NONE zone below the stack: a fault there is a stack overflow
};

// A warp collective in progress: the lanes named by `expect` (or, for the maskless HIP forms,
// every lane still alive) must all arrive before any proceeds.
struct Group {
  bool active;
  bool mismatch;  // members arrived at different call sites or with different operations
  int flags;
  int op;
  std::uint64_t expect;
  std::uint64_t arrived;
  const char* what;
  const char* file;
  int line;
  int site;
};

struct Warp {
  std::uint32_t sync_gen;    // completed warp collectives (orders lanes for racecheck)
  std::uint64_t exist_mask;  // lanes that exist (the last warp of a block may be partial)
  std::uint64_t live_mask;   // lanes that have not finished
  int ngroups;
  Group groups[kMaxWarpSize];
  signed char lane_group[kMaxWarpSize];
  int src[kMaxWarpSize];
  alignas(16) unsigned char value[kMaxWarpSize][kValueBytes];
  alignas(16) unsigned char result[kMaxWarpSize][kValueBytes];
};

struct Job;
struct Worker;
class InstrWorker;
void destroy_instr(InstrWorker* iw);

struct Block {
  Worker* worker;
  Job* job;
  Fiber* fibers[kMaxThreadsPerBlock];
  // Kept apart from the Fiber records so that finding the next runnable thread scans one
  // contiguous array instead of touching a cache line per thread.
  State state[kMaxThreadsPerBlock];
  int n;
  int runnable;
  int live;
  uint3 idx;
  // __syncthreads(): double-buffered accumulator for the _count/_and/_or forms, so the first
  // thread into the next barrier cannot clobber a result a slow thread has yet to read.
  int bar_arrived;
  unsigned bar_gen;
  int bar_acc[2];
  int bar_op;
  bool bar_mismatch;
  int bar_site;
  const char* bar_file;  // where the first thread of the current barrier waits
  int bar_line;
  const char* mis_file;  // and the first thread that reached a different one
  int mis_line;
  bool random;  // kScheduleRandom: the next fiber is drawn, not taken round-robin
  std::uint64_t rng;
  bool failed;
  Ctx main;  // the OS thread's own context, resumed when the block finishes or gets stuck
  int nwarps;
  Warp warps[kMaxWarpsPerBlock];
};

struct Job {
  const Api* api;
  const LaunchDesc* desc;
  void (*body)(void*);
  void* closure;
  std::uint64_t nblocks;
  std::atomic<std::uint64_t> next{0};
  std::atomic<bool> abort{false};
  std::mutex error_mutex;
  ErrorInfo* error;
};

// --- fiber stacks ---------------------------------------------------------------------------

// A frame with a big local array can step over a one-page guard into the Fiber record, so the
// guard is 64 KiB (address space only).
constexpr std::size_t kGuardBytes = 64 * 1024;

std::size_t page_size() {
  static const std::size_t p = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

std::mutex g_fiber_mutex;
std::vector<Fiber*> g_free_fibers;  // regions returned by exited threads, reused before mmap

// A kStackBytes region aligned to kStackBytes: [header with the Fiber record | guard |
// stack ... top]. MAP_NORESERVE + lazy paging: 1024 threads x 256 KiB is address space, not
// memory.
Fiber* new_fiber() {
  const std::size_t S = kStackBytes;
  const std::size_t page = page_size();
  void* raw = mmap(nullptr, 2 * S, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  std::uintptr_t lo = reinterpret_cast<std::uintptr_t>(raw);
  std::uintptr_t base = (lo + S - 1) & ~(S - 1);
  if (base > lo) munmap(raw, base - lo);
  std::uintptr_t end = lo + 2 * S;
  if (end > base + S) munmap(reinterpret_cast<void*>(base + S), end - (base + S));
  const std::uintptr_t offset = ctx_offset(base);
  const std::size_t header = (kColours * 64 + sizeof(Fiber) + page - 1) / page * page;
  char* guard = reinterpret_cast<char*>(base + header);
  mprotect(guard, kGuardBytes, PROT_NONE);
  Fiber* f = new (reinterpret_cast<void*>(base + offset)) Fiber();
  f->guard = guard;
  f->stack_lo = guard + kGuardBytes;
  // Stagger the stack tops the same way (see ctx_offset).
  f->stack_hi = reinterpret_cast<char*>(base + S - 64 - offset);
  return f;
}

// --- workers (OS threads that run blocks) ----------------------------------------------------

struct Worker {
  std::vector<Fiber*> fibers;
  std::unique_ptr<Block> block{new Block()};
  unsigned char* shared = nullptr;
  std::size_t shared_cap = 0;
  Ctx dead;  // receives the context of fibers that finished and will never be resumed
  sigjmp_buf jmp;
  volatile sig_atomic_t in_kernel = 0;
  Fiber* volatile current = nullptr;
  volatile int fault_signal = 0;
  void* volatile fault_addr = nullptr;
  void* altstack = nullptr;
  int registry_slot = -1;
  InstrWorker* instr = nullptr;  // created on this thread's first instrumented launch
#if defined(WB_EMU_FIBER_UCONTEXT)
  ucontext_t tmpl;  // captured once; copied into each fresh fiber (getcontext is a syscall)
  bool tmpl_ready = false;
#endif

  Worker();
  ~Worker();
  bool ensure(int nthreads, std::size_t shared_bytes);
};

// The signal handler must find the Worker of the faulting thread without touching thread-local
// storage (a first TLS access in a dlopen'ed library may call malloc), so workers register here.
constexpr int kRegistrySize = 512;
struct RegistrySlot {
  std::atomic<unsigned long> thread{0};
  std::atomic<Worker*> worker{nullptr};
};
RegistrySlot g_registry[kRegistrySize];

Worker::Worker() {
  const unsigned long me = static_cast<unsigned long>(pthread_self());
  for (int i = 0; i < kRegistrySize; ++i) {
    unsigned long expected = 0;
    if (g_registry[i].thread.compare_exchange_strong(expected, me)) {
      g_registry[i].worker.store(this);
      registry_slot = i;
      break;
    }
  }
  // Faults must be handled on a separate stack: a fiber that overflowed has none left. Keep an
  // alternate stack the thread already has (Python's faulthandler installs one).
  stack_t current_ss;
  if (sigaltstack(nullptr, &current_ss) == 0 && (current_ss.ss_flags & SS_DISABLE)) {
    const std::size_t size = 64 * 1024;
    altstack = std::malloc(size);
    if (altstack != nullptr) {
      stack_t ss{};
      ss.ss_sp = altstack;
      ss.ss_size = size;
      sigaltstack(&ss, nullptr);
    }
  }
}

Worker::~Worker() {
  destroy_instr(instr);
  if (registry_slot >= 0) {
    g_registry[registry_slot].worker.store(nullptr);
    g_registry[registry_slot].thread.store(0);
  }
  if (altstack != nullptr) {
    stack_t ss{};
    ss.ss_flags = SS_DISABLE;
    sigaltstack(&ss, nullptr);
    std::free(altstack);
  }
  std::free(shared);
  std::lock_guard<std::mutex> lock(g_fiber_mutex);
  g_free_fibers.insert(g_free_fibers.end(), fibers.begin(), fibers.end());
}

bool Worker::ensure(int nthreads, std::size_t shared_bytes) {
  while (static_cast<int>(fibers.size()) < nthreads) {
    Fiber* f = nullptr;
    {
      std::lock_guard<std::mutex> lock(g_fiber_mutex);
      if (!g_free_fibers.empty()) {
        f = g_free_fibers.back();
        g_free_fibers.pop_back();
      }
    }
    if (f == nullptr) f = new_fiber();
    if (f == nullptr) return false;
    fibers.push_back(f);
  }
  if (shared_bytes > shared_cap) {
    std::free(shared);
    shared_cap = 0;
    shared = static_cast<unsigned char*>(std::aligned_alloc(64, (shared_bytes + 63) / 64 * 64));
    if (shared == nullptr) return false;
    shared_cap = shared_bytes;
  }
#if defined(WB_EMU_FIBER_UCONTEXT)
  if (!tmpl_ready) {
    getcontext(&tmpl);
    tmpl_ready = true;
  }
#endif
  return true;
}

Worker* this_worker() {
  thread_local std::unique_ptr<Worker> worker;
  if (!worker) worker.reset(new Worker());
  return worker.get();
}

Worker* registered_worker() {
  const unsigned long me = static_cast<unsigned long>(pthread_self());
  for (int i = 0; i < kRegistrySize; ++i) {
    if (g_registry[i].thread.load(std::memory_order_relaxed) == me)
      return g_registry[i].worker.load(std::memory_order_relaxed);
  }
  return nullptr;
}

// --- messages --------------------------------------------------------------------------------

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

std::string dims(uint3 v) { return format("(%u, %u, %u)", v.x, v.y, v.z); }

// A readable list of the threads in `ids` (sorted linear indices within the block).
std::string thread_list(const Block* b, const std::vector<int>& ids) {
  const dim3 bd = b->job->desc->block;
  const std::size_t n = ids.size();
  std::string out;
  if (n == static_cast<std::size_t>(b->n)) return format("all %d threads", b->n);
  if (bd.y == 1 && bd.z == 1) {
    const int step = n >= 3 ? ids[1] - ids[0] : 0;
    bool progression = step > 1;
    for (std::size_t i = 1; progression && i < n; ++i) progression = ids[i] - ids[i - 1] == step;
    if (progression) {
      out = format("threads %d, %d, %d, ..., %d", ids[0], ids[1], ids[2], ids[n - 1]);
    } else {
      out = n == 1 ? "thread " : "threads ";
      int runs = 0;
      for (std::size_t i = 0; i < n;) {
        std::size_t j = i;
        while (j + 1 < n && ids[j + 1] == ids[j] + 1) ++j;
        if (runs == 12) {
          out += ", ...";
          break;
        }
        if (runs > 0) out += ", ";
        out += j > i ? format("%d-%d", ids[i], ids[j]) : format("%d", ids[i]);
        ++runs;
        i = j + 1;
      }
    }
  } else {
    out = n == 1 ? "thread " : "threads ";
    for (std::size_t i = 0; i < n; ++i) {
      if (i == 8) {
        out += ", ...";
        break;
      }
      if (i > 0) out += ", ";
      out += dims(b->fibers[ids[i]]->pub.thread_idx);
    }
  }
  if (n > 1) out += format(" (%zu threads)", n);
  return out;
}

// Groups the threads (all, or those of one warp) by where they are: waiting at which call, or
// exited. One line per group.
std::string where_threads_are(const Block* b, int only_warp) {
  struct Entry {
    State state;
    const char* what;
    const char* file;
    int line;
    int site;
    std::vector<int> ids;
  };
  std::vector<Entry> entries;
  for (int i = 0; i < b->n; ++i) {
    const Fiber* f = b->fibers[i];
    if (only_warp >= 0 && f->pub.warp != only_warp) continue;
    Entry* e = nullptr;
    for (Entry& c : entries) {
      const State st = b->state[i];
      if (c.state == st && (st == State::Done || st == State::Runnable || c.site == f->site)) {
        e = &c;
        break;
      }
    }
    if (e == nullptr) {
      entries.push_back(Entry{b->state[i], f->what, f->file, f->line, f->site, {}});
      e = &entries.back();
    }
    e->ids.push_back(i);
  }
  std::string out;
  for (const Entry& e : entries) {
    out += "\n  ";
    switch (e.state) {
      case State::Done:
        out += "exited: ";
        break;
      case State::Runnable:
        out += "still running: ";
        break;
      default:
        out += format("waiting at %s (%s:%d): ", e.what, e.file, e.line);
    }
    out += thread_list(b, e.ids);
  }
  return out;
}

void set_error(Job* job, int kind, const uint3* block, const uint3* thread,
               const std::string& text) {
  std::lock_guard<std::mutex> lock(job->error_mutex);
  ErrorInfo* e = job->error;
  if (e->kind != kOk) return;  // the first error wins; later ones are usually its echoes
  e->kind = kind;
  if (block != nullptr) e->block = *block;
  e->has_thread = thread != nullptr;
  if (thread != nullptr) e->thread = *thread;
  std::snprintf(e->message, sizeof e->message, "%s", text.c_str());
}

[[noreturn]] void fail(Fiber* f, int kind, const std::string& text, bool pin_thread);
std::string kernel_prefix(const Block* b);

#include "wb_emu_instr.h"

void destroy_instr(InstrWorker* iw) { delete iw; }

// --- the scheduler ---------------------------------------------------------------------------

std::uint64_t next_random(Block* b) {  // xorshift64*
  b->rng ^= b->rng >> 12;
  b->rng ^= b->rng << 25;
  b->rng ^= b->rng >> 27;
  return b->rng * 0x2545F4914F6CDD1Dull;
}

Fiber* pick_next(Block* b, int from) {
  if (b->runnable == 0) return nullptr;
  if (b->random) from = static_cast<int>(next_random(b) % static_cast<std::uint64_t>(b->n));
  for (int i = from + 1; i < b->n; ++i)
    if (b->state[i] == State::Runnable) return b->fibers[i];
  for (int i = 0; i <= from; ++i)
    if (b->state[i] == State::Runnable) return b->fibers[i];
  return nullptr;
}

// The calling fiber has stopped being runnable: run the next runnable fiber of the block, or
// return to the OS thread's scheduler loop when there is none. Returns when resumed.
void yield(Fiber* f) {
  Block* b = f->block;
  Fiber* next = pick_next(b, f->pub.linear);
  b->worker->current = next;
  switch_ctx(&f->ctx, next != nullptr ? &next->ctx : &b->main);
}

// Leaves the fiber for good: to the next runnable one, or to the scheduler loop.
[[noreturn]] void leave(Fiber* f, Fiber* next) {
  Block* b = f->block;
  b->worker->current = next;
  switch_ctx(&b->worker->dead, next != nullptr ? &next->ctx : &b->main);
  __builtin_unreachable();
}

[[noreturn]] void fail(Fiber* f, int kind, const std::string& text, bool pin_thread) {
  Block* b = f->block;
  b->failed = true;
  set_error(b->job, kind, &b->idx, pin_thread ? &f->pub.thread_idx : nullptr, text);
  leave(f, nullptr);
}

std::string kernel_prefix(const Block* b) {
  return format("kernel %s, block %s", b->job->desc->kernel_name, dims(b->idx).c_str());
}

// Completes a warp collective: computes every member's result and makes the members runnable.
// `running` is the fiber executing this (a member that arrived last, or a lane that just
// finished); it keeps running.
void release_warp(Block* b, Warp* w, Group* g, Fiber* running) {
  if (g->mismatch) {
    const int warp = static_cast<int>(w - b->warps);
    fail(running, kDivergence,
         kernel_prefix(b) +
             format(": the lanes of warp %d reached different warp collectives (or the same one "
                    "with different masks); every lane named in the mask must make the same "
                    "call:",
                    warp) +
             where_threads_are(b, warp),
         false);
  }
  ++w->sync_gen;
  const std::uint64_t members = g->arrived;
  const int first = static_cast<int>(w - b->warps) * b->fibers[0]->pub.warp_size;
  if (g->op == kWarpShfl) {
    for (std::uint64_t m = members; m != 0; m &= m - 1) {
      const int lane = __builtin_ctzll(m);
      const int src = w->src[lane];
      const bool took_part = src >= 0 && src < kMaxWarpSize && ((members >> src) & 1);
      std::memcpy(w->result[lane], w->value[took_part ? src : lane], kValueBytes);
    }
  } else if (g->op == kWarpBallot) {
    std::uint64_t ballot = 0;
    for (std::uint64_t m = members; m != 0; m &= m - 1) {
      const int lane = __builtin_ctzll(m);
      if (w->value[lane][0] != 0) ballot |= std::uint64_t(1) << lane;
    }
    for (std::uint64_t m = members; m != 0; m &= m - 1) {
      const int lane = __builtin_ctzll(m);
      std::memcpy(w->result[lane], &ballot, 8);
      std::memcpy(w->result[lane] + 8, &members, 8);
    }
  }
  for (std::uint64_t m = members; m != 0; m &= m - 1) {
    const int lane = __builtin_ctzll(m);
    Fiber* f = b->fibers[first + lane];
    w->lane_group[lane] = -1;
    if (f != running) {
      b->state[f->pub.linear] = State::Runnable;
      ++b->runnable;
    }
  }
  g->active = false;
  --w->ngroups;
}

[[noreturn]] void finish(Fiber* f) {
  Block* b = f->block;
  b->state[f->pub.linear] = State::Done;
  --b->live;
  --b->runnable;
  Warp* w = &b->warps[f->pub.warp];
  w->live_mask &= ~(std::uint64_t(1) << f->pub.lane);
  // A maskless (HIP legacy) collective waits for the lanes still alive; this one may have been
  // the last it was waiting for.
  for (int i = 0; w->ngroups > 0 && i < kMaxWarpSize; ++i) {
    Group* g = &w->groups[i];
    if (g->active && (g->flags & kWarpLegacy) && g->arrived != 0 && g->arrived == w->live_mask)
      release_warp(b, w, g, f);
  }
  leave(f, pick_next(b, f->pub.linear));
}

void fiber_main(Fiber* f) {
  Block* b = f->block;
  b->job->body(b->job->closure);
  finish(f);
}

inline Fiber* fiber_of_frame(void* frame) {
  const std::uintptr_t base = reinterpret_cast<std::uintptr_t>(frame) & ~(kStackBytes - 1);
  return reinterpret_cast<Fiber*>(base + ctx_offset(base));
}

#if defined(WB_EMU_FIBER_FCONTEXT)
void fiber_entry(bctx::transfer_t t) {
  static_cast<Ctx*>(t.data)->fctx = t.fctx;
  fiber_main(fiber_of_frame(__builtin_frame_address(0)));
}

void make_fiber_ctx(Worker*, Fiber* f) {
  const std::size_t size = static_cast<std::size_t>(f->stack_hi - f->stack_lo);
  f->ctx.fctx = bctx::make_fcontext(f->stack_hi, size, fiber_entry);
}
#else
void fiber_entry() { fiber_main(fiber_of_frame(__builtin_frame_address(0))); }

void make_fiber_ctx(Worker* w, Fiber* f) {
  std::memcpy(&f->ctx.uc, &w->tmpl, sizeof(ucontext_t));
  f->ctx.uc.uc_stack.ss_sp = f->stack_lo;
  f->ctx.uc.uc_stack.ss_size = static_cast<std::size_t>(f->stack_hi - f->stack_lo);
  f->ctx.uc.uc_link = nullptr;
  makecontext(&f->ctx.uc, fiber_entry, 0);
}
#endif

// --- Api entry points called from kernel code ------------------------------------------------

int api_block_sync(ThreadCtx* self, const char* what, const char* file, int line, int site,
                   int op, int predicate) {
  Fiber* f = reinterpret_cast<Fiber*>(self);
  Block* b = f->block;
  const int slot = b->bar_gen & 1;
  if (b->bar_arrived == 0) {
    b->bar_site = site;
    b->bar_op = op;
    b->bar_mismatch = false;
    b->bar_file = file;
    b->bar_line = line;
    b->bar_acc[slot] = op == kBlockAnd ? 1 : 0;
  } else if ((op != b->bar_op || site != b->bar_site) && !b->bar_mismatch) {
    b->bar_mismatch = true;
    b->mis_file = file;
    b->mis_line = line;
  }
  switch (op) {
    case kBlockCount:
      b->bar_acc[slot] += predicate != 0;
      break;
    case kBlockAnd:
      b->bar_acc[slot] &= predicate != 0;
      break;
    case kBlockOr:
      b->bar_acc[slot] |= predicate != 0;
      break;
    default:
      break;
  }
  f->what = what;
  f->file = file;
  f->line = line;
  f->site = site;
  if (++b->bar_arrived == b->n) {
    b->state[f->pub.linear] = State::AtBarrier;  // the diagnosis below lists it where it waits
    const Instr* instr = b->job->desc->instr;
    if (b->bar_mismatch && instr != nullptr && (instr->flags & kSynccheck)) {
      // synccheck: report it and let the barrier complete, as AMD's s_barrier would (it counts
      // waves, not call sites); the kernel runs on and its other defects are found too.
      b->worker->instr->barrier_divergence(b, f, b->bar_file, b->bar_line, b->mis_file,
                                           b->mis_line);
    } else if (b->bar_mismatch) {
      fail(f, kDivergence,
           kernel_prefix(b) +
               ": the threads reached different __syncthreads() calls; every thread of a block "
               "must reach the same barrier (a barrier inside a branch needs a condition that "
               "is the same for the whole block):" +
               where_threads_are(b, -1),
           false);
    }
    if (instr != nullptr) b->worker->instr->interval_end(b);
    b->bar_arrived = 0;
    ++b->bar_gen;
    std::memset(b->state, static_cast<int>(State::Runnable), static_cast<std::size_t>(b->n));
    b->runnable = b->n;
    return b->bar_acc[slot];
  }
  b->state[f->pub.linear] = State::AtBarrier;
  --b->runnable;
  yield(f);
  return b->bar_acc[slot];
}

const unsigned char* api_warp_collective(ThreadCtx* self, const char* what, const char* file,
                                         int line, int site, std::uint64_t mask, int flags, int op,
                                         int src, const void* value, std::uint32_t nbytes) {
  Fiber* f = reinterpret_cast<Fiber*>(self);
  Block* b = f->block;
  Warp* w = &b->warps[self->warp];
  const int lane = self->lane;
  const std::uint64_t bit = std::uint64_t(1) << lane;
  const bool legacy = (flags & kWarpLegacy) != 0;
  f->what = what;
  f->file = file;
  f->line = line;
  f->site = site;
  if (!legacy && !(mask & bit)) {
    b->state[f->pub.linear] = State::AtWarp;
    fail(f, kDivergence,
         kernel_prefix(b) +
             format(", thread %s: %s at %s:%d was called with mask 0x%llx, which does not "
                    "include the calling lane %d (warp size %d); use WB_FULL_MASK or a mask as "
                    "wide as the warp",
                    dims(self->thread_idx).c_str(), what, file, line,
                    static_cast<unsigned long long>(mask), lane, self->warp_size),
         true);
  }
  const std::uint64_t expect = legacy ? 0 : (mask & w->exist_mask);
  Group* g = nullptr;
  Group* free_slot = nullptr;
  for (int i = 0; i < kMaxWarpSize; ++i) {
    Group* c = &w->groups[i];
    if (!c->active) {
      if (free_slot == nullptr) free_slot = c;
      if (w->ngroups == 0) break;
      continue;
    }
    const bool c_legacy = (c->flags & kWarpLegacy) != 0;
    if (c_legacy == legacy && c->expect == expect) {
      g = c;
      break;
    }
    // Two collectives in flight whose lane sets overlap: the lanes disagree about the mask.
    if (c_legacy || legacy || (c->expect & expect) != 0) c->mismatch = true;
  }
  if (g == nullptr) {
    g = free_slot;
    *g = Group{true, false, flags, op, expect, 0, what, file, line, site};
    ++w->ngroups;
  } else if (g->op != op || g->site != site) {
    g->mismatch = true;
  }
  if (nbytes != 0) std::memcpy(w->value[lane], value, nbytes);
  w->src[lane] = src;
  g->arrived |= bit;
  w->lane_group[lane] = static_cast<signed char>(g - w->groups);
  const std::uint64_t need = legacy ? w->live_mask : g->expect;
  if (g->arrived == need) {
    b->state[f->pub.linear] = State::AtWarp;
    release_warp(b, w, g, f);
    b->state[f->pub.linear] = State::Runnable;
    return w->result[lane];
  }
  b->state[f->pub.linear] = State::AtWarp;
  --b->runnable;
  yield(f);
  return w->result[lane];
}

std::uint64_t api_active_mask(ThreadCtx* self) {
  return reinterpret_cast<Fiber*>(self)->block->warps[self->warp].live_mask;
}

void api_trap(ThreadCtx* self, const char* what, const char* file, int line) {
  Fiber* f = reinterpret_cast<Fiber*>(self);
  Block* b = f->block;
  b->state[f->pub.linear] = State::Done;
  fail(f, kTrap,
       kernel_prefix(b) + format(", thread %s: %s at %s:%d", dims(self->thread_idx).c_str(), what,
                                 file, line),
       true);
}

// --- running blocks --------------------------------------------------------------------------

// Runs one block to completion. Returns false when it failed (error already recorded).
bool run_block(Worker* wk, Job* job, std::uint64_t linear_block) {
  const LaunchDesc* d = job->desc;
  Block* b = wk->block.get();
  b->worker = wk;
  b->job = job;
  b->idx = uint3{static_cast<unsigned>(linear_block % d->grid.x),
                 static_cast<unsigned>(linear_block / d->grid.x % d->grid.y),
                 static_cast<unsigned>(linear_block / d->grid.x / d->grid.y)};
  const int n = static_cast<int>(d->block.x * d->block.y * d->block.z);
  const int ws = static_cast<int>(d->warp_size);
  b->n = n;
  b->runnable = n;
  b->live = n;
  b->bar_arrived = 0;
  b->bar_gen = 0;
  b->failed = false;
  b->random = d->schedule == kScheduleRandom;
  b->rng = (d->seed + 1) * 0x9E3779B97F4A7C15ull ^ (linear_block + 1) * 0xBF58476D1CE4E5B9ull;
  if (b->rng == 0) b->rng = 1;
  b->nwarps = (n + ws - 1) / ws;
  for (int i = 0; i < b->nwarps; ++i) {
    Warp* w = &b->warps[i];
    const int lanes = std::min(ws, n - i * ws);
    w->exist_mask = lanes == 64 ? ~std::uint64_t(0) : (std::uint64_t(1) << lanes) - 1;
    w->live_mask = w->exist_mask;
    w->sync_gen = 0;
    if (w->ngroups != 0) {  // left over from a block that failed
      for (Group& g : w->groups) g.active = false;
      w->ngroups = 0;
    }
    std::memset(w->lane_group, -1, sizeof w->lane_group);
  }
  if (d->shared_bytes != 0) std::memset(wk->shared, 0xFF, d->shared_bytes);  // poison: NaN / -1
  for (int i = 0; i < n; ++i) {
    Fiber* f = wk->fibers[i];
    b->fibers[i] = f;
    ThreadCtx& t = f->pub;
    t.api = job->api;
    t.thread_idx = uint3{static_cast<unsigned>(i % d->block.x),
                         static_cast<unsigned>(i / d->block.x % d->block.y),
                         static_cast<unsigned>(i / d->block.x / d->block.y)};
    t.block_idx = b->idx;
    t.block_dim = d->block;
    t.grid_dim = d->grid;
    t.warp_size = ws;
    t.lane = i % ws;
    t.warp = i / ws;
    t.linear = i;
    t.dynamic_shared = d->shared_bytes != 0 ? wk->shared : nullptr;
    f->block = b;
    b->state[f->pub.linear] = State::Runnable;
    f->what = f->file = "";
    f->line = 0;
    f->site = -1;
    make_fiber_ctx(wk, f);
  }
  if (d->instr != nullptr) wk->instr->block_begin(b);
  wk->current = b->fibers[0];
  wk->in_kernel = 1;
  switch_ctx(&b->main, &b->fibers[0]->ctx);
  wk->in_kernel = 0;
  if (d->instr != nullptr) wk->instr->interval_end(b);
  if (b->failed) return false;
  if (b->live > 0) {
    set_error(job, kDeadlock, &b->idx, nullptr,
              kernel_prefix(b) +
                  ": deadlock, no thread can continue. Every thread of a block must reach each "
                  "__syncthreads() (no early return before it), and every lane named in a warp "
                  "collective's mask must make that call:" +
                  where_threads_are(b, -1));
    return false;
  }
  return true;
}

const char* signal_name(int sig) {
  switch (sig) {
    case SIGSEGV:
      return "SIGSEGV (invalid memory access)";
    case SIGBUS:
      return "SIGBUS (misaligned or invalid memory access)";
    case SIGFPE:
      return "SIGFPE (integer division by zero or overflow)";
    case SIGILL:
      return "SIGILL (illegal instruction, e.g. __builtin_trap)";
    case SIGABRT:
      return "SIGABRT (abort)";
    default:
      return "signal";
  }
}

void run_blocks(Worker* wk, Job* job) {
  const LaunchDesc* d = job->desc;
  const int n = static_cast<int>(d->block.x * d->block.y * d->block.z);
  if (!wk->ensure(n, d->shared_bytes)) {
    set_error(job, kResource, nullptr, nullptr,
              format("kernel %s: out of memory for %d fiber stacks or %zu bytes of shared memory",
                     d->kernel_name, n, d->shared_bytes));
    job->abort = true;
    return;
  }
  if (d->instr != nullptr) {
    if (wk->instr == nullptr) wk->instr = new InstrWorker();
    wk->instr->begin(job, wk);
  }
  // A signal raised by kernel code lands here (see on_signal); the block is abandoned.
  if (sigsetjmp(wk->jmp, 1) != 0) {
    wk->in_kernel = 0;
    Block* b = wk->block.get();
    Fiber* f = wk->current;
    const char* addr_note = "";
    std::string extra;
    if (f != nullptr && wk->fault_signal == SIGSEGV) {
      char* a = static_cast<char*>(wk->fault_addr);
      if (a >= f->guard && a < f->guard + kGuardBytes)
        addr_note = ": stack overflow (large local arrays belong in shared or global memory)";
    }
    if (wk->fault_signal == SIGSEGV || wk->fault_signal == SIGBUS)
      extra = format(" at address %p", wk->fault_addr);
    set_error(job, kFault, &b->idx, f != nullptr ? &f->pub.thread_idx : nullptr,
              kernel_prefix(b) +
                  (f != nullptr ? format(", thread %s", dims(f->pub.thread_idx).c_str())
                                : std::string()) +
                  ": " + signal_name(wk->fault_signal) + extra + addr_note);
    job->abort = true;
    if (d->instr != nullptr) wk->instr->merge(static_cast<Results*>(d->instr->results));
    return;
  }
  while (!job->abort.load(std::memory_order_relaxed)) {
    const std::uint64_t i = job->next.fetch_add(1);
    if (i >= job->nblocks) break;
    if (!run_block(wk, job, i)) {
      job->abort = true;
      break;
    }
  }
  if (d->instr != nullptr) wk->instr->merge(static_cast<Results*>(d->instr->results));
}

// --- signals -----------------------------------------------------------------------------------

constexpr int kSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
struct sigaction g_previous[sizeof kSignals / sizeof kSignals[0]];

void on_signal(int sig, siginfo_t* info, void* uctx) {
  Worker* wk = registered_worker();
  if (wk != nullptr && wk->in_kernel) {
    wk->fault_signal = sig;
    wk->fault_addr = info != nullptr ? info->si_addr : nullptr;
    siglongjmp(wk->jmp, 1);
  }
  // Not ours: hand it to whoever handled it before (Python's faulthandler, or the default).
  for (std::size_t i = 0; i < sizeof kSignals / sizeof kSignals[0]; ++i) {
    if (kSignals[i] != sig) continue;
    const struct sigaction& prev = g_previous[i];
    if (prev.sa_flags & SA_SIGINFO) {
      prev.sa_sigaction(sig, info, uctx);
    } else if (prev.sa_handler == SIG_IGN) {
      return;
    } else if (prev.sa_handler == SIG_DFL) {
      // Restore the default action; returning re-executes the faulting instruction (or, for
      // abort(), glibc raises again), which now terminates the process as it would have.
      signal(sig, SIG_DFL);
    } else {
      prev.sa_handler(sig);
    }
    return;
  }
}

void install_signal_handlers() {
  static std::once_flag once;
  std::call_once(once, [] {
    for (std::size_t i = 0; i < sizeof kSignals / sizeof kSignals[0]; ++i) {
      struct sigaction sa{};
      sa.sa_sigaction = on_signal;
      sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
      sigemptyset(&sa.sa_mask);
      sigaction(kSignals[i], &sa, &g_previous[i]);
    }
  });
}

// --- the thread pool ---------------------------------------------------------------------------

// Parked OS threads that help run blocks. Created on demand, never destroyed (detached; the
// pool object is deliberately leaked so nothing is torn down under a thread at exit).
class Pool {
 public:
  void run(Job* job, int helpers) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      while (static_cast<int>(count_) < helpers) {
        std::thread(&Pool::loop, this).detach();
        ++count_;
      }
      job_ = job;
      wanted_ = helpers;
      taken_ = 0;
      finished_ = 0;
      ++epoch_;
    }
    work_.notify_all();
  }

  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return finished_ == wanted_; });
    job_ = nullptr;
  }

 private:
  void loop() {
    Worker* wk = this_worker();
    std::uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      work_.wait(lock, [&] { return epoch_ != seen && taken_ < wanted_; });
      seen = epoch_;
      ++taken_;
      Job* job = job_;
      lock.unlock();
      run_blocks(wk, job);
      lock.lock();
      if (++finished_ == wanted_) done_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable work_, done_;
  unsigned count_ = 0;
  std::uint64_t epoch_ = 0;
  Job* job_ = nullptr;
  int wanted_ = 0, taken_ = 0, finished_ = 0;
};

Pool* pool() {
  // A forked child inherits the pool's bookkeeping but not its threads: start a new pool.
  static Pool* p = nullptr;
  static pid_t owner = 0;
  if (p == nullptr || owner != getpid()) {
    p = new Pool();
    owner = getpid();
  }
  return p;
}

std::mutex g_launch_mutex;

int api_launch(const Api* api, const LaunchDesc* d, void (*body)(void*), void* closure,
               ErrorInfo* error) {
  std::memset(error, 0, sizeof *error);
  const std::uint64_t nthreads = std::uint64_t(d->block.x) * d->block.y * d->block.z;
  const std::uint64_t nblocks = std::uint64_t(d->grid.x) * d->grid.y * d->grid.z;
  if (d->warp_size != 32 && d->warp_size != 64) {
    std::snprintf(error->message, sizeof error->message,
                  "kernel %s: warp size %u is not supported (32 or 64)", d->kernel_name,
                  d->warp_size);
    return error->kind = kBadLaunch;
  }
  if (nthreads == 0 || nthreads > kMaxThreadsPerBlock || nblocks == 0) {
    std::snprintf(error->message, sizeof error->message,
                  "kernel %s: block of %llu threads and grid of %llu blocks: a block needs 1 to "
                  "%d threads and a grid at least one block",
                  d->kernel_name, static_cast<unsigned long long>(nthreads),
                  static_cast<unsigned long long>(nblocks), kMaxThreadsPerBlock);
    return error->kind = kBadLaunch;
  }
  Results* results = d->instr != nullptr ? static_cast<Results*>(d->instr->results) : nullptr;
  if (results != nullptr) {
    std::vector<std::atomic<std::uint64_t*>> shadow(static_cast<std::size_t>(d->instr->nbuffers));
    results->global_shadow.swap(shadow);
  }
  Job job;
  job.api = api;
  job.desc = d;
  job.body = body;
  job.closure = closure;
  job.nblocks = nblocks;
  job.error = error;
  const std::uint64_t want = std::max<std::uint32_t>(1, std::min<std::uint32_t>(d->workers, 64));
  const int workers = static_cast<int>(std::min(want, nblocks));

  std::lock_guard<std::mutex> lock(g_launch_mutex);
  install_signal_handlers();
  Worker* me = this_worker();
  if (workers > 1) pool()->run(&job, workers - 1);
  run_blocks(me, &job);
  if (workers > 1) pool()->wait();
  if (results != nullptr) {
    for (auto& sh : results->global_shadow) std::free(sh.exchange(nullptr));
    results->global_shadow.clear();
  }
  return error->kind;
}

void api_access(ThreadCtx* self, const void* addr, std::uint32_t size, int op, const void* pc) {
  const auto a = reinterpret_cast<std::uintptr_t>(addr);
  const auto mine = reinterpret_cast<std::uintptr_t>(self) & ~(kStackBytes - 1);
  if ((a & ~(kStackBytes - 1)) == mine) return;  // the fiber's own locals and ThreadCtx
  Fiber* f = reinterpret_cast<Fiber*>(self);
  f->block->worker->instr->access(f, f->block, a, size, op, reinterpret_cast<std::uintptr_t>(pc));
}

void InstrWorker::stop(Fiber* f, Block* b, std::uintptr_t a, std::uint32_t size, int op,
                       int site) {
  (void)site;
  interval_end(b);
  merge(results_);
  fail(f, kStopped,
       kernel_prefix(b) +
           format(", thread %s: %s of %u bytes at address 0x%llx, outside every buffer argument "
                  "and its guard zone; the launch was stopped before it could corrupt memory",
                  dims(f->pub.thread_idx).c_str(), op == kLoad ? "read" : "write", size,
                  static_cast<unsigned long long>(a)),
       true);
}

const Api g_api = {
    kAbiVersion,     static_cast<std::uint32_t>(kStackBytes),
    kFiberName,      api_launch,
    api_block_sync,  api_warp_collective,
    api_active_mask, api_trap,
    api_access,
};

}  // namespace
}  // namespace wb_emu

WB_EMU_EXPORT const wb_emu::Api* wb_emu_runtime_api() { return &wb_emu::g_api; }

// The result sink of instrumented launches: Python creates one, passes it in Instr::results,
// reads the merged site counters and findings, and frees it.
WB_EMU_EXPORT void* wb_emu_results_new() { return new wb_emu::Results(); }
WB_EMU_EXPORT void wb_emu_results_free(void* r) { delete static_cast<wb_emu::Results*>(r); }

// Flattens the merged records (pcs as offsets into their module) and returns how many there are.
WB_EMU_EXPORT int wb_emu_results_collect(void* p, int* nfindings) {
  auto* r = static_cast<wb_emu::Results*>(p);
  std::lock_guard<std::mutex> lock(r->mutex);
  r->site_list.clear();
  for (auto& [key, s] : r->sites) {
    wb_emu::SiteOut o = s;
    o.pc = wb_emu::module_offset(o.pc);
    r->site_list.push_back(o);
  }
  r->finding_list.clear();
  for (auto& [key, f] : r->findings) {
    wb_emu::FindingOut o = f;
    o.pc = wb_emu::module_offset(o.pc);
    o.other_pc = wb_emu::module_offset(o.other_pc);
    r->finding_list.push_back(o);
  }
  *nfindings = static_cast<int>(r->finding_list.size());
  return static_cast<int>(r->site_list.size());
}
WB_EMU_EXPORT const wb_emu::SiteOut* wb_emu_results_sites(void* p) {
  return static_cast<wb_emu::Results*>(p)->site_list.data();
}
WB_EMU_EXPORT const wb_emu::FindingOut* wb_emu_results_findings(void* p) {
  return static_cast<wb_emu::Results*>(p)->finding_list.data();
}
