// The CPU emulator's launch: blocks on a pool of OS threads, CUDA threads as fibers (see emu_device.hpp for why).
#include <sched.h>
#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "emu_device.hpp"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace ep_emu {

namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kWarpSize = 32;
// Sweeps over a block's fibers in which nothing advanced, before its OS thread sleeps between sweeps (the block is
// waiting on another block or process, which needs the core more).
constexpr int kIdleSweepsBeforeSleep = 64;

[[noreturn]] void die(const char* what) {
    std::fprintf(stderr, "deep_ep_py CPU emulator: %s\n", what);
    std::abort();
}

// ---- Context switching ------------------------------------------------------------------------------------------
#if defined(__x86_64__)
// Saves the callee-saved registers and the SSE/x87 control words on the current stack, stores the stack pointer in
// *save_sp and resumes the context whose stack pointer is next_sp. No signal mask, no syscall: fibers switch at every
// barrier, and glibc's swapcontext makes one syscall per switch.
extern "C" void ep_emu_switch(void** save_sp, void* next_sp);
asm(R"(
    .text
    .globl ep_emu_switch
    .type ep_emu_switch, @function
ep_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size ep_emu_switch, .-ep_emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");

struct Context {
    void* sp = nullptr;
};

void switch_context(Context& from, Context& to) { ep_emu_switch(&from.sp, to.sp); }

// A fresh context that starts in entry() on the stack [stack, stack + bytes).
void make_context(Context& context, void* stack, size_t bytes, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(static_cast<char*>(stack) + bytes) & ~static_cast<uintptr_t>(15);
    // ep_emu_switch's `ret` pops the entry address from a 16-byte aligned slot, so entry() starts as if called.
    auto* frame = reinterpret_cast<uint64_t*>(top - 16);
    frame[0] = reinterpret_cast<uint64_t>(entry);
    uint64_t* saved = frame - 7;  // control words, then r15, r14, r13, r12, rbx, rbp
    for (int i = 0; i < 7; ++i) saved[i] = 0;
    uint32_t mxcsr = 0;
    uint16_t fpu_control = 0;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpu_control));
    std::memcpy(reinterpret_cast<char*>(saved), &mxcsr, sizeof(mxcsr));
    std::memcpy(reinterpret_cast<char*>(saved) + 4, &fpu_control, sizeof(fpu_control));
    context.sp = saved;
}
#else
struct Context {
    ucontext_t uc;
};

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

void make_context(Context& context, void* stack, size_t bytes, void (*entry)()) {
    getcontext(&context.uc);
    context.uc.uc_stack.ss_sp = stack;
    context.uc.uc_stack.ss_size = bytes;
    context.uc.uc_link = nullptr;
    makecontext(&context.uc, entry, 0);
}
#endif

// ---- The order fibers run in ---------------------------------------------------------------------------------------
// DEEP_EP_PY_EMULATE_SCHEDULE: which of a block's waiting fibers runs first after a switch point: "forward" (thread 0
// first, the default), "reverse", or "random" (a new order every sweep, seeded by DEEP_EP_PY_EMULATE_SEED, else by
// the clock; the seed is printed). A kernel that reads what another thread writes with no barrier in between works
// in one order and not in another: running the tests in each is how the emulator finds a missing __syncthreads.
enum class Schedule { kForward, kReverse, kRandom };

struct ScheduleSetting {
    Schedule schedule = Schedule::kForward;
    uint64_t seed = 0;
};

const ScheduleSetting& schedule_setting() {
    static const ScheduleSetting setting = [] {
        ScheduleSetting s;
        const char* raw = std::getenv("DEEP_EP_PY_EMULATE_SCHEDULE");
        const std::string name = raw != nullptr ? raw : "";
        if (name.empty() || name == "forward") return s;
        if (name == "reverse") {
            s.schedule = Schedule::kReverse;
        } else if (name == "random") {
            s.schedule = Schedule::kRandom;
            const char* seed = std::getenv("DEEP_EP_PY_EMULATE_SEED");
            s.seed = seed != nullptr && *seed != '\0' ? std::strtoull(seed, nullptr, 10)
                                                       : static_cast<uint64_t>(global_timer_ns());
            std::fprintf(stderr, "deep_ep_py CPU emulator: random schedule, DEEP_EP_PY_EMULATE_SEED=%llu\n",
                         static_cast<unsigned long long>(s.seed));
        } else {
            die("DEEP_EP_PY_EMULATE_SCHEDULE must be forward, reverse or random");
        }
        return s;
    }();
    return setting;
}

// ---- One block ----------------------------------------------------------------------------------------------------
struct Fiber {
    Context context;
    void* stack = nullptr;
    uint3 idx{};
    bool done = false;
};

struct Warp {
    uint64_t value[kWarpSize];
    unsigned mask[kWarpSize];
    bool arrived[kWarpSize];
    bool released[kWarpSize];
    bool exited[kWarpSize];
    uint64_t result[kWarpSize][kWarpSize];  // per lane: the values of its last completed exchange
};

struct Job {
    const std::function<void()>* body = nullptr;
    uint3 block_idx{};
    dim3 block_dim;
    dim3 grid_dim;
    size_t dynamic_smem_bytes = 0;
};

// A worker OS thread's state for the block it runs. Fibers of the block share it (same OS thread).
struct Block {
    Job job;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    std::unique_ptr<uint64_t[]> smem;
    size_t smem_capacity = 0;
    Context scheduler;
    std::vector<int> order;  // the fibers in the order a sweep runs them (schedule_setting)
    std::mt19937_64 rng;
    int current = -1;
    int num_threads = 0;
    int num_live = 0;
    // __syncthreads: arrivals of this generation, and the reductions of the _or/_and/_count forms.
    int barrier_arrived = 0;
    uint64_t barrier_generation = 0;
    int accum_or = 0, accum_and = 1, accum_count = 0;
    int result_or = 0, result_and = 1, result_count = 0;
    bool progress = false;
};

thread_local Block* t_block = nullptr;

Block& block() {
    if (t_block == nullptr) die("a device function ran outside a kernel launch");
    return *t_block;
}

Fiber& current_fiber() { return block().fibers[static_cast<size_t>(block().current)]; }

void yield() {
    Block& b = block();
    switch_context(b.fibers[static_cast<size_t>(b.current)].context, b.scheduler);
}

void release_barrier(Block& b) {
    b.result_or = b.accum_or;
    b.result_and = b.accum_and;
    b.result_count = b.accum_count;
    b.accum_or = 0;
    b.accum_and = 1;
    b.accum_count = 0;
    b.barrier_arrived = 0;
    ++b.barrier_generation;
    b.progress = true;
}

void arrive_at_barrier(int predicate) {
    Block& b = block();
    b.accum_or |= predicate != 0;
    b.accum_and &= predicate != 0;
    b.accum_count += predicate != 0;
    b.progress = true;
    const uint64_t generation = b.barrier_generation;
    if (++b.barrier_arrived == b.num_live) {
        release_barrier(b);
        return;
    }
    while (b.barrier_generation == generation) yield();
}

Warp& warp_of(Block& b, unsigned linear) { return b.warps[linear / kWarpSize]; }

unsigned linear_thread(const Block& b, const uint3& idx) {
    return idx.x + b.job.block_dim.x * (idx.y + b.job.block_dim.y * idx.z);
}

// Completes the exchange `mask` when each of its lanes has arrived (or exited): every arrived lane of the mask
// gets a snapshot of the values and is released.
void try_complete_exchange(Warp& w, unsigned mask) {
    for (unsigned lane = 0; lane < kWarpSize; ++lane)
        if ((mask >> lane & 1u) && !w.arrived[lane] && !w.exited[lane]) return;
    for (unsigned lane = 0; lane < kWarpSize; ++lane) {
        if (!(mask >> lane & 1u) || !w.arrived[lane]) continue;
        for (unsigned src = 0; src < kWarpSize; ++src)
            w.result[lane][src] = ((mask >> src & 1u) && w.arrived[src]) ? w.value[src] : 0;
    }
    for (unsigned lane = 0; lane < kWarpSize; ++lane) {
        if (!(mask >> lane & 1u) || !w.arrived[lane]) continue;
        w.arrived[lane] = false;
        w.released[lane] = true;
    }
}

void fiber_exit() {
    Block& b = block();
    Fiber& f = current_fiber();
    f.done = true;
    --b.num_live;
    b.progress = true;
    // Exited threads no longer hold back a barrier or a warp collective (a GPU counts them as arrived).
    if (b.barrier_arrived > 0 && b.barrier_arrived == b.num_live) release_barrier(b);
    const unsigned linear = linear_thread(b, f.idx);
    Warp& w = warp_of(b, linear);
    w.exited[linear % kWarpSize] = true;
    for (unsigned lane = 0; lane < kWarpSize; ++lane)
        if (w.arrived[lane]) try_complete_exchange(w, w.mask[lane]);
    switch_context(f.context, b.scheduler);
    die("a finished fiber was resumed");
}

void fiber_main() {
    (*block().job.body)();
    fiber_exit();
}

void* allocate_stack() {
    void* memory = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                        -1, 0);
    if (memory == MAP_FAILED) die("cannot map a fiber stack");
    // A guard page below the stack: an overflow faults instead of corrupting the next fiber.
    mprotect(memory, kGuardBytes, PROT_NONE);
    return static_cast<char*>(memory) + kGuardBytes;
}

void run_block(Block& b) {
    const dim3 dim = b.job.block_dim;
    const int num_threads = static_cast<int>(dim.x * dim.y * dim.z);
    if (num_threads <= 0 || num_threads > static_cast<int>(kMaxThreadsPerBlock)) die("block size out of range");
    while (b.fibers.size() < static_cast<size_t>(num_threads)) {
        b.fibers.emplace_back();
        b.fibers.back().stack = allocate_stack();
    }
    const size_t num_warps = (static_cast<size_t>(num_threads) + kWarpSize - 1) / kWarpSize;
    if (b.warps.size() < num_warps) b.warps.resize(num_warps);
    for (size_t i = 0; i < num_warps; ++i) {
        Warp& w = b.warps[i];
        for (unsigned lane = 0; lane < kWarpSize; ++lane) {
            w.arrived[lane] = false;
            w.released[lane] = false;
            // Lanes past the block's last thread do not exist: they never hold a collective back.
            w.exited[lane] = i * kWarpSize + lane >= static_cast<size_t>(num_threads);
            w.mask[lane] = 0;
        }
    }
    const size_t smem_words = (b.job.dynamic_smem_bytes + sizeof(uint64_t) - 1) / sizeof(uint64_t);
    if (smem_words > b.smem_capacity) {
        b.smem.reset(new uint64_t[smem_words]);
        b.smem_capacity = smem_words;
    }
    b.num_threads = num_threads;
    b.num_live = num_threads;
    b.barrier_arrived = 0;
    b.accum_or = 0;
    b.accum_and = 1;
    b.accum_count = 0;
    for (int t = 0; t < num_threads; ++t) {
        Fiber& f = b.fibers[static_cast<size_t>(t)];
        const unsigned linear = static_cast<unsigned>(t);
        f.idx = uint3{linear % dim.x, linear / dim.x % dim.y, linear / (dim.x * dim.y)};
        f.done = false;
        make_context(f.context, f.stack, kStackBytes, fiber_main);
    }
    const Schedule schedule = schedule_setting().schedule;
    b.order.resize(static_cast<size_t>(num_threads));
    std::iota(b.order.begin(), b.order.end(), 0);
    if (schedule == Schedule::kReverse) std::reverse(b.order.begin(), b.order.end());
    int idle_sweeps = 0;
    while (b.num_live > 0) {
        b.progress = false;
        if (schedule == Schedule::kRandom) std::shuffle(b.order.begin(), b.order.end(), b.rng);
        for (const int t : b.order) {
            if (b.fibers[static_cast<size_t>(t)].done) continue;
            b.current = t;
            switch_context(b.scheduler, b.fibers[static_cast<size_t>(t)].context);
        }
        b.current = -1;
        if (b.progress) {
            idle_sweeps = 0;
        } else if (++idle_sweeps < kIdleSweepsBeforeSleep) {
            sched_yield();
        } else {
            const timespec pause{0, 20 * 1000};
            nanosleep(&pause, nullptr);
        }
    }
}

// ---- The worker pool ----------------------------------------------------------------------------------------------
struct Worker {
    std::mutex mutex;
    std::condition_variable wake;
    bool has_job = false;
    Job job;
    std::thread thread;
};

class Pool {
public:
    void run(dim3 grid, dim3 block_dim, size_t smem_bytes, const std::function<void()>& body) {
        std::lock_guard<std::mutex> launch_lock(launch_mutex_);
        const unsigned num_blocks = grid.x * grid.y * grid.z;
        if (num_blocks == 0) return;
        while (workers_.size() < num_blocks) start_worker();
        {
            std::lock_guard<std::mutex> lock(done_mutex_);
            num_running_ = num_blocks;
        }
        for (unsigned i = 0; i < num_blocks; ++i) {
            Worker& w = *workers_[i];
            std::lock_guard<std::mutex> lock(w.mutex);
            w.job = Job{&body, uint3{i % grid.x, i / grid.x % grid.y, i / (grid.x * grid.y)}, block_dim, grid, smem_bytes};
            w.has_job = true;
            w.wake.notify_one();
        }
        std::unique_lock<std::mutex> lock(done_mutex_);
        done_.wait(lock, [&] { return num_running_ == 0; });
    }

private:
    void start_worker() {
        workers_.push_back(std::make_unique<Worker>());
        Worker* w = workers_.back().get();
        const uint64_t worker_idx = workers_.size() - 1;
        w->thread = std::thread([this, w, worker_idx] { work(*w, worker_idx); });
        // The pool lives until the process exits; its idle threads must not keep it alive or be joined at exit.
        w->thread.detach();
    }

    void work(Worker& w, uint64_t worker_idx) {
        Block b;
        b.rng.seed(schedule_setting().seed ^ (worker_idx * 0x9E3779B97F4A7C15ull));
        t_block = &b;
        for (;;) {
            {
                std::unique_lock<std::mutex> lock(w.mutex);
                w.wake.wait(lock, [&] { return w.has_job; });
                b.job = w.job;
                w.has_job = false;
            }
            run_block(b);
            std::lock_guard<std::mutex> lock(done_mutex_);
            if (--num_running_ == 0) done_.notify_all();
        }
    }

    std::mutex launch_mutex_;
    std::vector<std::unique_ptr<Worker>> workers_;
    std::mutex done_mutex_;
    std::condition_variable done_;
    unsigned num_running_ = 0;
};

Pool& pool() {
    // Leaked on purpose: detached workers may still touch it while the process exits.
    static Pool* instance = new Pool();
    return *instance;
}

}  // namespace

void launch(dim3 grid, dim3 block_dim, size_t dynamic_smem_bytes, const std::function<void()>& body) {
    if (t_block != nullptr && t_block->current >= 0) die("a kernel launched another kernel");
    pool().run(grid, block_dim, dynamic_smem_bytes, body);
}

uint3 thread_idx() { return current_fiber().idx; }
uint3 block_idx() { return block().job.block_idx; }
dim3 block_dim() { return block().job.block_dim; }
dim3 grid_dim() { return block().job.grid_dim; }
bool in_kernel() { return t_block != nullptr && t_block->current >= 0; }
unsigned lane_id() { return linear_thread(block(), current_fiber().idx) % kWarpSize; }
unsigned warp_id() { return linear_thread(block(), current_fiber().idx) / kWarpSize; }

void block_sync() { arrive_at_barrier(1); }
int block_sync_or(int predicate) {
    arrive_at_barrier(predicate);
    return block().result_or;
}
int block_sync_and(int predicate) {
    arrive_at_barrier(predicate);
    return block().result_and;
}
int block_sync_count(int predicate) {
    arrive_at_barrier(predicate);
    return block().result_count;
}

const uint64_t* warp_exchange(unsigned mask, uint64_t value) {
    Block& b = block();
    const unsigned linear = linear_thread(b, current_fiber().idx);
    const unsigned lane = linear % kWarpSize;
    Warp& w = warp_of(b, linear);
    w.value[lane] = value;
    w.mask[lane] = mask | (1u << lane);
    w.arrived[lane] = true;
    w.released[lane] = false;
    b.progress = true;
    try_complete_exchange(w, w.mask[lane]);
    while (!w.released[lane]) yield();
    w.released[lane] = false;
    return w.result[lane];
}

void warp_sync(unsigned mask) { warp_exchange(mask, 0); }

void poll_yield() {
    if (in_kernel()) yield();
}

void* dynamic_smem() { return block().smem.get(); }

uint64_t global_timer_ns() {
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
            .count());
}

}  // namespace ep_emu
