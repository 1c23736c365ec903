// Notify of an internode dispatch (send positions per rank and per node, every rank's count row to every rank,
// rank_prefix_matrix, node counts, the round count and the host's counts), the global barrier kernel, and the host
// checks of the buffer.
#include <cuda_runtime.h>

#include "../common/exception.hpp"
#include "../common/launch.cuh"
#include "../common/send_positions.cuh"
#include "../common/worst_tokens.cuh"
#include "device_common.cuh"
#include "internode.hpp"

namespace ep::internode {

namespace {

// Blocks [0, R): ordinals per destination rank; blocks [R, R + N): ordinals per destination node (a token goes to
// node n when any rank of n receives it).
__global__ void __launch_bounds__(kSendPositionsThreads)
    send_positions_kernel(const bool* is_token_in_rank, int num_tokens, int num_ranks, int num_local_ranks,
                          int* send_pos, int* send_counts, int* node_send_pos, int* node_send_list,
                          int* node_send_counts) {
    const int block = static_cast<int>(blockIdx.x);
    if (block < num_ranks) {
        send_positions_block(is_token_in_rank, num_tokens, num_ranks, 1, block, num_ranks, send_pos, nullptr,
                             send_counts);
    } else {
        send_positions_block(is_token_in_rank, num_tokens, num_ranks, num_local_ranks, block - num_ranks,
                             num_ranks / num_local_ranks, node_send_pos, node_send_list, node_send_counts);
    }
}

struct NotifyParams {
    View view;
    NotifyArgs args;
    TimeoutContext timeout;
};

// One block. Sends this rank's count row to every rank (each peer gets its own slice of per-expert counts), waits
// for every rank's row, then derives what the rounds and the host need.
__global__ void __launch_bounds__(kControlThreads) notify_kernel(NotifyParams p) {
    const View& v = p.view;
    const NotifyArgs& a = p.args;
    const int num_ranks = v.num_ranks, num_nodes = v.num_nodes;
    const int num_local = a.num_local_experts;
    const int worst_tokens_at = count_row_worst_tokens(num_ranks, num_nodes);
    const int experts_at = count_row_experts(num_ranks, num_nodes);
    const int row_ints = experts_at + num_local;  // of count_row_ints, the part this call fills
    const int tid = static_cast<int>(threadIdx.x);
    __shared__ uint64_t s_epoch;
    __shared__ int s_ok, s_gave_up, s_max_count;
    if (tid == 0) {
        int64_t* epoch_slot = v.epochs() + kEpochNotify;
        const uint64_t epoch = static_cast<uint64_t>(*reinterpret_cast<volatile int64_t*>(epoch_slot)) + 1;
        *epoch_slot = static_cast<int64_t>(epoch);
        s_epoch = epoch;
        // A rank that gave up sends no count row (its count flag would pass a late peer's notify of an earlier call
        // with this call's counts) and waits for none: its notify fails at once.
        s_gave_up = rank_gave_up(p.timeout.record);
        s_ok = s_gave_up ? 0 : 1;
        s_max_count = 0;
    }
    __syncthreads();
    const uint64_t epoch = s_epoch;
    const bool gave_up = s_gave_up != 0;
    const size_t own_row_offset = v.control.counts + 4 * static_cast<size_t>(v.rank) * count_row_ints(num_ranks, num_nodes);
    uint64_t* count_flags = v.at<uint64_t>(v.control.count_flags);
    bool issued_puts = false;

    for (int dst = 0; !gave_up && dst < num_ranks; ++dst) {
        int* peer_row = v.direct<int>(own_row_offset, dst);
        int* row = peer_row != nullptr ? peer_row : v.count_send_row(dst);
        for (int i = tid; i < row_ints; i += kControlThreads) {
            int value;
            if (i < num_ranks) value = a.send_counts[i];
            else if (i < worst_tokens_at) value = a.node_send_counts[i - num_ranks];
            else if (i == worst_tokens_at) value = a.num_worst_tokens;
            else value = a.num_tokens_per_expert[dst * num_local + (i - experts_at)];
            row[i] = value;
        }
        __threadfence_system();
        __syncthreads();
        if (peer_row != nullptr) {
            if (tid == 0) ptx::st_release_sys(v.direct<uint64_t>(v.control.count_flags + 8 * v.rank, dst), epoch);
        } else {
            nvshmemx_putmem_signal_nbi_block(v.base + own_row_offset, row, 4 * static_cast<size_t>(row_ints),
                                             count_flags + v.rank, epoch, NVSHMEM_SIGNAL_SET, dst);
            issued_puts = true;
        }
    }
    quiet_block_puts(issued_puts);

    TimeoutContext ctx = p.timeout;
    for (int src = tid; !gave_up && src < num_ranks; src += kControlThreads) {
        ctx.channel = src;
        const auto keep_waiting = [&] { return ptx::ld_acquire_sys(count_flags + src) < epoch; };
        if (!wait_for_peer(v, src, keep_waiting, ctx, WaitSite::kInternodeNotifyCounts)) s_ok = 0;
    }
    __syncthreads();
    if (s_ok == 0) {
        // No rounds: node_counts, rank_prefix_matrix and num_rounds_device are otherwise left uninitialised, and
        // rounds launched without a host sync (num_worst_tokens) would index x and node_send_list with garbage
        // counts (an illegal address instead of the DeepEPTimeoutError the record raises at the next call). The
        // matrix is zero, no rows from anyone: the pad kernel, queued behind this one, pads every received row
        // rather than leave torch.empty's memory in them.
        if (tid == 0) *a.num_rounds_device = 0;
        for (int i = tid; i < num_ranks * num_ranks; i += kControlThreads) a.rank_prefix_matrix[i] = 0;
        if (!gave_up) announce_gave_up(v);  // block-uniform: s_ok and s_gave_up are settled by the barrier above
        return;
    }
    // Ranks of other nodes put their count rows over the network.
    if (tid == 0) settle_network_writes(count_flags);
    __syncthreads();

    // Volatile loads: peers wrote the rows after this kernel started.
    auto count = [&](int src, int i) { return ptx::ld_volatile_global(v.counts_row(src) + i); };
    for (int dst = tid; dst < num_ranks; dst += kControlThreads) {
        int sum = 0;
        for (int src = 0; src < num_ranks; ++src) {
            sum += count(src, dst);
            a.rank_prefix_matrix[src * num_ranks + dst] = sum;
        }
    }
    for (int i = tid; i < num_ranks * num_nodes; i += kControlThreads) {
        const int node_count = count(i / num_nodes, num_ranks + i % num_nodes);
        a.node_counts[i] = node_count;
        atomicMax(&s_max_count, node_count);
    }
    __syncthreads();
    // At least one round: its barrier keeps a fast peer's next notify from overwriting the rows read above.
    const int needed_rounds = max(1, (s_max_count + a.rows_per_round - 1) / a.rows_per_round);
    const int num_rounds = min(needed_rounds, a.max_rounds);
    // max_rounds holds every row while each rank receives at most num_worst_tokens; past it, rounds are cut on
    // every rank, so every rank records it (the matrix's last row: every rank's received rows).
    check_worst_tokens(
        p.timeout, num_ranks, kControlThreads, a.num_worst_tokens,
        [&](int r) { return count(r, worst_tokens_at); }, a.rank_prefix_matrix + (num_ranks - 1) * num_ranks,
        WaitSite::kWorstTokensInternode);
    if (tid == 0) *a.num_rounds_device = num_rounds;
    if (a.host_counters == nullptr) return;

    for (int local_expert = tid; local_expert < num_local; local_expert += kControlThreads) {
        int sum = 0;
        for (int src = 0; src < num_ranks; ++src) sum += count(src, experts_at + local_expert);
        a.host_counters[kCounterExpertBase + local_expert] =
            (sum + a.expert_alignment - 1) / a.expert_alignment * a.expert_alignment;
    }
    if (tid == 0) {
        int num_recv_tokens = 0, num_forwarded = 0;
        for (int src = 0; src < num_ranks; ++src) num_recv_tokens += count(src, v.rank);
        for (int src_node = 0; src_node < num_nodes; ++src_node)
            num_forwarded += count(v.pe_of(src_node, v.local_rank), num_ranks + v.node);
        a.host_counters[kCounterNumRecvTokens] = num_recv_tokens;
        a.host_counters[kCounterNumRounds] = num_rounds;
        a.host_counters[kCounterNumForwarded] = num_forwarded;
    }
    // Every value reaches host memory before the sequence number that tells the host they are fresh.
    __threadfence_system();
    __syncthreads();
    if (tid == 0) ptx::st_release_sys(&a.host_counters[kCounterSequence], a.host_sequence);
}

__global__ void __launch_bounds__(kControlThreads)
    global_barrier_kernel(View view, TimeoutContext timeout, const int* num_rounds_device, int round) {
    if (num_rounds_device != nullptr && !round_is_live(num_rounds_device, round)) return;
    global_barrier(view, timeout);
}

}  // namespace

View make_view(const Buffers& buffers, int rows_per_round, int dispatch_stride, int combine_stride) {
    EP_HOST_ASSERT(buffers.base != nullptr);
    EP_HOST_ASSERT(buffers.num_ranks >= 1);
    EP_HOST_ASSERT_MSG(buffers.num_ranks <= kMaxRanks, "internode kernels support at most ", kMaxRanks, " ranks");
    EP_HOST_ASSERT(buffers.num_local_ranks >= 1);
    EP_HOST_ASSERT_MSG(buffers.num_local_ranks <= kMaxRanksPerNode, "at most ", kMaxRanksPerNode, " ranks per node");
    EP_HOST_ASSERT_MSG(buffers.num_ranks % buffers.num_local_ranks == 0, "ranks (", buffers.num_ranks,
                       ") must be a multiple of ranks per node (", buffers.num_local_ranks, ")");
    EP_HOST_ASSERT(buffers.rank >= 0);
    EP_HOST_ASSERT(buffers.rank < buffers.num_ranks);
    View view{};
    view.base = static_cast<uint8_t*>(buffers.base);
    view.rank = buffers.rank;
    view.num_ranks = buffers.num_ranks;
    view.num_local_ranks = buffers.num_local_ranks;
    view.num_nodes = buffers.num_ranks / buffers.num_local_ranks;
    view.node = buffers.rank / buffers.num_local_ranks;
    view.local_rank = buffers.rank % buffers.num_local_ranks;
    view.control = ControlLayout::make(view.num_ranks, view.num_nodes);
    view.rows_per_round = rows_per_round;
    view.dispatch_stride = dispatch_stride;
    view.combine_stride = combine_stride;
    view.emulate_network = buffers.emulate_network;
    EP_HOST_ASSERT_MSG(buffers.num_bytes > view.control.bytes, "the buffer must hold the control area (",
                       view.control.bytes, " bytes) and a staging area");
    if (rows_per_round > 0) {
        view.staging = StagingLayout::make(view.control, view.num_nodes, view.num_local_ranks, rows_per_round,
                                           dispatch_stride, combine_stride);
        EP_HOST_ASSERT_MSG(view.staging.end <= buffers.num_bytes, rows_per_round, " rows per round need ",
                           view.staging.end, " bytes, the buffer has ", buffers.num_bytes);
    }
    return view;
}

void launch_global_barrier(const View& view, const WaitConfig& wait, const int* num_rounds_device, int round,
                           cudaStream_t stream) {
    launch_kernel(LaunchConfig{dim3(1), dim3(kControlThreads), 0, stream, false}, global_barrier_kernel, view,
                  timeout_context(view, wait), num_rounds_device, round);
}

void barrier(const Buffers& buffers, const WaitConfig& wait, cudaStream_t stream) {
    EP_HOST_ASSERT(wait.record != nullptr);
    launch_global_barrier(make_view(buffers, 0, 0, 0), wait, nullptr, 0, stream);
}

bool node_peers_mapped(const Buffers& buffers) {
    const View view = make_view(buffers, 0, 0, 0);
    for (int local = 0; local < view.num_local_ranks; ++local) {
        if (nvshmem_ptr(buffers.base, view.node * view.num_local_ranks + local) == nullptr) return false;
    }
    return true;
}

void notify_dispatch(const Buffers& buffers, const NotifyArgs& args, const WaitConfig& wait, cudaStream_t stream) {
    const View view = make_view(buffers, 0, 0, 0);
    EP_HOST_ASSERT(wait.record != nullptr);
    EP_HOST_ASSERT(args.num_tokens >= 0);
    EP_HOST_ASSERT(args.num_local_experts >= 1);
    EP_HOST_ASSERT_MSG(args.num_local_experts <= kMaxLocalExperts, "at most ", kMaxLocalExperts,
                       " local experts per rank");
    EP_HOST_ASSERT(args.expert_alignment >= 1);
    EP_HOST_ASSERT(args.rows_per_round >= 1);
    EP_HOST_ASSERT(args.max_rounds >= 1);
    EP_HOST_ASSERT(args.num_tokens_per_expert != nullptr);
    EP_HOST_ASSERT(args.send_counts != nullptr);
    EP_HOST_ASSERT(args.node_send_counts != nullptr);
    EP_HOST_ASSERT(args.rank_prefix_matrix != nullptr);
    EP_HOST_ASSERT(args.node_counts != nullptr);
    EP_HOST_ASSERT(args.num_rounds_device != nullptr);
    if (args.num_tokens > 0) {
        EP_HOST_ASSERT(args.is_token_in_rank != nullptr);
        EP_HOST_ASSERT(args.send_pos != nullptr);
        EP_HOST_ASSERT(args.node_send_pos != nullptr);
        EP_HOST_ASSERT(args.node_send_list != nullptr);
    }
    EP_HOST_ASSERT_MSG((args.host_sequence == 0 || args.host_counters != nullptr),
                       "a host sequence number needs host counters");

    launch_kernel(LaunchConfig{dim3(view.num_ranks + view.num_nodes), dim3(kSendPositionsThreads), 0, stream, false},
                  send_positions_kernel, args.is_token_in_rank, args.num_tokens, view.num_ranks, view.num_local_ranks,
                  args.send_pos, args.send_counts, args.node_send_pos, args.node_send_list, args.node_send_counts);
    NotifyParams params{view, args, timeout_context(view, wait)};
    if (args.host_sequence == 0) params.args.host_counters = nullptr;
    launch_kernel(LaunchConfig{dim3(1), dim3(kControlThreads), 0, stream, false}, notify_kernel, params);
}

}  // namespace ep::internode
