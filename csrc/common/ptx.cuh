// Memory-order wrappers, named for their semantics.
//
// The protocol rule these encode: a producer writes its payload with plain (or non-allocating) stores, then
// publishes with a release store/atomic on the flag; a consumer polls the flag with an acquire load, and only then
// reads the payload. `_sys` scope is needed when the other side is the host or a peer GPU (host-mapped or
// IPC-mapped memory); `_gpu` is enough between blocks of one GPU.
#pragma once

#include <cstdint>

#ifdef DEEP_EP_PY_EMULATE
#include "../emu/ptx_emu.hpp"
#else

namespace ep::ptx {

// Ends the kernel and the CUDA context: the host sees cudaErrorLaunchFailure at its next CUDA call.
__device__ __forceinline__ void trap() { asm volatile("trap;"); }

// Nanoseconds from the global timer (same clock on all SMs of a GPU).
__device__ __forceinline__ uint64_t read_globaltimer() {
    uint64_t ns;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
    return ns;
}

__device__ __forceinline__ int ld_acquire_sys(const int* ptr) {
    int value;
    asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

__device__ __forceinline__ int ld_acquire_gpu(const int* ptr) {
    int value;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* ptr) {
    uint64_t value;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
    return value;
}

__device__ __forceinline__ int ld_volatile_global(const int* ptr) {
    int value;
    asm volatile("ld.volatile.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

__device__ __forceinline__ int64_t ld_volatile_global(const int64_t* ptr) {
    int64_t value;
    asm volatile("ld.volatile.global.s64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
    return value;
}

__device__ __forceinline__ void st_release_sys(int* ptr, int value) {
    asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

__device__ __forceinline__ void st_release_sys(uint64_t* ptr, uint64_t value) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

__device__ __forceinline__ void red_add_release_sys(uint64_t* ptr, uint64_t value) {
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

__device__ __forceinline__ int ld_relaxed_gpu(const int* ptr) {
    int value;
    asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

__device__ __forceinline__ void st_release_gpu(int* ptr, int value) {
    asm volatile("st.release.gpu.global.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

__device__ __forceinline__ void st_relaxed_sys(int* ptr, int value) {
    asm volatile("st.relaxed.sys.global.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

__device__ __forceinline__ int atomic_add_release_sys(int* ptr, int value) {
    int old;
    asm volatile("atom.add.release.sys.global.s32 %0, [%1], %2;" : "=r"(old) : "l"(ptr), "r"(value) : "memory");
    return old;
}

__device__ __forceinline__ int atomic_add_release_gpu(int* ptr, int value) {
    int old;
    asm volatile("atom.add.release.gpu.global.s32 %0, [%1], %2;" : "=r"(old) : "l"(ptr), "r"(value) : "memory");
    return old;
}

__device__ __forceinline__ int atomic_add_acq_rel_sys(int* ptr, int value) {
    int old;
    asm volatile("atom.add.acq_rel.sys.global.s32 %0, [%1], %2;" : "=r"(old) : "l"(ptr), "r"(value) : "memory");
    return old;
}

// Compare-and-swap with system scope, acquire ordering: the claim of a word whose winner then writes fields that
// another agent (the host) cleared before it released the word, and publishes them separately.
__device__ __forceinline__ int atomic_cas_acquire_sys(int* ptr, int expected, int desired) {
    int old;
    asm volatile("atom.cas.acquire.sys.global.b32 %0, [%1], %2, %3;"
                 : "=r"(old)
                 : "l"(ptr), "r"(expected), "r"(desired)
                 : "memory");
    return old;
}

__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

// 16-byte load through the non-coherent path without L1 allocation: for data read once and written by nobody
// during this kernel (e.g. the input tokens).
__device__ __forceinline__ int4 ld_nc_no_allocate(const int4* ptr) {
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
    return v;
}

// 16-byte store that does not allocate in L1: for payload written once and read by another GPU/kernel.
__device__ __forceinline__ void st_no_allocate(int4* ptr, const int4& v) {
    asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z),
                 "r"(v.w)
                 : "memory");
}

}  // namespace ep::ptx

#endif  // DEEP_EP_PY_EMULATE
