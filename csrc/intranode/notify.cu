// Notify of an intranode dispatch (send positions, counts to every peer, rank_prefix_matrix, the host's counts) and
// the barrier kernel the rounds use.
#include <cuda_runtime.h>

#include "../common/exception.hpp"
#include "../common/launch.cuh"
#include "../common/send_positions.cuh"
#include "../common/worst_tokens.cuh"
#include "device_common.cuh"
#include "intranode.hpp"

namespace ep::intranode {

namespace {

constexpr int kNotifyThreads = 256;

// One block per destination rank d (send_positions_block with one rank per destination).
__global__ void __launch_bounds__(kSendPositionsThreads)
    send_positions_kernel(const bool* is_token_in_rank, int num_tokens, int num_ranks, int* send_pos, int* send_list,
                          int* send_counts) {
    send_positions_block(is_token_in_rank, num_tokens, num_ranks, 1, static_cast<int>(blockIdx.x), num_ranks,
                         send_pos, send_list, send_counts);
}

struct NotifyParams {
    PeerBuffers peers;
    const int* send_counts;            // [R], from send_positions_kernel
    const int* num_tokens_per_expert;  // [R * L]
    int num_local_experts;
    int expert_alignment;
    int rows_per_round;
    int max_rounds;
    int* rank_prefix_matrix;  // [R, R]
    int* num_rounds_device;   // [1]
    int* host_counters;       // kNumHostCounters ints (device view of host memory), or nullptr
    int host_sequence;
    int num_worst_tokens;
    TimeoutContext timeout;
};

// One block. Writes this rank's row of the count matrix and its per-expert counts into every rank's control area,
// meets the others at a barrier, then reads what every rank wrote into its own area.
__global__ void __launch_bounds__(kNotifyThreads) notify_dispatch_kernel(NotifyParams p) {
    const int num_ranks = p.peers.num_ranks;
    const int rank = p.peers.rank;
    const int num_local = p.num_local_experts;
    const int tid = static_cast<int>(threadIdx.x);

    for (int i = tid; i < num_ranks * num_ranks; i += kNotifyThreads) {
        const int dst = i / num_ranks, col = i % num_ranks;
        control_area(p.peers.base[dst])->send_counts[rank][col] = p.send_counts[col];
    }
    for (int i = tid; i < num_ranks * num_local; i += kNotifyThreads) {
        const int dst = i / num_local, local_expert = i % num_local;
        control_area(p.peers.base[dst])->expert_counts[rank][local_expert] = p.num_tokens_per_expert[i];
    }
    for (int dst = tid; dst < num_ranks; dst += kNotifyThreads)
        control_area(p.peers.base[dst])->worst_tokens[rank] = p.num_worst_tokens;
    if (!cross_rank_barrier(p.peers, p.timeout, WaitSite::kIntranodeNotifyBarrier)) {
        // The copy kernels queued behind this one read the matrix even now (with num_worst_tokens > 0 the host does
        // not wait for the counts): zeros, no rows from anyone, rather than the leftover memory of torch.empty,
        // which could point them outside the tensors. No rounds either: the barrier told every peer that this rank
        // gave up, so theirs fail at once without this rank's.
        if (tid == 0) *p.num_rounds_device = 0;
        for (int i = tid; i < num_ranks * num_ranks; i += kNotifyThreads) p.rank_prefix_matrix[i] = 0;
        return;
    }

    // Volatile loads: the values were written by other GPUs/processes, after this kernel started.
    ControlArea* own = control_area(p.peers.base[rank]);
    for (int i = tid; i < num_ranks * num_ranks; i += kNotifyThreads) {
        const int src = i / num_ranks, dst = i % num_ranks;
        int sum = 0;
        for (int s = 0; s <= src; ++s) sum += ptx::ld_volatile_global(&own->send_counts[s][dst]);
        p.rank_prefix_matrix[i] = sum;
    }
    __syncthreads();  // the matrix's last row, every rank's received rows, is read below
    check_worst_tokens(
        p.timeout, num_ranks, kNotifyThreads, p.num_worst_tokens,
        [&](int r) { return ptx::ld_volatile_global(&own->worst_tokens[r]); },
        p.rank_prefix_matrix + (num_ranks - 1) * num_ranks, WaitSite::kWorstTokensIntranode);
    int num_rounds = 0;  // thread 0's, which writes it here and into the host counters below
    if (tid == 0) {
        int max_count = 0;
        for (int s = 0; s < num_ranks; ++s)
            for (int d = 0; d < num_ranks; ++d)
                max_count = max(max_count, ptx::ld_volatile_global(&own->send_counts[s][d]));
        // At least one round: its barriers keep a fast peer's next notify from overwriting the counts read above.
        // At most max_rounds, the rounds launched: that many hold every row while each rank receives at most
        // num_worst_tokens, and past it check_worst_tokens has recorded the overflow on every rank.
        num_rounds = min(max(1, (max_count + p.rows_per_round - 1) / p.rows_per_round), p.max_rounds);
        *p.num_rounds_device = num_rounds;
    }
    if (p.host_counters == nullptr) return;

    for (int local_expert = tid; local_expert < num_local; local_expert += kNotifyThreads) {
        int sum = 0;
        for (int s = 0; s < num_ranks; ++s) sum += ptx::ld_volatile_global(&own->expert_counts[s][local_expert]);
        const int aligned = (sum + p.expert_alignment - 1) / p.expert_alignment * p.expert_alignment;
        p.host_counters[kCounterExpertBase + local_expert] = aligned;
    }
    if (tid == 0) {
        int num_recv_tokens = 0;
        for (int s = 0; s < num_ranks; ++s) num_recv_tokens += ptx::ld_volatile_global(&own->send_counts[s][rank]);
        p.host_counters[kCounterNumRecvTokens] = num_recv_tokens;
        p.host_counters[kCounterNumRounds] = num_rounds;
    }
    // Every value reaches host memory before the sequence number that tells the host they are fresh.
    __threadfence_system();
    __syncthreads();
    if (tid == 0) ptx::st_release_sys(&p.host_counters[kCounterSequence], p.host_sequence);
}

__global__ void __launch_bounds__(kBarrierThreads)
    barrier_kernel(PeerBuffers peers, TimeoutContext timeout, WaitSite site, bool skip_when_one_copy,
                   const int* num_rounds_device, int round) {
    // The note and the round count are the same on every rank (publish_kernel, notify_dispatch_kernel), so every
    // rank skips the same barriers and the epochs stay in step.
    if (skip_when_one_copy && one_copy_noted(peers)) return;
    if (num_rounds_device != nullptr && !round_is_live(num_rounds_device, round)) return;
    cross_rank_barrier(peers, timeout, site);
}

__global__ void __launch_bounds__(kBarrierThreads)
    publish_kernel(PeerBuffers peers, RecvBlock block, TimeoutContext timeout) {
    ControlArea* own = control_area(peers.base[peers.rank]);
    if (threadIdx.x == 0) own->recv_block = block;
    // The barrier fences the store above before this rank's arrival is visible.
    const bool arrived = cross_rank_barrier(peers, timeout, WaitSite::kIntranodePublishBarrier);
    if (threadIdx.x == 0) {
        int every_rank_has_a_block = arrived ? 1 : 0;
        for (int r = 0; r < peers.num_ranks && every_rank_has_a_block; ++r)
            every_rank_has_a_block = ptx::ld_volatile_global(&control_area(peers.base[r])->recv_block.num_rows) >= 0;
        own->one_copy = every_rank_has_a_block;
    }
}

}  // namespace

void launch_barrier(const PeerBuffers& peers, const WaitConfig& wait, WaitSite site, cudaStream_t stream,
                    bool skip_when_one_copy, const int* num_rounds_device, int round) {
    launch_kernel(LaunchConfig{dim3(1), dim3(kBarrierThreads), 0, stream, false}, barrier_kernel, peers,
                  make_timeout_context(peers, wait), site, skip_when_one_copy, num_rounds_device, round);
}

void launch_publish(const PeerBuffers& peers, const RecvBlock& block, const WaitConfig& wait, cudaStream_t stream) {
    launch_kernel(LaunchConfig{dim3(1), dim3(kBarrierThreads), 0, stream, false}, publish_kernel, peers, block,
                  make_timeout_context(peers, wait));
}

void barrier(const PeerBuffers& peers, const WaitConfig& wait, cudaStream_t stream) {
    check_peers(peers);
    EP_HOST_ASSERT(wait.record != nullptr);
    launch_barrier(peers, wait, WaitSite::kIntranodeRoundBarrier, stream);
}

void notify_dispatch(const PeerBuffers& peers, const NotifyArgs& args, const WaitConfig& wait, cudaStream_t stream) {
    check_peers(peers);
    EP_HOST_ASSERT(wait.record != nullptr);
    EP_HOST_ASSERT(args.num_tokens >= 0);
    EP_HOST_ASSERT(args.num_local_experts >= 1);
    EP_HOST_ASSERT_MSG(args.num_local_experts <= kMaxLocalExperts, "at most ", kMaxLocalExperts,
                       " local experts per rank");
    EP_HOST_ASSERT(args.expert_alignment >= 1);
    EP_HOST_ASSERT(args.rows_per_round >= 1);
    EP_HOST_ASSERT(args.num_tokens_per_expert != nullptr);
    EP_HOST_ASSERT(args.send_counts != nullptr);
    EP_HOST_ASSERT(args.rank_prefix_matrix != nullptr);
    EP_HOST_ASSERT(args.max_rounds >= 1);
    EP_HOST_ASSERT(args.num_rounds_device != nullptr);
    if (args.num_tokens > 0) {
        EP_HOST_ASSERT(args.is_token_in_rank != nullptr);
        EP_HOST_ASSERT(args.send_pos != nullptr);
        EP_HOST_ASSERT(args.send_list != nullptr);
    }
    EP_HOST_ASSERT_MSG((args.host_sequence == 0 || args.host_counters != nullptr),
                       "a host sequence number needs host counters");

    launch_kernel(LaunchConfig{dim3(peers.num_ranks), dim3(kSendPositionsThreads), 0, stream, false},
                  send_positions_kernel, args.is_token_in_rank, args.num_tokens, peers.num_ranks, args.send_pos,
                  args.send_list, args.send_counts);
    const NotifyParams params{peers,
                              args.send_counts,
                              args.num_tokens_per_expert,
                              args.num_local_experts,
                              args.expert_alignment,
                              args.rows_per_round,
                              args.max_rounds,
                              args.rank_prefix_matrix,
                              args.num_rounds_device,
                              args.host_sequence > 0 ? args.host_counters : nullptr,
                              args.host_sequence,
                              args.num_worst_tokens,
                              make_timeout_context(peers, wait)};
    launch_kernel(LaunchConfig{dim3(1), dim3(kNotifyThreads), 0, stream, false}, notify_dispatch_kernel, params);
}

}  // namespace ep::intranode
