// Setting a 64-bit signal on an NVSHMEM PE, and completing a block's puts, shared by the low-latency and internode
// kernels: a P2P-mapped peer (NVLink, or the same GPU) gets a release store through nvshmem_ptr, any other peer
// NVSHMEM's signal operation.
// Included by .cu files only (NVSHMEM device headers need relocatable device code).
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "ptx.cuh"

namespace ep {

// Sets a uint64 signal on `pe` (local_signal is the symmetric address). Ordering, the caller's duty: every store
// and put this signal announces is complete (quiet_block_puts) and fenced at system scope before this call.
// A P2P-mapped peer gets a release store (it polls with an acquire load); any other peer gets nvshmemx_signal_op,
// which NVSHMEM delivers after the puts a quiet ordered before it completed.
__device__ __forceinline__ void set_peer_signal(uint64_t* local_signal, uint64_t value, int pe) {
    uint64_t* peer_signal = static_cast<uint64_t*>(nvshmem_ptr(local_signal, pe));
    if (peer_signal != nullptr) {
        ptx::st_release_sys(peer_signal, value);
    } else {
        nvshmemx_signal_op(local_signal, value, NVSHMEM_SIGNAL_SET, pe);
    }
}

// Completes the non-blocking puts every warp of the block issued (issued_puts: this thread's warp issued some). A
// quiet completes all of the PE's puts whoever issued them, so one thread quiets once all warps have issued theirs,
// instead of each thread doing it: over IBGDA a quiet polls every queue pair. A block barrier: every thread calls it;
// what needs the puts complete must follow a later barrier, or run in thread 0.
__device__ __forceinline__ void quiet_block_puts(bool issued_puts) {
    if (__syncthreads_or(issued_puts) && threadIdx.x == 0) nvshmem_quiet();
}

}  // namespace ep
