// Instrumented runs: memcheck, racecheck, initcheck, synccheck and memory-traffic counters.
//
// Included by wb_emu_runtime.cpp inside its namespace, after Fiber, Block and Worker. An
// instrumented module (compiled by clang with SanitizerCoverage load/store tracing, see wb_emu.h)
// calls Api::access before every load and store of kernel code; each OS thread that runs blocks
// owns an InstrWorker that classifies the address and updates its shadows and counters without
// locks. At the end of a launch the workers merge into the Results that Python reads.
//
// Address classes, in the order tested: the calling fiber's own stack region (locals and its
// ThreadCtx: ignored), the block's shared memory (the module's thread_local block = static
// __shared__, then dynamic shared memory), the pointer arguments (Buffer), the module's own image
// (constant tables: ignored), another fiber's stack (ignored), and anything else (out of bounds).
//
// Races are derived from the accesses within one barrier interval, not from the order fibers ran
// in: two accesses to one shared byte by different threads in the same interval, at least one a
// write and not both atomic, are a hazard whichever ran first. Lanes of one warp are ordered by a
// warp collective between their accesses (__syncwarp, a shuffle, a vote).
//
// Counters: the n-th execution of one access site by the lanes of one warp is one warp-level
// request (a GPU memory instruction). Its lanes' addresses give the distinct aligned segments it
// touches (global) or its bank serialization (shared), computed when the interval ends.

// The result records Python reads (ctypes mirrors in workbench/kernels/emulator_instrument.py).
enum FindingKind : int {
  kOobRead = 1,
  kOobWrite = 2,
  kMisaligned = 3,
  kRaceRaw = 4,
  kRaceWar = 5,
  kRaceWaw = 6,
  kGlobalWaw = 7,
  kUninitRead = 8,
  kBarrierDivergence = 9,
};

struct SiteOut {
  std::uint64_t pc;  // offset of the return address into the module (its line: pc - 1)
  std::int32_t space;  // 0 global, 1 shared
  std::int32_t op;     // AccessOp
  std::uint64_t requests;
  std::uint64_t lanes;
  std::uint64_t bytes_requested;
  std::uint64_t bytes_moved;
  std::uint64_t bank_cycles;
  std::uint64_t ideal_cycles;
};

struct FindingOut {
  std::int32_t kind;
  std::int32_t arg;  // -1: none
  std::uint64_t pc;
  std::uint64_t other_pc;  // 0: none
  const char* file;        // barrier divergence: the barriers' own file/line (no pc)
  std::int32_t line;
  std::int32_t other_line;
  const char* other_file;
  std::uint32_t block[3];
  std::uint32_t thread[3];
  std::uint64_t count;
  std::int64_t offset;
  std::uint64_t address;
  std::uint64_t order;  // (block linear << 10 | thread): the smallest is the "first" occurrence
};

struct FindingKey {
  int kind;
  std::uint64_t pc, other_pc;
  const char* file;
  int line;
  const char* other_file;
  int other_line;
  bool operator<(const FindingKey& o) const {
    return std::tie(kind, pc, other_pc, file, line, other_file, other_line) <
           std::tie(o.kind, o.pc, o.other_pc, o.file, o.line, o.other_file, o.other_line);
  }
};

struct Results {
  std::mutex mutex;
  std::map<std::tuple<std::uint64_t, int, int>, SiteOut> sites;
  std::map<FindingKey, FindingOut> findings;
  std::vector<SiteOut> site_list;
  std::vector<FindingOut> finding_list;
  // The global-memory write shadow of each buffer (racecheck): one word per byte, created on the
  // first plain store into that buffer during a launch.
  std::vector<std::atomic<std::uint64_t*>> global_shadow;
  std::mutex shadow_mutex;
};

std::uint64_t module_offset(std::uint64_t pc) {
  Dl_info info;
  if (pc != 0 && dladdr(reinterpret_cast<void*>(pc), &info) != 0 && info.dli_fbase != nullptr)
    return pc - reinterpret_cast<std::uint64_t>(info.dli_fbase);
  return pc;
}

void add_finding(std::map<FindingKey, FindingOut>& into, const FindingKey& key,
                 const FindingOut& rec) {
  auto it = into.find(key);
  if (it == into.end()) {
    into.emplace(key, rec);
    return;
  }
  const std::uint64_t count = it->second.count + rec.count;
  if (rec.order < it->second.order) it->second = rec;
  it->second.count = count;
}

// The shadow of one byte of shared memory.
struct Shadow {
  std::uint32_t w_epoch, r_epoch;  // interval of the last write / read (0: never)
  std::uint32_t w_site, r_site;    // their sites (indices into the worker's site table)
  std::uint32_t init_block;        // block serial that last wrote the byte (initcheck)
  std::uint16_t w_thread, r_thread;
  std::uint16_t w_seq, r_seq;   // the access's position among its thread's shared accesses
  std::uint8_t w_wgen, r_wgen;  // warp-collective generation of the accessing warp
  std::uint8_t flags;           // kWAtomic, kRAtomic, kRMulti
};
constexpr std::uint8_t kWAtomic = 1, kRAtomic = 2, kRMulti = 4;

struct Rec {  // one warp-level request in the making
  std::uint64_t mask;
  std::uint32_t size;
  std::uint64_t addr[kMaxWarpSize];
};

struct Track {  // one (site, space, warp)
  std::uint32_t n[kMaxWarpSize];  // executions of the site by each lane in this interval
  std::uint32_t used = 0;         // records in use
  bool dirty = false;
  std::vector<Rec> recs;
};

struct Site {
  std::uintptr_t pc;
  int op;
  SiteOut out[2];  // per space
  std::vector<Track> tracks[2];  // per warp
};

class InstrWorker {
 public:
  void begin(Job* job, Worker* wk);
  void block_begin(Block* b);
  void interval_end(Block* b);  // a barrier released or the block ended
  void merge(Results* r);
  void access(Fiber* f, Block* b, std::uintptr_t a, std::uint32_t size, int op,
              std::uintptr_t pc);
  void barrier_divergence(Block* b, Fiber* f, const char* file, int line, const char* ofile,
                          int oline);

 private:
  int site_of(std::uintptr_t pc, int op);
  void shared_access(Fiber* f, Block* b, std::size_t idx, std::uint32_t size, int op, int site,
                     std::uint32_t seq);
  void global_store(Fiber* f, Block* b, int buf, std::uintptr_t a, std::uint32_t size, int site);
  void count(Fiber* f, Block* b, int site, int space, std::uintptr_t a, std::uint32_t size);
  void finalize(Site& s, int space, Rec& r);
  void finding(int kind, Fiber* f, Block* b, int site, int other_site, int arg,
               std::int64_t offset, std::uintptr_t address);
  [[noreturn]] void stop(Fiber* f, Block* b, std::uintptr_t a, std::uint32_t size, int op,
                         int site);
  bool other_fiber(std::uintptr_t a) const;

  const Instr* in_ = nullptr;
  std::uintptr_t api_ = 0;
  struct Pending {  // a read of unwritten shared memory, reported unless the interval wrote it
    std::size_t idx;
    int site;
    int thread;
    uint3 tid;
  };
  std::vector<Pending> pending_;
  Block* block_ = nullptr;
  Results* results_ = nullptr;
  std::uint32_t flags_ = 0;
  ModuleRanges mod_{};
  std::uintptr_t dyn_lo_ = 0;
  std::size_t dyn_size_ = 0;
  std::vector<Shadow> shadow_;
  std::uint32_t epoch_ = 0;
  std::uint32_t block_serial_ = 0;
  std::uint32_t bar_count_ = 0;  // barriers so far in the current block
  std::uint64_t block_linear_ = 0;
  std::vector<Site> sites_;
  std::vector<std::int32_t> table_;  // open addressing: pc -> site index
  std::vector<std::tuple<int, int, int>> dirty_;  // (site, space, warp)
  std::map<FindingKey, FindingOut> findings_;
  std::vector<std::uintptr_t> fiber_bases_;
  std::vector<std::uint32_t> seq_;  // per thread: shared accesses so far in this interval
};

void InstrWorker::begin(Job* job, Worker* wk) {
  in_ = job->desc->instr;
  api_ = reinterpret_cast<std::uintptr_t>(job->api);
  pending_.clear();
  results_ = static_cast<Results*>(in_->results);
  flags_ = in_->flags;
  in_->module_ranges(&mod_);
  dyn_lo_ = reinterpret_cast<std::uintptr_t>(wk->shared);
  dyn_size_ = job->desc->shared_bytes;
  if (flags_ & (kRacecheck | kInitcheck)) {
    shadow_.assign(mod_.tls_size + dyn_size_, Shadow{});
  } else {
    shadow_.clear();
  }
  epoch_ = 0;
  block_serial_ = 0;
  seq_.assign(kMaxThreadsPerBlock, 0);
  sites_.clear();
  table_.assign(4096, -1);
  dirty_.clear();
  findings_.clear();
  fiber_bases_.clear();
  for (Fiber* f : wk->fibers)
    fiber_bases_.push_back(reinterpret_cast<std::uintptr_t>(f) & ~(kStackBytes - 1));
  std::sort(fiber_bases_.begin(), fiber_bases_.end());
}

void InstrWorker::block_begin(Block* b) {
  ++block_serial_;
  ++epoch_;
  bar_count_ = 0;
  std::fill(seq_.begin(), seq_.end(), 0);
  const dim3 g = b->job->desc->grid;
  block_linear_ = b->idx.x + std::uint64_t(g.x) * (b->idx.y + std::uint64_t(g.y) * b->idx.z);
  // Static shared memory starts poisoned in every block, as dynamic shared memory does.
  if (mod_.tls_size != 0) std::memset(reinterpret_cast<void*>(mod_.tls_lo), 0xFF, mod_.tls_size);
}

int InstrWorker::site_of(std::uintptr_t pc, int op) {
  const std::size_t mask = table_.size() - 1;
  std::size_t h = (pc * 0x9E3779B97F4A7C15ull) >> 20;
  for (;; ++h) {
    std::int32_t& slot = table_[h & mask];
    if (slot < 0) {
      slot = static_cast<std::int32_t>(sites_.size());
      Site s{};
      s.pc = pc;
      s.op = op;
      sites_.push_back(std::move(s));
      if (sites_.size() * 2 > table_.size()) {  // keep the table at most half full
        std::vector<std::int32_t> old(table_.size() * 2, -1);
        table_.swap(old);
        const std::size_t m2 = table_.size() - 1;
        for (std::size_t i = 0; i < sites_.size(); ++i) {
          std::size_t k = (sites_[i].pc * 0x9E3779B97F4A7C15ull) >> 20;
          while (table_[k & m2] >= 0) ++k;
          table_[k & m2] = static_cast<std::int32_t>(i);
        }
      }
      return static_cast<int>(sites_.size() - 1);
    }
    if (sites_[slot].pc == pc) return slot;
  }
}

bool InstrWorker::other_fiber(std::uintptr_t a) const {
  const std::uintptr_t base = a & ~(kStackBytes - 1);
  return std::binary_search(fiber_bases_.begin(), fiber_bases_.end(), base);
}

void InstrWorker::access(Fiber* f, Block* b, std::uintptr_t a, std::uint32_t size, int op,
                         std::uintptr_t pc) {
  // Shared memory: the module's thread_local block (static __shared__), then dynamic.
  std::size_t idx = SIZE_MAX;
  if (a - mod_.tls_lo < mod_.tls_size) {
    idx = a - mod_.tls_lo;
  } else if (dyn_size_ != 0 && a - dyn_lo_ < dyn_size_) {
    idx = mod_.tls_size + (a - dyn_lo_);
  }
  if (idx != SIZE_MAX) {
    const int site = site_of(pc, op);
    const std::uint32_t seq = seq_[static_cast<std::size_t>(f->pub.linear)]++;
    if (flags_ & (kRacecheck | kInitcheck)) shared_access(f, b, idx, size, op, site, seq);
    if (flags_ & kCounters) count(f, b, site, 1, a, size);
    return;
  }
  const Buffer* bufs = in_->buffers;
  for (int i = 0; i < in_->nbuffers; ++i) {
    const Buffer& buf = bufs[i];
    if (a - buf.base < buf.size && a + size - buf.base <= buf.size) {
      const int site = site_of(pc, op);
      if ((flags_ & kMemcheck) && (a & (std::min<std::uint32_t>(size, 4) - 1)) != 0)
        finding(kMisaligned, f, b, site, -1, buf.arg, static_cast<std::int64_t>(a - buf.base), a);
      if ((flags_ & kRacecheck) && op == kStore) global_store(f, b, i, a, size, site);
      if (flags_ & kCounters) count(f, b, site, 0, a, size);
      return;
    }
  }
  if (a - mod_.image_lo < mod_.image_hi - mod_.image_lo) return;  // constant tables
  if (a - api_ < sizeof(Api)) return;  // an intrinsic reading its entry in the Api table
  // a shuffle or vote reading its result from the block's warp record
  if (a - reinterpret_cast<std::uintptr_t>(b) < sizeof(Block)) return;
  if (other_fiber(a)) return;
  // Out of bounds: name the nearest buffer (within 64 KiB of its ends) if there is one.
  const int site = site_of(pc, op);
  int near = -1;
  std::int64_t offset = 0;
  std::uint64_t best = std::uint64_t(64) * 1024;
  for (int i = 0; i < in_->nbuffers; ++i) {
    const Buffer& buf = bufs[i];
    const std::uintptr_t end = buf.base + buf.size;
    const std::uint64_t d = a < buf.base ? buf.base - a : (a >= end ? a - end : 0);
    if (d <= best) {
      best = d;
      near = i;
      offset = a < buf.base ? -static_cast<std::int64_t>(buf.base - a)
                            : static_cast<std::int64_t>(a - end);
    }
  }
  const bool in_guard = near >= 0 && a >= bufs[near].lo && a + size <= bufs[near].hi;
  if (flags_ & kMemcheck)
    finding(op == kLoad ? kOobRead : kOobWrite, f, b, site, -1, near >= 0 ? bufs[near].arg : -1,
            offset, a);
  // A read near a buffer returns its guard zone's poison (or its neighbour's bytes); a write
  // is harmless only inside a guard zone of our own: anything else would corrupt the process.
  if (op != kLoad && !in_guard) stop(f, b, a, size, op, site);
}

// A read and a write of one interval race whichever ran first here; the hazard is named by their
// positions in their threads' intervals (`seq`: shared accesses so far): a write that comes no
// later than the read is read-after-write (the read should have waited), a read that comes first
// is write-after-read (the write should have waited; also across turns of a loop).
void InstrWorker::shared_access(Fiber* f, Block* b, std::size_t idx, std::uint32_t size, int op,
                                int site, std::uint32_t seq) {
  const int ws = f->pub.warp_size;
  const int me = f->pub.linear;
  const int my_warp = f->pub.warp;
  const std::uint8_t wgen = static_cast<std::uint8_t>(b->warps[my_warp].sync_gen);
  const bool atomic = op == kAtomic;
  // Another thread's access is ordered before mine when it is in my warp and a warp collective
  // completed since (the generation moved on).
  auto ordered = [&](int t, std::uint8_t g) { return t / ws == my_warp && g != wgen; };
  bool uninit = false, raw = false, war = false, waw = false;
  int raw_read = -1, raw_write = -1, war_read = -1, war_write = -1, waw_other = -1;
  const std::uint16_t q = static_cast<std::uint16_t>(std::min<std::uint32_t>(seq, 0xFFFF));
  auto hazard = [&](int read_site, std::uint16_t read_seq, int write_site, std::uint16_t write_seq) {
    if (write_seq <= read_seq) {
      if (!raw) raw = true, raw_read = read_site, raw_write = write_site;
    } else if (!war) {
      war = true, war_read = read_site, war_write = write_site;
    }
  };
  const std::size_t end = std::min(idx + size, shadow_.size());
  for (std::size_t i = idx; i < end; ++i) {
    Shadow& s = shadow_[i];
    if (flags_ & kInitcheck) {
      if (op != kStore && s.init_block != block_serial_) uninit = true;
      if (op != kLoad) s.init_block = block_serial_;
    }
    if (!(flags_ & kRacecheck)) {
      if (op != kLoad) s.w_epoch = epoch_, s.w_thread = static_cast<std::uint16_t>(me);
      continue;
    }
    const bool w_here = s.w_epoch == epoch_ && s.w_thread != me &&
                        !(atomic && (s.flags & kWAtomic)) && !ordered(s.w_thread, s.w_wgen);
    if (op != kStore) {  // a read (an atomic reads and writes)
      if (w_here) hazard(site, q, static_cast<int>(s.w_site), s.w_seq);
      if (s.r_epoch != epoch_ || s.r_thread == me || ordered(s.r_thread, s.r_wgen)) {
        s.r_epoch = epoch_;
        s.r_thread = static_cast<std::uint16_t>(me);
        s.r_site = static_cast<std::uint32_t>(site);
        s.r_wgen = wgen;
        s.r_seq = q;
        s.flags = static_cast<std::uint8_t>((s.flags & kWAtomic) | (atomic ? kRAtomic : 0));
      } else {
        s.flags |= kRMulti;
        if (!atomic) s.flags &= static_cast<std::uint8_t>(~kRAtomic);
      }
    }
    if (op != kLoad) {  // a write
      if (w_here && !waw) waw = true, waw_other = static_cast<int>(s.w_site);
      const bool r_here =
          s.r_epoch == epoch_ && !(atomic && (s.flags & kRAtomic)) &&
          ((s.flags & kRMulti) || (s.r_thread != me && !ordered(s.r_thread, s.r_wgen)));
      if (r_here && !(op == kAtomic && s.r_thread == me && !(s.flags & kRMulti)))
        hazard(static_cast<int>(s.r_site), s.r_seq, site, q);
      s.w_epoch = epoch_;
      s.w_thread = static_cast<std::uint16_t>(me);
      s.w_site = static_cast<std::uint32_t>(site);
      s.w_wgen = wgen;
      s.w_seq = q;
      s.flags = static_cast<std::uint8_t>((s.flags & ~kWAtomic) | (atomic ? kWAtomic : 0));
    }
  }
  if (uninit) pending_.push_back(Pending{idx, site, me, f->pub.thread_idx});
  if (raw) finding(kRaceRaw, f, b, raw_read, raw_write, -1, 0, 0);
  if (war) finding(kRaceWar, f, b, war_write, war_read, -1, 0, 0);
  if (waw) finding(kRaceWaw, f, b, site, waw_other, -1, 0, 0);
}

void InstrWorker::global_store(Fiber* f, Block* b, int buf, std::uintptr_t a, std::uint32_t size,
                               int site) {
  std::atomic<std::uint64_t*>& slot = results_->global_shadow[static_cast<std::size_t>(buf)];
  std::uint64_t* sh = slot.load(std::memory_order_acquire);
  const Buffer& bf = in_->buffers[buf];
  if (sh == nullptr) {
    std::lock_guard<std::mutex> lock(results_->shadow_mutex);
    sh = slot.load(std::memory_order_acquire);
    if (sh == nullptr) {
      sh = static_cast<std::uint64_t*>(std::calloc(bf.size, sizeof(std::uint64_t)));
      if (sh == nullptr) return;
      slot.store(sh, std::memory_order_release);
    }
  }
  const std::uint8_t wgen = static_cast<std::uint8_t>(b->warps[f->pub.warp].sync_gen);
  // (block + 1) : 32 | barrier count : 14 | warp generation : 8 | thread : 10
  const std::uint64_t word = ((block_linear_ + 1) & 0xFFFFFFFFu) << 32 |
                             std::uint64_t(bar_count_ & 0x3FFF) << 18 |
                             std::uint64_t(wgen) << 10 | std::uint64_t(f->pub.linear & 0x3FF);
  const int ws = f->pub.warp_size;
  for (std::uint32_t k = 0; k < size; ++k) {
    const std::uint64_t old =
        __atomic_exchange_n(&sh[a - bf.base + k], word, __ATOMIC_RELAXED);
    if (old == 0 || old == word) continue;
    const bool other_block = (old >> 32) != (word >> 32);
    const int t = static_cast<int>(old & 0x3FF);
    const bool same_interval = ((old >> 18) & 0x3FFF) == (bar_count_ & 0x3FFF);
    const bool warp_ordered =
        t / ws == f->pub.warp && static_cast<std::uint8_t>(old >> 10) != wgen;
    if (other_block || (t != f->pub.linear && same_interval && !warp_ordered)) {
      finding(kGlobalWaw, f, b, site, -1, bf.arg, static_cast<std::int64_t>(a - bf.base), a);
      return;
    }
  }
}

void InstrWorker::count(Fiber* f, Block* b, int site, int space, std::uintptr_t a,
                        std::uint32_t size) {
  Site& s = sites_[static_cast<std::size_t>(site)];
  std::vector<Track>& tracks = s.tracks[space];
  if (tracks.size() < static_cast<std::size_t>(b->nwarps)) {
    const std::size_t old = tracks.size();
    tracks.resize(static_cast<std::size_t>(b->nwarps));
    for (std::size_t i = old; i < tracks.size(); ++i)
      std::memset(tracks[i].n, 0, sizeof tracks[i].n);
  }
  Track& t = tracks[static_cast<std::size_t>(f->pub.warp)];
  if (!t.dirty) {
    t.dirty = true;
    dirty_.emplace_back(site, space, f->pub.warp);
  }
  const std::uint32_t k = t.n[f->pub.lane]++;
  while (t.used <= k) {
    if (t.recs.size() <= t.used) t.recs.emplace_back();
    Rec& r = t.recs[t.used++];
    r.mask = 0;
    r.size = size;
  }
  Rec& r = t.recs[k];
  r.mask |= std::uint64_t(1) << f->pub.lane;
  r.addr[f->pub.lane] = a;
  if (size > r.size) r.size = size;
}

void InstrWorker::finalize(Site& s, int space, Rec& r) {
  if (r.mask == 0) return;
  SiteOut& o = s.out[space];
  const std::uint32_t lanes = static_cast<std::uint32_t>(__builtin_popcountll(r.mask));
  o.requests += 1;
  o.lanes += lanes;
  o.bytes_requested += std::uint64_t(lanes) * r.size;
  if (space == 0) {
    const std::uint64_t seg = in_->segment_bytes;
    std::uint64_t segs[2 * kMaxWarpSize];
    int n = 0;
    for (std::uint64_t m = r.mask; m != 0; m &= m - 1) {
      const std::uint64_t addr = r.addr[__builtin_ctzll(m)];
      for (std::uint64_t sgm = addr / seg; sgm <= (addr + r.size - 1) / seg; ++sgm)
        if (n < 2 * kMaxWarpSize) segs[n++] = sgm;
    }
    std::sort(segs, segs + n);
    o.bytes_moved += seg * static_cast<std::uint64_t>(std::unique(segs, segs + n) - segs);
    return;
  }
  // Shared: the lanes go through the banks in phases of banks * bank_bytes bytes' worth of
  // lanes (32 lanes for 4-byte accesses, 16 for 8-byte, 8 for 16-byte); a phase takes as many
  // cycles as the most distinct words any one bank must deliver (equal words broadcast).
  o.bytes_moved += std::uint64_t(lanes) * r.size;
  const std::uint32_t bb = in_->bank_bytes, banks = in_->banks;
  const std::uint32_t per_phase = std::max<std::uint32_t>(1, banks * bb / std::max(r.size, bb));
  for (int first = 0; first < kMaxWarpSize; first += static_cast<int>(per_phase)) {
    std::uint64_t words[kMaxWarpSize * 4];
    int n = 0;
    for (int lane = first; lane < first + static_cast<int>(per_phase) && lane < kMaxWarpSize;
         ++lane) {
      if (!((r.mask >> lane) & 1)) continue;
      for (std::uint64_t w = r.addr[lane] / bb; w <= (r.addr[lane] + r.size - 1) / bb; ++w)
        if (n < kMaxWarpSize * 4) words[n++] = w;
    }
    if (n == 0) continue;
    std::sort(words, words + n);
    n = static_cast<int>(std::unique(words, words + n) - words);
    std::uint32_t per_bank[64] = {};
    std::uint32_t worst = 0;
    for (int i = 0; i < n; ++i) worst = std::max(worst, ++per_bank[words[i] % banks % 64]);
    o.bank_cycles += worst;
    o.ideal_cycles += 1;
  }
}

void InstrWorker::interval_end(Block* b) {
  // A read of a byte that another thread of the interval wrote is a race (reported as one), not
  // a read of memory nobody wrote.
  for (const Pending& p : pending_) {
    const Shadow& s = shadow_[p.idx];
    if (s.w_epoch == epoch_ && s.w_thread != p.thread) continue;
    Fiber* f = b->fibers[p.thread];
    finding(kUninitRead, f, b, p.site, -1, -1, 0, 0);
  }
  pending_.clear();
  std::fill(seq_.begin(), seq_.end(), 0);
  ++epoch_;
  ++bar_count_;
  for (const auto& [site, space, warp] : dirty_) {
    Site& s = sites_[static_cast<std::size_t>(site)];
    Track& t = s.tracks[space][static_cast<std::size_t>(warp)];
    for (std::uint32_t i = 0; i < t.used; ++i) finalize(s, space, t.recs[i]);
    t.used = 0;
    t.dirty = false;
    std::memset(t.n, 0, sizeof t.n);
  }
  dirty_.clear();
}

void InstrWorker::finding(int kind, Fiber* f, Block* b, int site, int other_site, int arg,
                          std::int64_t offset, std::uintptr_t address) {
  FindingOut rec{};
  rec.kind = kind;
  rec.arg = arg;
  rec.pc = site >= 0 ? sites_[static_cast<std::size_t>(site)].pc : 0;
  rec.other_pc = other_site >= 0 ? sites_[static_cast<std::size_t>(other_site)].pc : 0;
  rec.block[0] = b->idx.x, rec.block[1] = b->idx.y, rec.block[2] = b->idx.z;
  rec.thread[0] = f->pub.thread_idx.x, rec.thread[1] = f->pub.thread_idx.y;
  rec.thread[2] = f->pub.thread_idx.z;
  rec.count = 1;
  rec.offset = offset;
  rec.address = address;
  rec.order = block_linear_ << 10 | static_cast<std::uint64_t>(f->pub.linear);
  add_finding(findings_, FindingKey{kind, rec.pc, rec.other_pc, nullptr, 0, nullptr, 0}, rec);
}

void InstrWorker::barrier_divergence(Block* b, Fiber* f, const char* file, int line,
                                     const char* ofile, int oline) {
  FindingOut rec{};
  rec.kind = kBarrierDivergence;
  rec.arg = -1;
  rec.file = file;
  rec.line = line;
  rec.other_file = ofile;
  rec.other_line = oline;
  rec.block[0] = b->idx.x, rec.block[1] = b->idx.y, rec.block[2] = b->idx.z;
  rec.thread[0] = f->pub.thread_idx.x, rec.thread[1] = f->pub.thread_idx.y;
  rec.thread[2] = f->pub.thread_idx.z;
  rec.count = 1;
  rec.order = block_linear_ << 10 | static_cast<std::uint64_t>(f->pub.linear);
  add_finding(findings_, FindingKey{kBarrierDivergence, 0, 0, file, line, ofile, oline}, rec);
}

void InstrWorker::merge(Results* r) {
  std::lock_guard<std::mutex> lock(r->mutex);
  for (Site& s : sites_) {
    for (int space = 0; space < 2; ++space) {
      const SiteOut& o = s.out[space];
      if (o.requests == 0) continue;
      auto key = std::make_tuple(static_cast<std::uint64_t>(s.pc), space, s.op);
      auto it = r->sites.find(key);
      if (it == r->sites.end()) {
        SiteOut n = o;
        n.pc = s.pc;
        n.space = space;
        n.op = s.op;
        r->sites.emplace(key, n);
      } else {
        it->second.requests += o.requests;
        it->second.lanes += o.lanes;
        it->second.bytes_requested += o.bytes_requested;
        it->second.bytes_moved += o.bytes_moved;
        it->second.bank_cycles += o.bank_cycles;
        it->second.ideal_cycles += o.ideal_cycles;
      }
    }
  }
  for (const auto& [key, rec] : findings_) add_finding(r->findings, key, rec);
  sites_.clear();
  findings_.clear();
}
