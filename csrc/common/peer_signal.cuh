// Setting a 64-bit signal on an NVSHMEM PE, shared by the low-latency and internode kernels: a P2P-mapped peer
// (NVLink, or the same GPU) gets a release store through nvshmem_ptr, any other peer NVSHMEM's signal operation.
// Included by .cu files only (NVSHMEM device headers need relocatable device code).
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "ptx.cuh"

namespace ep {

// Sets a uint64 signal on `pe` (local_signal is the symmetric address). Ordering, the caller's duty: every store
// and put this signal announces is complete (nvshmem_quiet for puts) and fenced at system scope before this call.
// A P2P-mapped peer gets a release store (it polls with an acquire load); any other peer gets nvshmemx_signal_op,
// which NVSHMEM delivers after the puts this thread's quiet completed.
__device__ __forceinline__ void set_peer_signal(uint64_t* local_signal, uint64_t value, int pe) {
    uint64_t* peer_signal = static_cast<uint64_t*>(nvshmem_ptr(local_signal, pe));
    if (peer_signal != nullptr) {
        ptx::st_release_sys(peer_signal, value);
    } else {
        nvshmemx_signal_op(local_signal, value, NVSHMEM_SIGNAL_SET, pe);
    }
}

}  // namespace ep
