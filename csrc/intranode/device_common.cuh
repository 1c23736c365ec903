// Device helpers of the intranode kernels: the cross-rank barrier (the work split and row copies are in
// common/rounds.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/error_record.hpp"
#include "../common/launch.cuh"
#include "../common/ptx.cuh"
#include "../common/rounds.cuh"
#include "../common/timeout.cuh"
#include "intranode.hpp"

namespace ep::intranode {

constexpr int kBarrierThreads = 32;  // >= kMaxRanks: one thread per peer
static_assert(kBarrierThreads >= kMaxRanks, "one barrier thread per rank");

inline TimeoutContext make_timeout_context(const PeerBuffers& peers, const WaitConfig& wait) {
    return TimeoutContext{wait.record, wait.timeout_ns, peers.rank, -1, wait.trap_on_error};
}

// Host checks every launcher makes on the peer table.
inline void check_peers(const PeerBuffers& peers) {
    EP_HOST_ASSERT(peers.num_ranks >= 1);
    EP_HOST_ASSERT_MSG(peers.num_ranks <= kMaxRanks, "intranode kernels support at most ", kMaxRanks, " ranks");
    EP_HOST_ASSERT(peers.rank >= 0);
    EP_HOST_ASSERT(peers.rank < peers.num_ranks);
    EP_HOST_ASSERT_MSG(peers.num_bytes > kStagingOffset, "the buffer must hold the control area (", kStagingOffset,
                       " bytes) and a staging area");
    for (int r = 0; r < peers.num_ranks; ++r) EP_HOST_ASSERT_MSG(peers.base[r] != nullptr, "rank ", r, " not mapped");
}

// Whether this call's rows go by the one-copy path: the note the publish kernel (launch_publish) left in the own
// control area, earlier on this stream. Only for launches that ran the publish kernel.
__device__ __forceinline__ bool one_copy_noted(const PeerBuffers& peers) {
    return ptx::ld_volatile_global(&control_area(peers.base[peers.rank])->one_copy) != 0;
}

// Host checks of a one-copy launch: every rank's arena mapped; this rank's block (if any) holds num_rows rows whose
// x starts 16-byte aligned (the kernels move rows in 16-byte chunks). A block of no rows may have no x at all
// (torch gives empty tensors a null data pointer, even views into the arena); no rank reads it.
inline void check_one_copy(const PeerBuffers& peers, void* const* recv_arenas, const RecvBlock& block, int num_rows) {
    for (int r = 0; r < peers.num_ranks; ++r)
        EP_HOST_ASSERT_MSG(recv_arenas[r] != nullptr, "receive arena of rank ", r, " not mapped");
    if (block.num_rows < 0) return;
    EP_HOST_ASSERT(block.num_rows == num_rows);
    if (num_rows == 0) return;
    EP_HOST_ASSERT_MSG((block.x >= 0 && block.x % 16 == 0), "rows must start 16-byte aligned in the arena");
}

// One-copy publish (one block, notify.cu): this rank's block goes into its control area, a barrier, then the note of
// whether every rank published one (num_rows >= 0). Every rank reads the same blocks, so every rank notes the same.
void launch_publish(const PeerBuffers& peers, const RecvBlock& block, const WaitConfig& wait, cudaStream_t stream);

// One block running cross_rank_barrier (notify.cu); with skip_when_one_copy, none when the publish kernel of this
// one-copy dispatch noted that its rows go by the one-copy path (the rounds' barriers then have nothing to order);
// with num_rounds_device, none in a round past the count (round_is_live).
void launch_barrier(const PeerBuffers& peers, const WaitConfig& wait, WaitSite site, cudaStream_t stream,
                    bool skip_when_one_copy = false, const int* num_rounds_device = nullptr, int round = 0);

// Whether a barrier flag shows epoch `epoch` or a later one. Epochs count barriers modulo 2^32, and a long job
// passes 2^31 of them (hours of back-to-back calls at microseconds a barrier): "later" is the sign of the wrapped
// difference, where a signed `<` would let every barrier past 2^31 through without its peers. Right while two
// ranks' epochs are under 2^31 apart: a rank waits for every peer at each barrier, and one that gave up runs ahead
// only by the barriers its host launches before it raises.
__device__ __forceinline__ bool epoch_reached(int flag, int epoch) {
    return static_cast<int>(static_cast<unsigned>(flag) - static_cast<unsigned>(epoch)) >= 0;
}

// Epoch barrier over all ranks, run by every thread of one block (blockDim.x >= num_ranks).
//
// Protocol: the owner increments its local_epoch (barriers are entered in the same order on every rank, so the
// n-th barrier has epoch n everywhere); thread p release-stores the epoch into barrier_flags[me] of rank p's
// control area, then acquire-polls barrier_flags[p] of its own area until rank p's epoch there is ours or later
// (epoch_reached). A flag only moves forward, so no reset is needed and a fast peer already signalling the next
// epoch passes the check too.
// Ordering: every thread fences (sys) its own earlier writes, and the copy kernels before it ended with
// release_peer_writes (common/rounds.cuh), before any flag is released; the acquires, then __syncthreads, order the caller's later reads.
// Giving up: a rank whose wait fails (it timed out, or drained on its record) goes on through its later barriers
// without waiting, so its flags run ahead of a peer that is late but alive, which would pass them at once on
// arrival. So a barrier that fails stores 1 into aborted[me] of every peer's control area, and thread p stops, and
// fails with a kIntranodePeerAborted record naming p as the channel, once aborted[p] is set in its own area, be
// rank p's flag behind or ahead. The store is fenced before this rank's later flags (below, and each barrier fences
// before its flags), so a peer that acquires any of them sees it. Each thread watches its own peer's word only: its
// record (timed_out) drains the block's other waits at once, and a rank still waiting for a missing peer names that
// one rather than another rank that gave up on the same peer a moment earlier.
// Returns false when a wait timed out or a peer gave up (the record names this rank, that peer as the channel, and
// `site` or kIntranodePeerAborted); the epochs are then out of step for good and the buffer must be recreated.
__device__ __forceinline__ bool cross_rank_barrier(const PeerBuffers& peers, TimeoutContext ctx, WaitSite site) {
    __shared__ int s_epoch;
    __shared__ int s_ok;
    // Every thread, not only the one that releases the flag: a copy kernel before this one wrote peer memory with
    // weak stores and one fence a thread (release_peer_writes); fence.sc orders against fence.sc, so these fences
    // are what makes those stores reach a peer before it sees the flag.
    __threadfence_system();
    __syncthreads();
    ControlArea* own = control_area(peers.base[peers.rank]);
    if (threadIdx.x == 0) {
        // Volatile: the previous barrier kernel (maybe on another SM) wrote it; never trust a cached line. Unsigned:
        // the count wraps (epoch_reached) where a signed increment would overflow.
        const int epoch = static_cast<int>(static_cast<unsigned>(ptx::ld_volatile_global(&own->local_epoch)) + 1u);
        own->local_epoch = epoch;
        s_epoch = epoch;
        s_ok = 1;
    }
    __syncthreads();
    const int epoch = s_epoch;
    const int peer = static_cast<int>(threadIdx.x);
    if (peer < peers.num_ranks) {
        ptx::st_release_sys(&control_area(peers.base[peer])->barrier_flags[peers.rank], epoch);
        const int* flag = &own->barrier_flags[peer];
        const int* peer_aborted = &own->aborted[peer];
        ctx.channel = peer;
        const uint64_t start_ns = ptx::read_globaltimer();
        const auto keep_waiting = [&] {
            return !epoch_reached(ptx::ld_acquire_sys(flag), epoch) && ptx::ld_volatile_global(peer_aborted) == 0;
        };
        const bool waited = timeout_while(keep_waiting, ctx, site);
        if (!waited) {
            s_ok = 0;
        } else if (ptx::ld_acquire_sys(peer_aborted) != 0) {
            record_device_timeout(ctx, WaitSite::kIntranodePeerAborted, ptx::read_globaltimer() - start_ns);
            s_ok = 0;
        }
    }
    __syncthreads();
    const bool ok = s_ok != 0;
    if (!ok && peer < peers.num_ranks && peer != peers.rank) {
        ptx::st_release_sys(&control_area(peers.base[peer])->aborted[peers.rank], 1);
        __threadfence_system();  // before this rank's later flags, which another kernel's threads store
    }
    return ok;
}

}  // namespace ep::intranode
