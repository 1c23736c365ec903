// The barrier of clean_low_latency_buffer (low_latency.hpp, masked_barrier). A host barrier over the
// torch.distributed group would wait for a dead rank until the group's own timeout (30 minutes by default); this
// one leaves out the masked ranks and, past DEEP_EP_PY_TIMEOUT_S, masks a rank that does not arrive (enable_shrink,
// as DeepEP's shrink mode, so the ranks left clean their buffers and go on) or records the timeout for the host to
// raise.
//
// sync_words is a symmetric uint64 [R] outside the buffer the clean zeroes: word p on rank r holds the epoch of
// the last barrier p announced to r. Epochs only grow, so a word is never reset and a late announcement of an
// earlier barrier cannot be taken for a later one. The host numbers them by clean (2k + 1 and 2k + 2 for the k-th),
// so ranks stay in step even after a clean that raised part-way on some of them.
#include <cuda_runtime.h>

#include "../common/exception.hpp"
#include "../common/launch.cuh"
#include "device_common.cuh"
#include "low_latency.hpp"

namespace ep::low_latency {

namespace {

__global__ void __launch_bounds__(kNumThreadsPerBlock)
    masked_barrier_kernel(uint64_t* sync_words, uint64_t epoch, int* rank_mask, int rank, int num_ranks,
                          const Launch launch) {
    // The host synchronized before the launch: every earlier kernel of this rank has ended. Their last signal ops
    // (nvshmemx_signal_op after the quiet of their rows) may still be in flight to network peers, on other queues
    // than this barrier's: they complete before the announcement, so none lands after a peer's zeroing.
    if (threadIdx.x == 0) nvshmem_quiet();
    __syncthreads();
    for (int peer = static_cast<int>(threadIdx.x); peer < num_ranks; peer += kNumThreadsPerBlock) {
        if (peer == rank || rank_is_masked(rank_mask, peer)) continue;
        set_peer_signal(sync_words + rank, mapped_peer(launch, sync_words + rank, peer, rank), epoch, peer);
    }
    for (int peer = static_cast<int>(threadIdx.x); peer < num_ranks; peer += kNumThreadsPerBlock) {
        if (peer == rank || rank_is_masked(rank_mask, peer)) continue;
        TimeoutContext ctx = timeout_context(launch, rank, peer);
        if (launch.mask_on_timeout) ctx.mask_on_timeout = rank_mask + peer;  // masked, and the barrier goes on
        const uint64_t* word = sync_words + peer;
        (void)timeout_while([&] { return ptx::ld_acquire_sys(word) < epoch; }, ctx, WaitSite::kLowLatencyBarrier);
    }
    // The peers' puts into this rank's buffer completed before they arrived; NVSHMEM's consistency step makes those
    // that came over the network visible here before the clean overwrites them (or the next call reads its own).
    __syncthreads();
    if (threadIdx.x == 0) settle_network_writes(sync_words);
}

}  // namespace

void masked_barrier(uint64_t* sync_words, uint64_t epoch, int* rank_mask, int rank, int num_ranks,
                    const Launch& launch) {
    EP_HOST_ASSERT(sync_words != nullptr);
    EP_HOST_ASSERT(rank_mask != nullptr);
    EP_HOST_ASSERT(epoch > 0);
    EP_HOST_ASSERT(num_ranks > 0);
    EP_HOST_ASSERT(rank >= 0);
    EP_HOST_ASSERT(rank < num_ranks);
    EP_HOST_ASSERT(launch.error_record != nullptr);
    launch_kernel(LaunchConfig{dim3(1), dim3(kNumThreadsPerBlock), 0, launch.stream, false}, masked_barrier_kernel,
                  sync_words, epoch, rank_mask, rank, num_ranks, launch);
}

}  // namespace ep::low_latency
