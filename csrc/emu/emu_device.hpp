// The CUDA device language as g++ sees it in the CPU emulator (deep_ep_py._C_emu, built with DEEP_EP_PY_EMULATE).
//
// Why: the kernels in csrc/ must be checkable on machines without a GPU (CI, most sessions). The emulator compiles
// the same sources as host C++ and runs a launch synchronously: every block is an OS thread (so blocks that spin on
// each other all make progress, as a cooperative launch guarantees), every CUDA thread a fiber on its block's thread
// (so __shared__ is per block: `static thread_local`). Fibers switch only at __syncthreads, warp collectives and
// spin-wait polls, which is where a GPU thread may wait on another.
//
// What it cannot show: speed, and memory-ordering bugs the GPU's weaker model would expose (x86 is TSO, so a missing
// fence goes unnoticed here). What it does show: indexing, protocol order, counts, every row's bytes.
#pragma once

#include <vector_types.h>  // dim3, uint3, int4, float2 (the toolkit's; this also pulls in crt/host_defines.h)
#include <vector_functions.h>  // make_int4, make_float2, ...

#include <math.h>  // fabsf, fmaxf, exp2f, ...: CUDA's device math functions are the C ones, unqualified

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

// host_defines.h leaves these empty for a host compiler; the emulator needs shared memory per block.
#undef __shared__
#define __shared__ static thread_local
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace ep_emu {

// What fresh emulated allocations (cudaMalloc, cudaHostAlloc, nvshmem_align) hold. A GPU's fresh memory holds
// whatever was there before, not zeros, so code that reads memory it never wrote must fail here too rather than
// pass on the zero pages of a new mapping. 0x7F bytes read as int 2139062143 (past any index or count) and as
// float and bf16 3.4e38 (a sum that takes one in overflows), and as no flag, epoch or -1 sentinel the kernels use.
constexpr unsigned char kUninitializedByte = 0x7F;

// Runs `body` as every thread of a grid-by-block launch and returns when all have finished (launches are
// synchronous: a stream is always idle between calls). One launch at a time per process.
void launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes, const std::function<void()>& body);

// The emulated thread's coordinates (valid only inside a launch).
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
bool in_kernel();
unsigned lane_id();
unsigned warp_id();

void block_sync();
int block_sync_or(int predicate);
int block_sync_and(int predicate);
int block_sync_count(int predicate);
// Rendezvous of the lanes in `mask` (the calling lane included); returns every lane's `value` (index by lane; lanes
// outside the mask or already exited read 0). The array stays valid until this lane's next warp collective.
const uint64_t* warp_exchange(unsigned mask, uint64_t value);
void warp_sync(unsigned mask);
// Called in every spin loop: lets the other fibers of this block run (and, when the whole block only waits, the OS
// schedule other blocks and processes).
void poll_yield();
void* dynamic_smem();
uint64_t global_timer_ns();

template <typename T>
uint64_t to_bits(T value) {
    static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
    T value;
    std::memcpy(&value, &bits, sizeof(T));
    return value;
}

}  // namespace ep_emu

#define threadIdx (::ep_emu::thread_idx())
#define blockIdx (::ep_emu::block_idx())
#define blockDim (::ep_emu::block_dim())
#define gridDim (::ep_emu::grid_dim())
#define warpSize 32

inline void __syncthreads() { ep_emu::block_sync(); }
inline int __syncthreads_or(int predicate) { return ep_emu::block_sync_or(predicate); }
inline int __syncthreads_and(int predicate) { return ep_emu::block_sync_and(predicate); }
inline int __syncthreads_count(int predicate) { return ep_emu::block_sync_count(predicate); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ep_emu::warp_sync(mask); }

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
    const uint64_t* values = ep_emu::warp_exchange(mask, ep_emu::to_bits(value));
    const unsigned lane = ep_emu::lane_id();
    const unsigned base = lane & ~static_cast<unsigned>(width - 1);
    return ep_emu::from_bits<T>(values[base + (static_cast<unsigned>(src_lane) % static_cast<unsigned>(width))]);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
    const uint64_t* values = ep_emu::warp_exchange(mask, ep_emu::to_bits(value));
    const unsigned lane = ep_emu::lane_id();
    const unsigned src = lane ^ static_cast<unsigned>(lane_mask);
    // Outside the lane's width-segment the lane keeps its own value, as on the GPU.
    const bool same_segment = (src / static_cast<unsigned>(width)) == (lane / static_cast<unsigned>(width));
    return ep_emu::from_bits<T>(values[same_segment ? src : lane]);
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
    const uint64_t* values = ep_emu::warp_exchange(mask, ep_emu::to_bits(value));
    const unsigned lane = ep_emu::lane_id();
    const unsigned in_segment = lane % static_cast<unsigned>(width);
    return ep_emu::from_bits<T>(values[in_segment + delta < static_cast<unsigned>(width) ? lane + delta : lane]);
}

template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = 32) {
    const uint64_t* values = ep_emu::warp_exchange(mask, ep_emu::to_bits(value));
    const unsigned lane = ep_emu::lane_id();
    const unsigned in_segment = lane % static_cast<unsigned>(width);
    return ep_emu::from_bits<T>(values[in_segment >= delta ? lane - delta : lane]);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
    const uint64_t* values = ep_emu::warp_exchange(mask, predicate != 0 ? 1 : 0);
    unsigned result = 0;
    for (unsigned lane = 0; lane < 32; ++lane)
        if ((mask >> lane & 1u) && values[lane] != 0) result |= 1u << lane;
    return result;
}

inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }

template <typename T>
unsigned __match_any_sync(unsigned mask, T value) {
    const uint64_t* values = ep_emu::warp_exchange(mask, ep_emu::to_bits(value));
    const uint64_t mine = values[ep_emu::lane_id()];
    unsigned result = 0;
    for (unsigned lane = 0; lane < 32; ++lane)
        if ((mask >> lane & 1u) && values[lane] == mine) result |= 1u << lane;
    return result;
}

inline unsigned __activemask() { return 0xffffffffu; }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline unsigned __float_as_uint(float x) { return ep_emu::from_bits<unsigned>(ep_emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return ep_emu::from_bits<float>(x); }
inline int __float_as_int(float x) { return ep_emu::from_bits<int>(ep_emu::to_bits(x)); }
inline float __int_as_float(int x) { return ep_emu::from_bits<float>(static_cast<unsigned>(x)); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }

inline void __nanosleep(unsigned) { ep_emu::poll_yield(); }
inline long long clock64() { return static_cast<long long>(ep_emu::global_timer_ns()); }

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// Device atomics: GCC builtins, which also work on memory shared with other processes (IPC-mapped buffers).
template <typename T>
T atomicAdd(T* address, T value) {
    if constexpr (std::is_floating_point_v<T>) {
        T expected = __atomic_load_n(address, __ATOMIC_RELAXED);
        T desired;
        do {
            desired = expected + value;
        } while (!__atomic_compare_exchange(address, &expected, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
        return expected;
    } else {
        return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
    }
}
template <typename T>
T atomicSub(T* address, T value) {
    return __atomic_fetch_sub(address, value, __ATOMIC_SEQ_CST);
}
template <typename T>
T atomicOr(T* address, T value) {
    return __atomic_fetch_or(address, value, __ATOMIC_SEQ_CST);
}
template <typename T>
T atomicAnd(T* address, T value) {
    return __atomic_fetch_and(address, value, __ATOMIC_SEQ_CST);
}
template <typename T>
T atomicExch(T* address, T value) {
    return __atomic_exchange_n(address, value, __ATOMIC_SEQ_CST);
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
    __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;
}
template <typename T>
T atomicMax(T* address, T value) {
    T old = __atomic_load_n(address, __ATOMIC_RELAXED);
    while (old < value &&
           !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
template <typename T>
T atomicMin(T* address, T value) {
    T old = __atomic_load_n(address, __ATOMIC_RELAXED);
    while (value < old &&
           !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}

// Cache-hinted loads and stores: plain accesses here.
template <typename T>
T __ldg(const T* ptr) {
    return *ptr;
}
template <typename T>
T __ldcg(const T* ptr) {
    return *ptr;
}
template <typename T>
T __ldcs(const T* ptr) {
    return *ptr;
}
template <typename T>
T __ldca(const T* ptr) {
    return *ptr;
}
template <typename T>
void __stcg(T* ptr, T value) {
    *ptr = value;
}
template <typename T>
void __stcs(T* ptr, T value) {
    *ptr = value;
}
template <typename T>
void __stwt(T* ptr, T value) {
    *ptr = value;
}

// `extern __shared__ T name[]` has no host spelling: kernels declare dynamic shared memory through this.
#define EP_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::ep_emu::dynamic_smem())

// CUDA's device min/max for integers and floats (unqualified in kernels).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a < b ? b : a; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a < b ? b : a; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a < b ? b : a; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a < b ? b : a; }
inline float min(float a, float b) { return a < b ? a : b; }
inline float max(float a, float b) { return a < b ? b : a; }
