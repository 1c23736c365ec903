// The rounds of an internode dispatch: each source sends a token once per destination node to its forwarder, the
// forwarder waits for its round, and every rank of the node pulls the rows it needs from the forwarders of its
// node into the received tensors (internode.hpp has the protocol).
#include <cuda_runtime.h>

#include "../common/dispatch_rows.cuh"
#include "../common/exception.hpp"
#include "../common/launch.cuh"
#include "device_common.cuh"
#include "internode.hpp"

namespace ep::internode {

namespace {

struct DispatchRoundParams {
    View view;
    DispatchArgs args;
    DispatchRowFormat row;
    int round;
    int round_start;  // round * rows_per_round: first node ordinal of this round
    TimeoutContext timeout;
};

__device__ __forceinline__ ReceivedRows received_rows(const DispatchArgs& a) {
    return ReceivedRows{static_cast<uint8_t*>(a.recv_x), a.recv_scales, a.recv_src_idx, a.recv_topk_idx,
                        a.recv_topk_weights};
}

// Sender: one warp per (destination node, slot) of this round. None once this rank gave up (rank_gave_up).
__global__ void __launch_bounds__(kCopyThreads) dispatch_send_kernel(DispatchRoundParams p) {
    const View& v = p.view;
    const DispatchArgs& a = p.args;
    if (!round_is_live(a.num_rounds_device, p.round)) return;
    __shared__ int s_first_item[kMaxNodes + 1];
    if (threadIdx.x == 0) {
        int total = 0;
        for (int node = 0; node < v.num_nodes; ++node) {
            s_first_item[node] = total;
            total += node_rows_in_round(v, a.node_counts[v.rank * v.num_nodes + node], p.round_start);
        }
        s_first_item[v.num_nodes] = rank_gave_up(p.timeout.record) ? 0 : total;
    }
    __syncthreads();
    const int num_items = s_first_item[v.num_nodes];
    const int lane = lane_idx();
    const DispatchRowFormat& row = p.row;
    const uint8_t* x = static_cast<const uint8_t*>(a.x);
    bool issued_puts = false;
    for (int item = global_warp_idx(); item < num_items; item += num_global_warps()) {
        const int node = find_range(s_first_item, v.num_nodes, item);
        const int slot_idx = item - s_first_item[node];
        const int token = a.node_send_list[static_cast<int64_t>(node) * a.num_tokens + p.round_start + slot_idx];
        // Ordinal of the token for each rank of the destination node (-1: that rank does not receive it).
        const int ordinal = lane < v.num_local_ranks
                                ? a.send_pos[static_cast<int64_t>(token) * v.num_ranks + v.pe_of(node, lane)]
                                : -1;
        const int mask = static_cast<int>(__ballot_sync(0xffffffffu, ordinal >= 0));
        auto write_row = [&](uint8_t* slot) {
            pack_dispatch_row(slot, row, x, a.x_scales, a.scale_stride_token, a.scale_stride_group, a.topk_idx,
                              a.topk_weights, token, lane);
            if (lane == 0) __stcg(reinterpret_cast<int*>(slot + row.mask_offset), mask);
            if (lane < v.num_local_ranks) __stcg(reinterpret_cast<int*>(slot + row.ordinals_offset) + lane, ordinal);
        };
        issued_puts |= deliver_row(v, v.dispatch_recv_slot(v.node, slot_idx), v.dispatch_send_slot(node, slot_idx),
                                   row.stride, v.control.dispatch_arrivals + 8 * static_cast<size_t>(v.node),
                                   v.pe_of(node, v.local_rank), lane, write_row);
    }
    // Local send slots are reused next round: their puts must have left.
    quiet_block_puts(issued_puts);
}

// Forwarder: wait for this round's rows from every source node, then meet the node (its ranks pull next). A failed
// wait skips the node barrier: wait_arrivals has told the node's ranks, which stop waiting for this one there.
__global__ void __launch_bounds__(kControlThreads) dispatch_arrive_kernel(DispatchRoundParams p) {
    const View& v = p.view;
    const DispatchArgs& a = p.args;
    if (!round_is_live(a.num_rounds_device, p.round)) return;
    auto expected = [&](int src_node) {
        return node_rows_in_round(v, a.node_counts[v.pe_of(src_node, v.local_rank) * v.num_nodes + v.node],
                                  p.round_start);
    };
    if (!wait_arrivals(v, v.control.dispatch_arrivals, v.control.dispatch_consumed, expected, p.timeout,
                       WaitSite::kInternodeDispatchArrivals))
        return;
    node_barrier(v, p.timeout);
}

// Receiver: one warp per (forwarder of this node, source node, slot) of this round. The row of source s = (n', l')
// is at forwarder (own node, l'); this rank takes it when its bit is in the row's mask, into received row
// prefix_before(s) + the row's ordinal for this rank. The forwarder also records each row's mask for combine.
__global__ void __launch_bounds__(kCopyThreads) dispatch_pull_kernel(DispatchRoundParams p) {
    const View& v = p.view;
    const DispatchArgs& a = p.args;
    if (!round_is_live(a.num_rounds_device, p.round)) return;
    __shared__ int s_first_item[kMaxRanksPerNode * kMaxNodes + 1];
    __shared__ int s_forward_base[kMaxNodes];
    const int num_nodes = v.num_nodes;
    if (threadIdx.x == 0) {
        int total = 0;
        for (int local = 0; local < v.num_local_ranks; ++local) {
            for (int src_node = 0; src_node < num_nodes; ++src_node) {
                s_first_item[local * num_nodes + src_node] = total;
                total += node_rows_in_round(v, a.node_counts[v.pe_of(src_node, local) * num_nodes + v.node],
                                            p.round_start);
            }
        }
        s_first_item[v.num_local_ranks * num_nodes] = total;
        int forwarded = 0;
        for (int src_node = 0; src_node < num_nodes; ++src_node) {
            s_forward_base[src_node] = forwarded;
            forwarded += a.node_counts[v.pe_of(src_node, v.local_rank) * num_nodes + v.node];
        }
    }
    __syncthreads();
    const int num_pairs = v.num_local_ranks * num_nodes;
    const int num_items = s_first_item[num_pairs];
    const int lane = lane_idx();
    const DispatchRowFormat& row = p.row;
    const int64_t first_local_expert = static_cast<int64_t>(v.rank) * a.num_local_experts;
    for (int item = global_warp_idx(); item < num_items; item += num_global_warps()) {
        const int pair = find_range(s_first_item, num_pairs, item);
        const int local = pair / num_nodes, src_node = pair % num_nodes;
        const int slot_idx = item - s_first_item[pair];
        const int forwarder = v.pe_of(v.node, local);
        const uint8_t* slot = v.peer<const uint8_t>(v.dispatch_recv_slot(src_node, slot_idx), forwarder);
        const int mask = __ldcg(reinterpret_cast<const int*>(slot + row.mask_offset));
        if (forwarder == v.rank && lane == 0) {
            const int flat = s_forward_base[src_node] + p.round_start + slot_idx;
            if (flat < a.num_forward_rows) a.forward_mask[flat] = mask;
        }
        if (((mask >> v.local_rank) & 1) == 0) continue;
        const int src = v.pe_of(src_node, local);
        const int ordinal = __ldcg(reinterpret_cast<const int*>(slot + row.ordinals_offset) + v.local_rank);
        const int out_row = prefix_before(a.rank_prefix_matrix, v.num_ranks, src, v.rank) + ordinal;
        // Only past a peer that broke the protocol (a timed-out wait, num_worst_tokens too small): never write
        // outside the tensors.
        if (ordinal < 0 || out_row >= a.num_recv_rows) continue;
        unpack_dispatch_row(slot, row, received_rows(a), out_row, first_local_expert, a.num_local_experts, lane);
        if (lane == 0) a.recv_node_slot[out_row] = p.round_start + slot_idx;
    }
}

// num_worst_tokens: rows [N, N_cap) get x 0, scales 0, source index -1, top-k -1, weights 0, node slot -1. N comes
// from the notify kernel's rank_prefix_matrix (device), so no host sync.
__global__ void __launch_bounds__(kCopyThreads) dispatch_pad_kernel(DispatchRoundParams p) {
    const View& v = p.view;
    const DispatchArgs& a = p.args;
    const int num_real = a.rank_prefix_matrix[(v.num_ranks - 1) * v.num_ranks + v.rank];
    const int lane = lane_idx();
    const DispatchRowFormat& row = p.row;
    for (int out_row = max(num_real, 0) + global_warp_idx(); out_row < a.num_recv_rows; out_row += num_global_warps()) {
        pad_dispatch_row(row, received_rows(a), out_row, lane);
        if (lane == 0) a.recv_node_slot[out_row] = -1;
    }
}

}  // namespace

void dispatch(const Buffers& buffers, const DispatchArgs& args, const WaitConfig& wait, cudaStream_t stream) {
    EP_HOST_ASSERT(wait.record != nullptr);
    check_dispatch_row_args(args);
    EP_HOST_ASSERT(args.num_forward_rows >= 0);
    if (args.num_tokens > 0) {
        EP_HOST_ASSERT(args.send_pos != nullptr);
        EP_HOST_ASSERT(args.node_send_list != nullptr);
    }
    if (args.num_recv_rows > 0) EP_HOST_ASSERT(args.recv_node_slot != nullptr);
    if (args.num_forward_rows > 0) EP_HOST_ASSERT(args.forward_mask != nullptr);
    EP_HOST_ASSERT(args.node_counts != nullptr);
    EP_HOST_ASSERT(args.num_rounds_device != nullptr);
    const View view = make_view(buffers, args.rows_per_round, args.dispatch_stride, args.combine_stride);
    const DispatchRowFormat row =
        DispatchRowFormat::make(args.payload_bytes, args.num_scales, args.num_topk, view.num_local_ranks);
    EP_HOST_ASSERT_MSG(row.stride <= args.dispatch_stride, "a dispatch row of ", row.stride,
                       " bytes does not fit the handle's ", args.dispatch_stride, "-byte slots");

    DispatchRoundParams params{view, args, row, 0, 0, timeout_context(view, wait)};
    const LaunchConfig copy_config{dim3(args.num_sms), dim3(kCopyThreads), 0, stream, false};
    const LaunchConfig control_config{dim3(1), dim3(kControlThreads), 0, stream, false};
    if (args.pad_rows) launch_kernel(copy_config, dispatch_pad_kernel, params);
    // Per round: send, arrive (forwarders have their rows; node barrier), pull, barrier (staging is free again).
    // Time goes into the two copies, the arrival wait and the two barriers; overlapping the send of round r + 1
    // with the pull of round r is the first optimisation to make.
    for (int round = 0; round < args.num_rounds; ++round) {
        params.round = round;
        params.round_start = round * args.rows_per_round;
        launch_kernel(copy_config, dispatch_send_kernel, params);
        launch_kernel(control_config, dispatch_arrive_kernel, params);
        launch_kernel(copy_config, dispatch_pull_kernel, params);
        launch_global_barrier(view, wait, args.num_rounds_device, round, stream);
    }
}

}  // namespace ep::internode
