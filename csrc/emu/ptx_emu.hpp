// common/ptx.cuh for the CPU emulator: the same memory-order wrappers as GCC atomics with the same (or stronger)
// ordering. They act on memory that other processes map too (IPC buffers), which GCC's lock-free atomics allow.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "emu_device.hpp"

namespace ep::ptx {

// A GPU trap ends the context, and so every later CUDA call of the process: here the process ends, with what the
// kernel printed before it flushed.
[[noreturn]] inline void trap() {
    std::fflush(nullptr);
    std::abort();
}

inline uint64_t read_globaltimer() { return ep_emu::global_timer_ns(); }

inline int ld_acquire_sys(const int* ptr) { return __atomic_load_n(ptr, __ATOMIC_ACQUIRE); }
inline int ld_acquire_gpu(const int* ptr) { return __atomic_load_n(ptr, __ATOMIC_ACQUIRE); }
inline uint64_t ld_acquire_sys(const uint64_t* ptr) { return __atomic_load_n(ptr, __ATOMIC_ACQUIRE); }
inline int ld_volatile_global(const int* ptr) { return __atomic_load_n(ptr, __ATOMIC_RELAXED); }
inline int64_t ld_volatile_global(const int64_t* ptr) { return __atomic_load_n(ptr, __ATOMIC_RELAXED); }
inline int ld_relaxed_gpu(const int* ptr) { return __atomic_load_n(ptr, __ATOMIC_RELAXED); }

inline void st_release_sys(int* ptr, int value) { __atomic_store_n(ptr, value, __ATOMIC_RELEASE); }
inline void st_release_sys(uint64_t* ptr, uint64_t value) { __atomic_store_n(ptr, value, __ATOMIC_RELEASE); }
inline void st_release_gpu(int* ptr, int value) { __atomic_store_n(ptr, value, __ATOMIC_RELEASE); }
inline void st_relaxed_sys(int* ptr, int value) { __atomic_store_n(ptr, value, __ATOMIC_RELAXED); }
inline void red_add_release_sys(uint64_t* ptr, uint64_t value) { __atomic_fetch_add(ptr, value, __ATOMIC_RELEASE); }

inline int atomic_add_release_sys(int* ptr, int value) { return __atomic_fetch_add(ptr, value, __ATOMIC_RELEASE); }
inline int atomic_add_release_gpu(int* ptr, int value) { return __atomic_fetch_add(ptr, value, __ATOMIC_RELEASE); }
inline int atomic_add_acq_rel_sys(int* ptr, int value) { return __atomic_fetch_add(ptr, value, __ATOMIC_ACQ_REL); }

inline int atomic_cas_acquire_sys(int* ptr, int expected, int desired) {
    __atomic_compare_exchange_n(ptr, &expected, desired, false, __ATOMIC_ACQUIRE, __ATOMIC_ACQUIRE);
    return expected;
}

inline void fence_acq_rel_sys() { __atomic_thread_fence(__ATOMIC_ACQ_REL); }
inline void fence_acq_rel_gpu() { __atomic_thread_fence(__ATOMIC_ACQ_REL); }

inline int4 ld_nc_no_allocate(const int4* ptr) {
    int4 v;
    std::memcpy(&v, ptr, sizeof(v));
    return v;
}

inline void st_no_allocate(int4* ptr, const int4& v) { std::memcpy(ptr, &v, sizeof(v)); }

}  // namespace ep::ptx
