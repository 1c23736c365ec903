// The rounds of an intranode dispatch: senders write rows into the destinations' staging, receivers move them to
// their final place in the received tensors.
#include <cuda_runtime.h>

#include "../common/dispatch_rows.cuh"
#include "../common/exception.hpp"
#include "../common/launch.cuh"
#include "device_common.cuh"
#include "intranode.hpp"

namespace ep::intranode {

namespace {

struct DispatchRoundParams {
    PeerBuffers peers;
    int rows_per_round;
    DispatchRowFormat row;
    const uint8_t* x;
    const float* x_scales;
    int64_t scale_stride_token;
    int64_t scale_stride_group;
    const int64_t* topk_idx;
    const float* topk_weights;
    int num_tokens;
    const int* send_list;
    const int* send_counts;
    const int* rank_prefix_matrix;
    uint8_t* recv_x;
    float* recv_scales;
    int* recv_src_idx;
    int64_t* recv_topk_idx;
    float* recv_topk_weights;
    int num_recv_rows;
    int num_local_experts;
    // One-copy dispatch: every rank's receive arena (where its published RecvBlock points), and whether this
    // launch is one: then the round kernels do nothing when the publish kernel found that every rank has a block.
    void* recv_arenas[kMaxRanks];
    bool one_copy;
    const DeviceErrorRecord* record;  // this rank's: the senders write nothing once it gave up (rank_gave_up)
    const int* num_rounds_device;     // rounds with rows (round_is_live)
    int round;                        // of this launch
};

// The first ordinal of this launch's round.
__device__ __forceinline__ int round_start(const DispatchRoundParams& p) { return p.round * p.rows_per_round; }

__device__ __forceinline__ bool rows_go_by_one_copy(const DispatchRoundParams& p) {
    return p.one_copy && one_copy_noted(p.peers);
}

__device__ __forceinline__ ReceivedRows received_rows(const DispatchRoundParams& p) {
    return ReceivedRows{p.recv_x, p.recv_scales, p.recv_src_idx, p.recv_topk_idx, p.recv_topk_weights};
}

// Sender: one warp per (destination, slot) of this round. Work items are numbered destination by destination;
// s_first_item[d] is the first item of destination d. None once this rank gave up (rank_gave_up).
__global__ void __launch_bounds__(kCopyThreads) dispatch_send_kernel(DispatchRoundParams p) {
    if (rows_go_by_one_copy(p) || !round_is_live(p.num_rounds_device, p.round)) return;
    __shared__ int s_first_item[kMaxRanks + 1];
    const int num_ranks = p.peers.num_ranks;
    if (threadIdx.x == 0) {
        int total = 0;
        for (int dst = 0; dst < num_ranks; ++dst) {
            s_first_item[dst] = total;
            total += rows_in_round(p.send_counts[dst], round_start(p), p.rows_per_round);
        }
        s_first_item[num_ranks] = rank_gave_up(p.record) ? 0 : total;
    }
    __syncthreads();
    const int lane = lane_idx();
    const DispatchRowFormat& row = p.row;
    for_each_item_by_rank(s_first_item, num_ranks, [&](int dst, int slot_idx) {
        const int token = p.send_list[static_cast<int64_t>(dst) * p.num_tokens + round_start(p) + slot_idx];
        uint8_t* slot = staging_slot(p.peers.base[dst], p.peers.rank, slot_idx, p.rows_per_round, row.stride);
        pack_dispatch_row(slot, row, p.x, p.x_scales, p.scale_stride_token, p.scale_stride_group, p.topk_idx,
                          p.topk_weights, token, lane);
    });
    release_peer_writes();
}

// Receiver: one warp per (source, slot) of this round. Row `slot_idx` of source s's block is received row
// prefix_before(s) + round_start + slot_idx: rows of s come in ordinal (= token) order, after those of ranks < s.
__global__ void __launch_bounds__(kCopyThreads) dispatch_recv_kernel(DispatchRoundParams p) {
    if (rows_go_by_one_copy(p) || !round_is_live(p.num_rounds_device, p.round)) return;
    __shared__ int s_first_item[kMaxRanks + 1];
    __shared__ int s_first_row[kMaxRanks];
    const int num_ranks = p.peers.num_ranks;
    const int rank = p.peers.rank;
    if (threadIdx.x == 0) {
        int total = 0;
        for (int src = 0; src < num_ranks; ++src) {
            const int start = prefix_before(p.rank_prefix_matrix, num_ranks, src, rank);
            const int count = p.rank_prefix_matrix[src * num_ranks + rank] - start;
            s_first_item[src] = total;
            s_first_row[src] = start + round_start(p);
            total += rows_in_round(count, round_start(p), p.rows_per_round);
        }
        s_first_item[num_ranks] = total;
    }
    __syncthreads();
    const int lane = lane_idx();
    const DispatchRowFormat& row = p.row;
    const int64_t first_local_expert = static_cast<int64_t>(rank) * p.num_local_experts;
    void* own_buffer = p.peers.base[rank];
    for_each_item_by_rank(s_first_item, num_ranks, [&](int src, int slot_idx) {
        const int out_row = s_first_row[src] + slot_idx;
        // Only past a peer that broke the protocol (a timed-out barrier, num_worst_tokens too small) or a matrix the
        // notify did not fill: never write outside the tensors.
        if (out_row < 0 || out_row >= p.num_recv_rows) return;
        const uint8_t* slot = staging_slot(own_buffer, src, slot_idx, p.rows_per_round, row.stride);
        unpack_dispatch_row(slot, row, received_rows(p), out_row, first_local_expert, p.num_local_experts, lane);
    });
}

// num_worst_tokens: rows [N, N_cap) get x 0, scales 0, source index -1, top-k -1, weights 0. N comes from the
// notify kernel's rank_prefix_matrix (device), so no host sync.
__global__ void __launch_bounds__(kCopyThreads) dispatch_pad_kernel(DispatchRoundParams p) {
    const int num_ranks = p.peers.num_ranks;
    const int num_real = p.rank_prefix_matrix[(num_ranks - 1) * num_ranks + p.peers.rank];
    const int lane = lane_idx();
    const DispatchRowFormat& row = p.row;
    const int first_pad_row = num_real < 0 ? 0 : num_real;
    for (int out_row = first_pad_row + global_warp_idx(); out_row < p.num_recv_rows; out_row += num_global_warps()) {
        pad_dispatch_row(row, received_rows(p), out_row, lane);
    }
}

// A receiver's published block as pointers into its arena mapped here (nullptr for absent outputs).
__device__ __forceinline__ ReceivedRows peer_received_rows(void* arena, const RecvBlock* block) {
    uint8_t* base = static_cast<uint8_t*>(arena);
    const auto at = [&](const int64_t* offset) {
        const int64_t value = ptx::ld_volatile_global(offset);
        return value < 0 ? nullptr : base + value;
    };
    return ReceivedRows{at(&block->x), reinterpret_cast<float*>(at(&block->scales)),
                        reinterpret_cast<int*>(at(&block->src_idx)), reinterpret_cast<int64_t*>(at(&block->topk_idx)),
                        reinterpret_cast<float*>(at(&block->topk_weights))};
}

// One-copy send: one warp per (destination, ordinal), all of this rank's rows, each written once, straight into the
// destination's received row prefix_before(rank, d) + ordinal (the place dispatch_recv_kernel would give it). None
// once this rank gave up (rank_gave_up).
__global__ void __launch_bounds__(kCopyThreads) dispatch_one_copy_kernel(DispatchRoundParams p) {
    if (!rows_go_by_one_copy(p)) return;
    __shared__ int s_first_item[kMaxRanks + 1];
    __shared__ int s_first_row[kMaxRanks];
    __shared__ int s_num_rows[kMaxRanks];
    __shared__ ReceivedRows s_rows[kMaxRanks];
    const int num_ranks = p.peers.num_ranks;
    const int rank = p.peers.rank;
    if (threadIdx.x == 0) {
        int total = 0;
        for (int dst = 0; dst < num_ranks; ++dst) {
            const RecvBlock* block = &control_area(p.peers.base[dst])->recv_block;
            s_first_item[dst] = total;
            s_first_row[dst] = prefix_before(p.rank_prefix_matrix, num_ranks, rank, dst);
            s_num_rows[dst] = static_cast<int>(ptx::ld_volatile_global(&block->num_rows));
            s_rows[dst] = peer_received_rows(p.recv_arenas[dst], block);
            total += p.send_counts[dst];
        }
        s_first_item[num_ranks] = rank_gave_up(p.record) ? 0 : total;
    }
    __syncthreads();
    const int lane = lane_idx();
    const DispatchRowFormat& row = p.row;
    for_each_item_by_rank(s_first_item, num_ranks, [&](int dst, int ordinal) {
        const int out_row = s_first_row[dst] + ordinal;
        // Only past a rank that broke the protocol (num_worst_tokens too small) or a matrix the notify did not fill:
        // never write outside its tensors.
        if (out_row < 0 || out_row >= s_num_rows[dst]) return;
        const int token = p.send_list[static_cast<int64_t>(dst) * p.num_tokens + ordinal];
        write_dispatch_row(s_rows[dst], out_row, row, p.x, p.x_scales, p.scale_stride_token, p.scale_stride_group,
                           p.topk_idx, p.topk_weights, token, static_cast<int64_t>(dst) * p.num_local_experts,
                           p.num_local_experts, lane);
    });
    release_peer_writes();
}

}  // namespace

void dispatch(const PeerBuffers& peers, const DispatchArgs& args, const WaitConfig& wait, cudaStream_t stream) {
    check_peers(peers);
    EP_HOST_ASSERT(wait.record != nullptr);
    check_dispatch_row_args(args);
    EP_HOST_ASSERT(args.num_rounds >= 1);
    EP_HOST_ASSERT(args.num_rounds_device != nullptr);
    if (args.num_tokens > 0) EP_HOST_ASSERT(args.send_list != nullptr);
    EP_HOST_ASSERT(args.send_counts != nullptr);
    const DispatchRowFormat row = DispatchRowFormat::make(args.payload_bytes, args.num_scales, args.num_topk);
    const size_t needed = static_cast<size_t>(peers.num_ranks) * args.rows_per_round * row.stride;
    EP_HOST_ASSERT_MSG(needed <= staging_bytes(peers.num_bytes), "rows_per_round ", args.rows_per_round,
                       " slots of ", row.stride, " bytes per rank do not fit the staging area");
    if (args.one_copy) check_one_copy(peers, args.recv_arenas, args.recv_block, args.num_recv_rows);

    DispatchRoundParams params{peers,
                               args.rows_per_round,
                               row,
                               static_cast<const uint8_t*>(args.x),
                               args.x_scales,
                               args.scale_stride_token,
                               args.scale_stride_group,
                               args.topk_idx,
                               args.topk_weights,
                               args.num_tokens,
                               args.send_list,
                               args.send_counts,
                               args.rank_prefix_matrix,
                               static_cast<uint8_t*>(args.recv_x),
                               args.recv_scales,
                               args.recv_src_idx,
                               args.recv_topk_idx,
                               args.recv_topk_weights,
                               args.num_recv_rows,
                               args.num_local_experts,
                               {},
                               args.one_copy,
                               wait.record,
                               args.num_rounds_device,
                               0};
    for (int r = 0; r < kMaxRanks; ++r) params.recv_arenas[r] = args.recv_arenas[r];
    const LaunchConfig copy_config{dim3(args.num_sms), dim3(kCopyThreads), 0, stream, false};
    if (args.pad_rows) launch_kernel(copy_config, dispatch_pad_kernel, params);
    if (args.one_copy) {
        // publish, barrier (every block known), send, barrier (rows have landed); the rounds below (copies and
        // barriers) then return at once, unless some rank had no block. They are launched all the same: the host
        // does not know which way the rows go.
        launch_publish(peers, args.recv_block, wait, stream);
        launch_kernel(copy_config, dispatch_one_copy_kernel, params);
        launch_barrier(peers, wait, WaitSite::kIntranodeRoundBarrier, stream);
    }
    // Per round: send, barrier (rows have landed), receive, barrier (staging is free again). Time goes into the two
    // copies and the 2 * num_rounds barriers (each a few microseconds of one block waiting on every peer);
    // overlapping the send of round r + 1 with the receive of round r is the first optimisation to make.
    for (int round = 0; round < args.num_rounds; ++round) {
        params.round = round;
        launch_kernel(copy_config, dispatch_send_kernel, params);
        launch_barrier(peers, wait, WaitSite::kIntranodeRoundBarrier, stream, args.one_copy, args.num_rounds_device,
                       round);
        launch_kernel(copy_config, dispatch_recv_kernel, params);
        launch_barrier(peers, wait, WaitSite::kIntranodeRoundBarrier, stream, args.one_copy, args.num_rounds_device,
                       round);
    }
}

}  // namespace ep::intranode
