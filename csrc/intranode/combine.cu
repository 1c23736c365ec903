// The rounds of an intranode combine: the dispatch's rounds run backwards. Each rank writes every row it received
// back into its source's staging, in the slot the row came from; the source sums the rows of each token in float32.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "../common/bf16_chunk.cuh"
#include "../common/exception.hpp"
#include "../common/launch.cuh"
#include "device_common.cuh"
#include "intranode.hpp"

namespace ep::intranode {

namespace {

struct CombineRoundParams {
    PeerBuffers peers;
    int round;
    int num_rounds;
    int rows_per_round;
    CombineRowFormat row;
    int hidden;
    const uint8_t* x;
    int num_x_rows;
    const float* topk_weights;
    const int* rank_prefix_matrix;
    const int* send_pos;
    int num_tokens;
    const __nv_bfloat16* bias0;
    const __nv_bfloat16* bias1;
    float* acc_x;
    float* acc_weights;
    __nv_bfloat16* combined_x;
    float* combined_weights;
    // One-copy combine: every rank's receive arena (where its published RecvBlock points), and whether this launch
    // is one: then the round kernels and barriers do nothing when the publish kernel noted every rank's block.
    void* recv_arenas[kMaxRanks];
    bool one_copy;
    const DeviceErrorRecord* record;  // this rank's: the sender writes nothing once it gave up (rank_gave_up)
    const int* num_rounds_device;     // rounds with rows (round_is_live); the last of them writes the bf16 sums
};

__device__ __forceinline__ bool rows_go_by_one_copy(const CombineRoundParams& p) {
    return p.one_copy && one_copy_noted(p.peers);
}

// Sender (the dispatch's receiver): row prefix_before(s) + round_start + j of x goes to slot (me, j) of source s,
// the slot the dispatch took it from. None once this rank gave up (rank_gave_up).
__global__ void __launch_bounds__(kCopyThreads) combine_send_kernel(CombineRoundParams p) {
    if (rows_go_by_one_copy(p) || !round_is_live(p.num_rounds_device, p.round)) return;
    __shared__ int s_first_item[kMaxRanks + 1];
    __shared__ int s_first_row[kMaxRanks];
    const int num_ranks = p.peers.num_ranks;
    const int rank = p.peers.rank;
    const int round_start = p.round * p.rows_per_round;
    if (threadIdx.x == 0) {
        int total = 0;
        for (int src = 0; src < num_ranks; ++src) {
            const int start = prefix_before(p.rank_prefix_matrix, num_ranks, src, rank);
            const int count = p.rank_prefix_matrix[src * num_ranks + rank] - start;
            s_first_item[src] = total;
            s_first_row[src] = start + round_start;
            total += rows_in_round(count, round_start, p.rows_per_round);
        }
        s_first_item[num_ranks] = rank_gave_up(p.record) ? 0 : total;
    }
    __syncthreads();
    const int lane = lane_idx();
    const CombineRowFormat& row = p.row;
    for_each_item_by_rank(s_first_item, num_ranks, [&](int src, int slot_idx) {
        const int in_row = s_first_row[src] + slot_idx;
        if (in_row < 0 || in_row >= p.num_x_rows) return;  // only past a broken protocol: never read outside x
        uint8_t* slot = staging_slot(p.peers.base[src], rank, slot_idx, p.rows_per_round, row.stride);
        const int4* src_payload = reinterpret_cast<const int4*>(p.x + static_cast<int64_t>(in_row) * row.payload_bytes);
        warp_copy_to_staging(reinterpret_cast<int4*>(slot), src_payload, row.payload_bytes / 16, lane);
        float* slot_weights = reinterpret_cast<float*>(slot + row.weights_offset);
        for (int k = lane; k < row.num_topk; k += 32)
            __stcg(slot_weights + k, __ldg(p.topk_weights + static_cast<int64_t>(in_row) * row.num_topk + k));
    });
    release_peer_writes();
}

// Reducer (the dispatch's source): one warp per token. Rank d's row of token t sits in slot (d, send_pos[t][d] - round
// start) during the round that holds its ordinal. Sums go rank by rank from rank 0 (then the biases), so a one-round
// combine adds in the reference's order. Across rounds the partial sums live in acc_x / acc_weights (float32):
// round 0 writes them, later rounds add, the last live round (round_is_live) writes bf16.
// Time: with several rounds every token's accumulator is read and written each round; sizing the staging so one
// round suffices, or reducing only tokens complete in a round, removes that.
__global__ void __launch_bounds__(kCopyThreads) combine_reduce_kernel(CombineRoundParams p) {
    if (rows_go_by_one_copy(p)) return;
    const int num_live_rounds = min(p.num_rounds, ptx::ld_volatile_global(p.num_rounds_device));
    if (p.round >= num_live_rounds) return;
    const int num_ranks = p.peers.num_ranks;
    const int lane = lane_idx();
    const bool is_first = p.round == 0;
    const bool is_last = p.round == num_live_rounds - 1;
    const int round_start = p.round * p.rows_per_round;
    const CombineRowFormat& row = p.row;
    void* own_buffer = p.peers.base[p.peers.rank];
    const int num_chunks = p.hidden / kBf16PerChunk;
    for (int token = global_warp_idx(); token < p.num_tokens; token += num_global_warps()) {
        const uint8_t* slots[kMaxRanks];
        unsigned contributors = 0;
#pragma unroll
        for (int d = 0; d < kMaxRanks; ++d) {
            slots[d] = nullptr;
            if (d >= num_ranks) continue;
            const int ordinal = p.send_pos[static_cast<int64_t>(token) * num_ranks + d];
            const int slot_idx = ordinal - round_start;
            if (ordinal < 0 || slot_idx < 0 || slot_idx >= p.rows_per_round) continue;
            slots[d] = staging_slot(own_buffer, d, slot_idx, p.rows_per_round, row.stride);
            contributors |= 1u << d;
        }
        if (contributors == 0 && !is_first && !is_last) continue;  // nothing to add to the partial sums

        const int64_t row_offset = static_cast<int64_t>(token) * p.hidden;
        for (int chunk = lane; chunk < num_chunks; chunk += 32) {
            const int64_t offset = row_offset + static_cast<int64_t>(chunk) * kBf16PerChunk;
            float acc[kBf16PerChunk] = {};
            if (!is_first) load_float_chunk(acc, p.acc_x + offset);
#pragma unroll
            for (int d = 0; d < kMaxRanks; ++d) {
                if ((contributors >> d & 1u) == 0) continue;
                add_bf16_chunk(acc, __ldcg(reinterpret_cast<const int4*>(slots[d]) + chunk));
            }
            if (!is_last) {
                store_float_chunk(p.acc_x + offset, acc);
                continue;
            }
            if (p.bias0 != nullptr) add_bf16_chunk(acc, __ldg(reinterpret_cast<const int4*>(p.bias0 + offset)));
            if (p.bias1 != nullptr) add_bf16_chunk(acc, __ldg(reinterpret_cast<const int4*>(p.bias1 + offset)));
            reinterpret_cast<int4*>(p.combined_x + offset)[0] = to_bf16_chunk(acc);
        }

        for (int k = lane; k < row.num_topk; k += 32) {
            const int64_t entry = static_cast<int64_t>(token) * row.num_topk + k;
            float acc = is_first ? 0.0f : p.acc_weights[entry];
#pragma unroll
            for (int d = 0; d < kMaxRanks; ++d) {
                if ((contributors >> d & 1u) == 0) continue;
                acc += __ldcg(reinterpret_cast<const float*>(slots[d] + row.weights_offset) + k);
            }
            if (is_last) {
                p.combined_weights[entry] = acc;
            } else {
                p.acc_weights[entry] = acc;
            }
        }
    }
}

// One-copy combine (the dispatch's source pulls): one warp per token. Rank d received token t as its row
// prefix_before(me, d) + send_pos[t][d]; that row of d's combine input, published in d's arena, is read here over
// NVLink and summed in float32, rank by rank from rank 0 and then the biases (the reference's order), with no
// staging and no partial sums between rounds.
__global__ void __launch_bounds__(kCopyThreads) combine_pull_kernel(CombineRoundParams p) {
    if (!rows_go_by_one_copy(p)) return;
    __shared__ const uint8_t* s_x[kMaxRanks];
    __shared__ const float* s_weights[kMaxRanks];
    __shared__ int s_first_row[kMaxRanks];
    __shared__ int s_num_rows[kMaxRanks];
    const int num_ranks = p.peers.num_ranks;
    const int rank = p.peers.rank;
    if (threadIdx.x < num_ranks) {
        const int d = static_cast<int>(threadIdx.x);
        const RecvBlock* block = &control_area(p.peers.base[d])->recv_block;
        const uint8_t* base = static_cast<const uint8_t*>(p.recv_arenas[d]);
        const int64_t x_offset = ptx::ld_volatile_global(&block->x);
        const int64_t weights_offset = ptx::ld_volatile_global(&block->topk_weights);
        s_x[d] = x_offset < 0 ? nullptr : base + x_offset;
        s_weights[d] = weights_offset < 0 ? nullptr : reinterpret_cast<const float*>(base + weights_offset);
        s_num_rows[d] = static_cast<int>(ptx::ld_volatile_global(&block->num_rows));
        s_first_row[d] = prefix_before(p.rank_prefix_matrix, num_ranks, rank, d);
    }
    __syncthreads();
    const int lane = lane_idx();
    const int num_chunks = p.hidden / kBf16PerChunk;
    const int64_t row_bytes = static_cast<int64_t>(p.hidden) * 2;
    const int num_topk = p.row.num_topk;
    for (int token = global_warp_idx(); token < p.num_tokens; token += num_global_warps()) {
        int rows[kMaxRanks];
#pragma unroll
        for (int d = 0; d < kMaxRanks; ++d) {
            rows[d] = -1;
            if (d >= num_ranks) continue;
            const int ordinal = p.send_pos[static_cast<int64_t>(token) * num_ranks + d];
            const int row = s_first_row[d] + ordinal;
            // Only past a rank that broke the protocol: never read outside its input.
            if (ordinal >= 0 && row >= 0 && row < s_num_rows[d] && s_x[d] != nullptr) rows[d] = row;
        }
        const int64_t row_offset = static_cast<int64_t>(token) * p.hidden;
        for (int chunk = lane; chunk < num_chunks; chunk += 32) {
            const int64_t offset = row_offset + static_cast<int64_t>(chunk) * kBf16PerChunk;
            float acc[kBf16PerChunk] = {};
#pragma unroll
            for (int d = 0; d < kMaxRanks; ++d) {
                if (rows[d] < 0) continue;
                add_bf16_chunk(acc, __ldcg(reinterpret_cast<const int4*>(s_x[d] + rows[d] * row_bytes) + chunk));
            }
            if (p.bias0 != nullptr) add_bf16_chunk(acc, __ldg(reinterpret_cast<const int4*>(p.bias0 + offset)));
            if (p.bias1 != nullptr) add_bf16_chunk(acc, __ldg(reinterpret_cast<const int4*>(p.bias1 + offset)));
            reinterpret_cast<int4*>(p.combined_x + offset)[0] = to_bf16_chunk(acc);
        }
        for (int k = lane; k < num_topk; k += 32) {
            float acc = 0.0f;
#pragma unroll
            for (int d = 0; d < kMaxRanks; ++d) {
                if (rows[d] < 0 || s_weights[d] == nullptr) continue;
                acc += __ldcg(s_weights[d] + static_cast<int64_t>(rows[d]) * num_topk + k);
            }
            p.combined_weights[static_cast<int64_t>(token) * num_topk + k] = acc;
        }
    }
}

}  // namespace

void combine(const PeerBuffers& peers, const CombineArgs& args, const WaitConfig& wait, cudaStream_t stream) {
    check_peers(peers);
    EP_HOST_ASSERT(wait.record != nullptr);
    EP_HOST_ASSERT(args.num_rounds >= 1);
    EP_HOST_ASSERT(args.num_rounds_device != nullptr);
    EP_HOST_ASSERT(args.rows_per_round >= 1);
    EP_HOST_ASSERT(args.hidden > 0);
    EP_HOST_ASSERT_MSG(args.hidden % kBf16PerChunk == 0, "bf16 rows must be whole 16-byte chunks");
    EP_HOST_ASSERT(args.num_x_rows >= 0);
    EP_HOST_ASSERT(args.num_topk >= 0);
    // Tensors with no rows may be null (torch gives zero-size tensors no storage).
    if (args.num_x_rows > 0) EP_HOST_ASSERT(args.x != nullptr);
    if (args.num_x_rows > 0 && args.num_topk > 0) EP_HOST_ASSERT(args.topk_weights != nullptr);
    if (args.num_tokens > 0 && args.num_topk > 0) EP_HOST_ASSERT(args.combined_weights != nullptr);
    EP_HOST_ASSERT(args.rank_prefix_matrix != nullptr);
    EP_HOST_ASSERT(args.num_tokens >= 0);
    EP_HOST_ASSERT(args.num_sms >= 1);
    if (args.num_tokens > 0) {
        EP_HOST_ASSERT(args.send_pos != nullptr);
        EP_HOST_ASSERT(args.combined_x != nullptr);
    }
    if (args.num_rounds > 1 && args.num_tokens > 0) {
        EP_HOST_ASSERT_MSG(args.acc_x != nullptr, "several rounds need float32 partial sums");
        EP_HOST_ASSERT_MSG((args.num_topk == 0 || args.acc_weights != nullptr), "several rounds need partial weights");
    }
    if (args.one_copy) {
        check_one_copy(peers, args.recv_arenas, args.recv_block, args.num_x_rows);
        EP_HOST_ASSERT_MSG((args.recv_block.num_rows < 0 || args.num_topk == 0 || args.num_x_rows == 0 ||
                            args.recv_block.topk_weights >= 0),
                           "the combine weights must be in the arena with x");
    }
    const CombineRowFormat row = CombineRowFormat::make(args.hidden, args.num_topk);
    const size_t needed = static_cast<size_t>(peers.num_ranks) * args.rows_per_round * row.stride;
    EP_HOST_ASSERT_MSG(needed <= staging_bytes(peers.num_bytes), "rows_per_round ", args.rows_per_round,
                       " slots of ", row.stride, " bytes per rank do not fit the staging area");

    CombineRoundParams params{peers,
                              0,
                              args.num_rounds,
                              args.rows_per_round,
                              row,
                              args.hidden,
                              static_cast<const uint8_t*>(args.x),
                              args.num_x_rows,
                              args.topk_weights,
                              args.rank_prefix_matrix,
                              args.send_pos,
                              args.num_tokens,
                              static_cast<const __nv_bfloat16*>(args.bias0),
                              static_cast<const __nv_bfloat16*>(args.bias1),
                              args.acc_x,
                              args.acc_weights,
                              static_cast<__nv_bfloat16*>(args.combined_x),
                              args.combined_weights,
                              {},
                              args.one_copy,
                              wait.record,
                              args.num_rounds_device};
    for (int r = 0; r < kMaxRanks; ++r) params.recv_arenas[r] = args.recv_arenas[r];
    const LaunchConfig copy_config{dim3(args.num_sms), dim3(kCopyThreads), 0, stream, false};
    if (args.one_copy) {
        // publish, barrier (every input known), pull and sum, barrier (no rank reads this rank's input any more);
        // the rounds below then return at once, unless some rank had no block.
        launch_publish(peers, args.recv_block, wait, stream);
        launch_kernel(copy_config, combine_pull_kernel, params);
        launch_barrier(peers, wait, WaitSite::kIntranodeRoundBarrier, stream);
    }
    for (int round = 0; round < args.num_rounds; ++round) {
        params.round = round;
        launch_kernel(copy_config, combine_send_kernel, params);
        launch_barrier(peers, wait, WaitSite::kIntranodeRoundBarrier, stream, args.one_copy, args.num_rounds_device,
                       round);
        launch_kernel(copy_config, combine_reduce_kernel, params);
        launch_barrier(peers, wait, WaitSite::kIntranodeRoundBarrier, stream, args.one_copy, args.num_rounds_device,
                       round);
    }
}

}  // namespace ep::intranode
