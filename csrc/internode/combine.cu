// The rounds of an internode combine: every rank writes the rows it received into the staging of the forwarders
// of its node, each forwarder sums a token's rows of its node in float32 and sends one bf16 partial per node back
// to the source, and the source adds its nodes' partials and the bias (internode.hpp has the protocol).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "../common/bf16_chunk.cuh"
#include "../common/exception.hpp"
#include "../common/launch.cuh"
#include "device_common.cuh"
#include "internode.hpp"

namespace ep::internode {

namespace {

struct CombineRoundParams {
    View view;
    CombineArgs args;
    CombineRowFormat row;
    int round;
    int round_start;
    TimeoutContext timeout;
};

// Receiver: one warp per received row whose node ordinal falls in this round; the row goes to sub-slot
// (source node, ordinal - round_start, this rank's local index) of the source's forwarder in this node. None once
// this rank gave up (rank_gave_up).
__global__ void __launch_bounds__(kCopyThreads) combine_push_kernel(CombineRoundParams p) {
    const View& v = p.view;
    const CombineArgs& a = p.args;
    if (!round_is_live(a.num_rounds_device, p.round)) return;
    __shared__ int s_first_row[kMaxRanks + 1];  // first received row of each source rank, then N
    __shared__ int s_gave_up;
    if (threadIdx.x == 0) s_gave_up = rank_gave_up(p.timeout.record);
    for (int src = static_cast<int>(threadIdx.x); src <= v.num_ranks; src += kCopyThreads)
        s_first_row[src] = src == 0 ? 0 : a.rank_prefix_matrix[(src - 1) * v.num_ranks + v.rank];
    __syncthreads();
    const int num_rows = s_gave_up ? 0 : min(s_first_row[v.num_ranks], a.num_x_rows);
    const int lane = lane_idx();
    const CombineRowFormat& row = p.row;
    const uint8_t* x = static_cast<const uint8_t*>(a.x);
    for (int q = global_warp_idx(); q < num_rows; q += num_global_warps()) {
        const int slot_idx = a.recv_node_slot[q] - p.round_start;
        if (slot_idx < 0 || slot_idx >= v.rows_per_round) continue;
        const int src = find_range(s_first_row, v.num_ranks, q);
        const int forwarder = v.pe_of(v.node, v.local_of(src));
        uint8_t* slot = v.peer<uint8_t>(v.combine_in_slot(v.node_of(src), slot_idx, v.local_rank), forwarder);
        warp_copy_to_staging(reinterpret_cast<int4*>(slot),
                             reinterpret_cast<const int4*>(x + static_cast<int64_t>(q) * row.payload_bytes),
                             row.payload_bytes / 16, lane);
        float* slot_weights = reinterpret_cast<float*>(slot + row.weights_offset);
        for (int k = lane; k < row.num_topk; k += 32)
            __stcg(slot_weights + k, __ldg(a.topk_weights + static_cast<int64_t>(q) * row.num_topk + k));
    }
    release_peer_writes();
}

__global__ void __launch_bounds__(kControlThreads) combine_node_barrier_kernel(CombineRoundParams p) {
    if (!round_is_live(p.args.num_rounds_device, p.round)) return;
    node_barrier(p.view, p.timeout);
}

// Forwarder: one warp per (source node, slot) of this round; sums the sub-slots of the ranks in the row's mask
// and delivers the partial to the source (same local index, node n') with a count on its combine arrivals. None
// once this rank gave up (rank_gave_up).
__global__ void __launch_bounds__(kCopyThreads) combine_reduce_kernel(CombineRoundParams p) {
    const View& v = p.view;
    const CombineArgs& a = p.args;
    if (!round_is_live(a.num_rounds_device, p.round)) return;
    __shared__ int s_first_item[kMaxNodes + 1];
    __shared__ int s_forward_base[kMaxNodes];
    if (threadIdx.x == 0) {
        int total = 0, forwarded = 0;
        for (int src_node = 0; src_node < v.num_nodes; ++src_node) {
            const int count = a.node_counts[v.pe_of(src_node, v.local_rank) * v.num_nodes + v.node];
            s_first_item[src_node] = total;
            s_forward_base[src_node] = forwarded;
            total += node_rows_in_round(v, count, p.round_start);
            forwarded += count;
        }
        s_first_item[v.num_nodes] = rank_gave_up(p.timeout.record) ? 0 : total;
    }
    __syncthreads();
    const int num_items = s_first_item[v.num_nodes];
    const int lane = lane_idx();
    const CombineRowFormat& row = p.row;
    const int num_chunks = row.payload_bytes / 16;
    bool issued_puts = false;
    for (int item = global_warp_idx(); item < num_items; item += num_global_warps()) {
        const int src_node = find_range(s_first_item, v.num_nodes, item);
        const int slot_idx = item - s_first_item[src_node];
        const int flat = s_forward_base[src_node] + p.round_start + slot_idx;
        const int mask = flat < a.num_forward_rows ? a.forward_mask[flat] : 0;
        auto write_partial = [&](uint8_t* out) {
            for (int c = lane; c < num_chunks; c += 32) {
                float acc[kBf16PerChunk] = {};
                for (int local = 0; local < v.num_local_ranks; ++local) {
                    if (((mask >> local) & 1) == 0) continue;
                    const int4* in = v.at<const int4>(v.combine_in_slot(src_node, slot_idx, local));
                    add_bf16_chunk(acc, __ldcg(in + c));
                }
                __stcg(reinterpret_cast<int4*>(out) + c, to_bf16_chunk(acc));
            }
            for (int k = lane; k < row.num_topk; k += 32) {
                float sum = 0.0f;
                for (int local = 0; local < v.num_local_ranks; ++local) {
                    if (((mask >> local) & 1) == 0) continue;
                    const uint8_t* in = v.at<const uint8_t>(v.combine_in_slot(src_node, slot_idx, local));
                    sum += __ldcg(reinterpret_cast<const float*>(in + row.weights_offset) + k);
                }
                __stcg(reinterpret_cast<float*>(out + row.weights_offset) + k, sum);
            }
        };
        issued_puts |= deliver_row(v, v.combine_partial_slot(v.node, slot_idx), v.combine_send_slot(src_node, slot_idx),
                                   row.stride, v.control.combine_arrivals + 8 * static_cast<size_t>(v.node),
                                   v.pe_of(src_node, v.local_rank), lane, write_partial);
    }
    quiet_block_puts(issued_puts);  // the send slots are reused next round
}

// Source: wait for this round's partials from every node.
__global__ void __launch_bounds__(kControlThreads) combine_arrive_kernel(CombineRoundParams p) {
    const View& v = p.view;
    const CombineArgs& a = p.args;
    if (!round_is_live(a.num_rounds_device, p.round)) return;
    auto expected = [&](int node) {
        return node_rows_in_round(v, a.node_counts[v.rank * v.num_nodes + node], p.round_start);
    };
    wait_arrivals(v, v.control.combine_arrivals, v.control.combine_consumed, expected, p.timeout,
                  WaitSite::kInternodeCombineArrivals);
}

// Source: one warp per token; adds the partials of the nodes whose ordinal for the token is in this round to the
// float32 accumulator (zero in the first round), and in the last live round adds the bias and writes bf16.
__global__ void __launch_bounds__(kCopyThreads) combine_finish_kernel(CombineRoundParams p) {
    const View& v = p.view;
    const CombineArgs& a = p.args;
    const int num_rounds = ptx::ld_volatile_global(a.num_rounds_device);
    if (p.round >= num_rounds) return;
    const bool is_first = p.round == 0, is_last = p.round == num_rounds - 1;
    const int lane = lane_idx();
    const CombineRowFormat& row = p.row;
    const int hidden = row.payload_bytes / 2;
    const int num_chunks = row.payload_bytes / 16;
    const int num_nodes = v.num_nodes;
    for (int token = global_warp_idx(); token < a.num_tokens; token += num_global_warps()) {
        const int* node_pos = a.node_send_pos + static_cast<int64_t>(token) * num_nodes;
        auto partial_of = [&](int node) -> const uint8_t* {
            const int slot_idx = node_pos[node] - p.round_start;
            if (node_pos[node] < 0 || slot_idx < 0 || slot_idx >= v.rows_per_round) return nullptr;
            return v.at<const uint8_t>(v.combine_partial_slot(node, slot_idx));
        };
        for (int c = lane; c < num_chunks; c += 32) {
            const int64_t element = static_cast<int64_t>(token) * hidden + c * kBf16PerChunk;
            float acc[kBf16PerChunk] = {};
            if (!is_first) load_float_chunk(acc, a.acc_x + element);
            for (int node = 0; node < num_nodes; ++node) {
                const uint8_t* partial = partial_of(node);
                if (partial != nullptr) add_bf16_chunk(acc, __ldcg(reinterpret_cast<const int4*>(partial) + c));
            }
            if (!is_last) {
                store_float_chunk(a.acc_x + element, acc);
                continue;
            }
            // The biases last, as the reference adds them.
            const __nv_bfloat16* bias0 = static_cast<const __nv_bfloat16*>(a.bias0);
            const __nv_bfloat16* bias1 = static_cast<const __nv_bfloat16*>(a.bias1);
            if (bias0 != nullptr) add_bf16_chunk(acc, __ldg(reinterpret_cast<const int4*>(bias0 + element)));
            if (bias1 != nullptr) add_bf16_chunk(acc, __ldg(reinterpret_cast<const int4*>(bias1 + element)));
            reinterpret_cast<int4*>(static_cast<__nv_bfloat16*>(a.combined_x) + element)[0] = to_bf16_chunk(acc);
        }
        for (int k = lane; k < row.num_topk; k += 32) {
            const int64_t entry = static_cast<int64_t>(token) * row.num_topk + k;
            float sum = is_first ? 0.0f : a.acc_weights[entry];
            for (int node = 0; node < num_nodes; ++node) {
                const uint8_t* partial = partial_of(node);
                if (partial != nullptr) sum += __ldcg(reinterpret_cast<const float*>(partial + row.weights_offset) + k);
            }
            if (is_last) a.combined_weights[entry] = sum;
            else a.acc_weights[entry] = sum;
        }
    }
}

}  // namespace

void combine(const Buffers& buffers, const CombineArgs& args, const WaitConfig& wait, cudaStream_t stream) {
    EP_HOST_ASSERT(wait.record != nullptr);
    EP_HOST_ASSERT(args.num_rounds >= 1);
    EP_HOST_ASSERT(args.rows_per_round >= 1);
    EP_HOST_ASSERT(args.hidden > 0);
    EP_HOST_ASSERT_MSG(args.hidden % kBf16PerChunk == 0, "hidden must be a multiple of ", kBf16PerChunk);
    EP_HOST_ASSERT(args.num_x_rows >= 0);
    EP_HOST_ASSERT(args.num_topk >= 0);
    EP_HOST_ASSERT(args.num_tokens >= 0);
    EP_HOST_ASSERT(args.num_forward_rows >= 0);
    if (args.num_x_rows > 0) {
        EP_HOST_ASSERT(args.x != nullptr);
        EP_HOST_ASSERT(args.recv_node_slot != nullptr);
        if (args.num_topk > 0) EP_HOST_ASSERT(args.topk_weights != nullptr);
    }
    if (args.num_tokens > 0) {
        EP_HOST_ASSERT(args.node_send_pos != nullptr);
        EP_HOST_ASSERT(args.combined_x != nullptr);
        if (args.num_topk > 0) EP_HOST_ASSERT(args.combined_weights != nullptr);
        if (args.num_rounds > 1) {
            EP_HOST_ASSERT_MSG(args.acc_x != nullptr, "several rounds need the float32 accumulator");
            if (args.num_topk > 0) EP_HOST_ASSERT(args.acc_weights != nullptr);
        }
    }
    if (args.num_forward_rows > 0) EP_HOST_ASSERT(args.forward_mask != nullptr);
    EP_HOST_ASSERT(args.rank_prefix_matrix != nullptr);
    EP_HOST_ASSERT(args.node_counts != nullptr);
    EP_HOST_ASSERT(args.num_rounds_device != nullptr);
    EP_HOST_ASSERT(args.num_sms >= 1);
    const View view = make_view(buffers, args.rows_per_round, args.dispatch_stride, args.combine_stride);
    const CombineRowFormat row = CombineRowFormat::make(args.hidden, args.num_topk);
    EP_HOST_ASSERT_MSG(row.stride <= args.combine_stride, "a combine row of ", row.stride,
                       " bytes does not fit the handle's ", args.combine_stride, "-byte slots");

    CombineRoundParams params{view, args, row, 0, 0, timeout_context(view, wait)};
    const LaunchConfig copy_config{dim3(args.num_sms), dim3(kCopyThreads), 0, stream, false};
    const LaunchConfig control_config{dim3(1), dim3(kControlThreads), 0, stream, false};
    for (int round = 0; round < args.num_rounds; ++round) {
        params.round = round;
        params.round_start = round * args.rows_per_round;
        launch_kernel(copy_config, combine_push_kernel, params);
        launch_kernel(control_config, combine_node_barrier_kernel, params);
        launch_kernel(copy_config, combine_reduce_kernel, params);
        launch_kernel(control_config, combine_arrive_kernel, params);
        launch_kernel(copy_config, combine_finish_kernel, params);
        launch_global_barrier(view, wait, args.num_rounds_device, round, stream);
    }
}

}  // namespace ep::internode
