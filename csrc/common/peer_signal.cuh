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

// Sets a uint64 signal on `pe` (local_signal is the symmetric address; peer_signal its P2P mapping on `pe`, or null
// for NVSHMEM's signal). Ordering, the caller's duty: every store and put this signal announces is complete
// (quiet_block_puts) and fenced at system scope before this call. A P2P-mapped peer gets a release store (it polls
// with an acquire load); any other peer gets nvshmemx_signal_op, which NVSHMEM delivers after the puts a quiet
// ordered before it completed.
__device__ __forceinline__ void set_peer_signal(uint64_t* local_signal, uint64_t* peer_signal, uint64_t value, int pe) {
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

// Makes the writes that reached this PE over the network visible to it, after a poll saw the word announcing them.
// NVSHMEM's own wait and test calls end with this step, which an acquire-load poll skips: where a peer writes
// through the proxy (IBRC, UCX), or IBGDA runs on a platform that may reorder the NIC's writes, it enforces
// consistency at this PE (elsewhere it is only a fence). It covers every write that arrived before it, so one
// thread makes it once, after the block's polls (ordered before it by a barrier) and before the barrier that hands
// the rows on. Rows from P2P-mapped peers need no such step: their stores are visible once their release is seen.
// The test's condition always holds (a uint64 is >= 0): the call is made for its consistency step.
__device__ __forceinline__ void settle_network_writes(const uint64_t* polled_word) {
    (void)nvshmem_uint64_test(const_cast<uint64_t*>(polled_word), NVSHMEM_CMP_GE, 0);
}

}  // namespace ep
