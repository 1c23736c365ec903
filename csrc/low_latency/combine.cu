// Low-latency combine: a send kernel (each received row goes back to its source rank, into the slot of its
// (token, top-k slot)) and a receive kernel (wait for every expert, then the weighted sum per token).
//
// Protocol of one call on half h, between expert rank r and source rank s:
//   1. r's block for unit (local expert l, source s) writes each of those rows into s's combine recv area at
//      [token][top-k slot] (direct stores where P2P-mapped, else staged in r's send area and put).
//   2. The block fences (system scope; one nvshmem_quiet first where it used puts), syncs, and one thread sets s's
//      combine signal [r * L + l] = 1 (and r's shape tag, device_common.cuh) with a release store (or
//      nvshmemx_signal_op): the rows precede the signal.
//   3. s waits with acquire loads for the signal of every expert on an unmasked rank, then reduces; its last block
//      resets the signals. Rows of one call never mix with another's: a (token, slot) is read only when this
//      call's top-k names an expert that sent it in this call.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "../common/exception.hpp"
#include "../common/launch.cuh"
#include "device_common.cuh"
#include "buffer_layout.hpp"
#include "low_latency.hpp"

namespace ep::low_latency {

namespace {

struct CombineParams {
    Shape shape;
    CombineArgs args;
    Launch launch;
    BufferLayout layout;
};

// Block b handles units b, b + grid, ... of (local expert l, source rank s); warp w sends rows w, w + 8, ...
__global__ void __launch_bounds__(kNumThreadsPerBlock) combine_send_kernel(const CombineParams p) {
    const Shape& shape = p.shape;
    const CombineArgs& args = p.args;
    const BufferLayout& layout = p.layout;
    const HalfPointers half(args.buffer, layout, args.half_idx);
    if (blockIdx.x == 0 && threadIdx.x == 0)
        check_halves_alternate(args.last_half, args.half_idx, p.launch, shape.rank);
    const int lane_idx = static_cast<int>(threadIdx.x) % 32;
    const int warp_idx = static_cast<int>(threadIdx.x) / 32;
    const int hidden = shape.hidden;
    const int num_ranks = shape.num_ranks;
    const int num_local_experts = layout.num_local_experts;
    const int64_t num_slots = static_cast<int64_t>(num_ranks) * shape.num_max_tokens;
    const int64_t row_bytes = 2 * static_cast<int64_t>(hidden);
    const int64_t msg_bytes = layout.combine_msg_bytes;

    for (int unit = static_cast<int>(blockIdx.x); unit < num_local_experts * num_ranks;
         unit += static_cast<int>(gridDim.x)) {
        const int local_expert = unit / num_ranks;
        const int dst_rank = unit % num_ranks;  // the source rank of these rows at dispatch
        // Not uniform across the block: under enable_shrink a receive of this rank on another stream may mask
        // dst_rank between two warps' reads. So a masked unit still takes the unit's barrier below (a warp that
        // skipped it would pair its later barriers with the wrong units and hang the block), and thread 0 reads
        // the mask again after it before signalling.
        const bool dst_masked = rank_is_masked(args.rank_mask, dst_rank);
        // Clamped to the expert's rows: a handle whose receive never ran (a hook not called, a combine not ordered
        // after it) holds garbage here, and an address fault under MPS would end every rank on the GPU.
        const int64_t range = args.layout_range[static_cast<int64_t>(local_expert) * num_ranks + dst_rank];
        const int64_t raw_offset = range >> 32, raw_count = range & 0xFFFFFFFF;
        const int offset = static_cast<int>(raw_offset < 0 ? 0 : (raw_offset > num_slots ? num_slots : raw_offset));
        const int64_t rows_left = num_slots - offset;
        const int count = dst_masked ? 0 : static_cast<int>(raw_count > rows_left ? rows_left : raw_count);
        bool issued_puts = false;
        for (int i = warp_idx; i < count; i += kNumWarpsPerBlock) {
            const int64_t flat_row = local_expert * num_slots + offset + i;
            const int token_idx = args.src_info[flat_row];
            const int topk_slot = args.src_topk_slot[flat_row];
            if (token_idx < 0 || token_idx >= shape.num_max_tokens || topk_slot < 0 ||
                topk_slot >= layout.combine_slots_per_token)
                continue;
            const int4* src = reinterpret_cast<const int4*>(static_cast<const uint8_t*>(args.x) + flat_row * row_bytes);
            uint8_t* dst = half.recv + (static_cast<int64_t>(token_idx) * layout.combine_slots_per_token + topk_slot) * msg_bytes;
            int4* peer_dst = reinterpret_cast<int4*>(mapped_peer(p.launch, dst, dst_rank, shape.rank));
            if (peer_dst != nullptr) {
                for (int64_t j = lane_idx; j < row_bytes / 16; j += 32) peer_dst[j] = ptx::ld_nc_no_allocate(src + j);
            } else {
                // Puts read from symmetric memory: stage the row in the send area, where the zero-copy buffer
                // already has it.
                int4* staging = reinterpret_cast<int4*>(half.send + flat_row * msg_bytes);
                if (staging != src) {
                    warp_copy_int4(staging, src, row_bytes / 16, lane_idx);
                    __syncwarp();
                }
                __threadfence_system();
                nvshmemx_putmem_nbi_warp(dst, staging, row_bytes, dst_rank);
                issued_puts = true;
            }
        }
        // The block barrier: every row of this unit is stored or put, and thread 0 quiets the puts before it signals.
        // The direct stores need no fence of their own here: the barrier orders them before thread 0's release of
        // the signal (st.release.sys, cumulative over what the barrier made thread 0 observe), as a grid sync orders
        // a block's writes by one thread's fence after its barrier.
        quiet_block_puts(issued_puts);
        // A rank is only ever masked during a kernel, never un-masked, and the barrier orders every warp's read
        // of its word before this one: a unit some warp skipped as masked is never announced complete (to a rank
        // that may be slow rather than dead, and would sum that warp's rows from an earlier call).
        if (threadIdx.x == 0 && !rank_is_masked(args.rank_mask, dst_rank)) {
            const int expert_idx = shape.rank * num_local_experts + local_expert;
            uint64_t* signal = half.combine_signals + expert_idx;
            set_peer_signal(signal, mapped_peer(p.launch, signal, dst_rank, shape.rank),
                            tagged_signal(shape_tag(shape, kCombineFormat), 1), dst_rank);
        }
    }
}

// Every block first waits for all experts on unmasked ranks (thread i for experts i, i + 256, ...), then block b
// reduces tokens b, b + grid, ...; the weights and validity of a token's top-k sit in dynamic shared memory.
__global__ void __launch_bounds__(kNumThreadsPerBlock) combine_recv_kernel(const CombineParams p) {
    EP_DYNAMIC_SHARED(float, topk_weight_smem);  // [K] weight, 0 where the choice is not summed
    const Shape& shape = p.shape;
    const CombineArgs& args = p.args;
    const BufferLayout& layout = p.layout;
    const HalfPointers half(args.buffer, layout, args.half_idx);
    const int hidden = shape.hidden;
    const int num_local_experts = layout.num_local_experts;
    const int num_topk = args.num_topk;
    int* topk_valid_smem = reinterpret_cast<int*>(topk_weight_smem + num_topk);  // [K] 1 = summed
    int* num_finished_blocks = half_workspace(args.workspace, shape.num_experts, args.half_idx) + shape.num_experts + 2;

    int failed = 0, from_network = 0;
    const uint32_t own_tag = shape_tag(shape, kCombineFormat);
    for (int expert_idx = static_cast<int>(threadIdx.x); expert_idx < shape.num_experts;
         expert_idx += kNumThreadsPerBlock) {
        const int rank = expert_idx / num_local_experts;
        const uint64_t* signal = half.combine_signals + expert_idx;
        const uint64_t start_ns = ptx::read_globaltimer();
        uint64_t value = 0;
        const PeerWait wait =
            wait_peer_signal(signal, value, args.rank_mask, rank, shape.rank, p.launch, WaitSite::kLowLatencyRecvFlag);
        if (wait == PeerWait::kMasked) continue;  // its experts' rows are left out of the sums below
        if (wait == PeerWait::kFailed || !check_signal_shape(value, shape, own_tag, 1, rank, p.launch)) {
            failed = 1;
        } else if (blockIdx.x == 0 && args.wait_recv_cost_stats != nullptr) {
            atomicAdd(reinterpret_cast<unsigned long long*>(args.wait_recv_cost_stats + rank),
                      static_cast<unsigned long long>(ptx::read_globaltimer() - start_ns));
        }
        if (mapped_peer(p.launch, signal, rank, shape.rank) == nullptr) from_network = 1;
    }
    // The barrier also carries every thread's acquire to the whole block before the rows are read.
    failed = __syncthreads_or(failed);
    // Rows from peers without a P2P mapping came over the network. Ordered before the other threads' reads by the
    // barrier after the first token's weights below.
    if (__syncthreads_or(from_network) && failed == 0 && threadIdx.x == 0)
        settle_network_writes(half.combine_signals);

    if (failed == 0) {
        __nv_bfloat16* out = static_cast<__nv_bfloat16*>(args.out);
        for (int token_idx = static_cast<int>(blockIdx.x); token_idx < args.num_tokens;
             token_idx += static_cast<int>(gridDim.x)) {
            for (int k = static_cast<int>(threadIdx.x); k < num_topk; k += kNumThreadsPerBlock) {
                const int64_t expert_idx = args.topk_idx[static_cast<int64_t>(token_idx) * num_topk + k];
                const bool valid = expert_id_is_usable(expert_idx, shape.num_experts, p.launch.error_record,
                                                       p.launch.trap_on_error, shape.rank, token_idx,
                                                       WaitSite::kTopkIdxLowLatencyCombine) &&
                                   !rank_is_masked(args.rank_mask, static_cast<int>(expert_idx / num_local_experts));
                topk_valid_smem[k] = valid ? 1 : 0;
                topk_weight_smem[k] = args.topk_weights[static_cast<int64_t>(token_idx) * num_topk + k];
            }
            __syncthreads();
            const uint8_t* token_rows =
                half.recv + static_cast<int64_t>(token_idx) * layout.combine_slots_per_token * layout.combine_msg_bytes;
            for (int chunk = static_cast<int>(threadIdx.x); chunk < hidden / 8; chunk += kNumThreadsPerBlock) {
                float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
                for (int k = 0; k < num_topk; ++k) {
                    if (topk_valid_smem[k] == 0) continue;
                    const int4 packed =
                        reinterpret_cast<const int4*>(token_rows + k * layout.combine_msg_bytes)[chunk];
                    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&packed);
                    const float weight = topk_weight_smem[k];
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const float2 values = __bfloat1622float2(pairs[j]);
                        acc[2 * j] += weight * values.x;
                        acc[2 * j + 1] += weight * values.y;
                    }
                }
                int4 result;
                __nv_bfloat162* result_pairs = reinterpret_cast<__nv_bfloat162*>(&result);
#pragma unroll
                for (int j = 0; j < 4; ++j) result_pairs[j] = __floats2bfloat162_rn(acc[2 * j], acc[2 * j + 1]);
                reinterpret_cast<int4*>(out + static_cast<int64_t>(token_idx) * hidden)[chunk] = result;
            }
            __syncthreads();  // the next token rewrites the shared top-k
        }
    }

    if (arrive_is_last_block(num_finished_blocks)) {
        for (int i = static_cast<int>(threadIdx.x); i < shape.num_experts; i += kNumThreadsPerBlock)
            half.combine_signals[i] = 0;
        if (threadIdx.x == 0) *num_finished_blocks = 0;
    }
}

void check_combine(const Shape& shape, const CombineArgs& args, const Launch& launch) {
    EP_HOST_ASSERT(shape.num_ranks > 0);
    EP_HOST_ASSERT(shape.rank >= 0);
    EP_HOST_ASSERT(shape.rank < shape.num_ranks);
    EP_HOST_ASSERT(shape.num_experts % shape.num_ranks == 0);
    EP_HOST_ASSERT(shape.hidden % 8 == 0);
    EP_HOST_ASSERT(args.num_tokens >= 0);
    EP_HOST_ASSERT(args.num_tokens <= shape.num_max_tokens);
    EP_HOST_ASSERT(args.num_topk > 0);
    const BufferLayout layout(shape.num_max_tokens, shape.hidden, shape.num_ranks, shape.num_experts);
    EP_HOST_ASSERT_MSG(args.num_topk <= layout.combine_slots_per_token,
                       "the combine receive area keeps max(num_experts, 16) top-k slots per token");
    EP_HOST_ASSERT(reinterpret_cast<uintptr_t>(args.x) % 16 == 0);
    EP_HOST_ASSERT(reinterpret_cast<uintptr_t>(args.out) % 16 == 0);
    EP_HOST_ASSERT(args.buffer != nullptr);
    EP_HOST_ASSERT(args.workspace != nullptr);
    EP_HOST_ASSERT(args.last_half != nullptr);
    EP_HOST_ASSERT(args.rank_mask != nullptr);
    EP_HOST_ASSERT((args.half_idx == 0 || args.half_idx == 1));
    EP_HOST_ASSERT(launch.num_blocks > 0);
    EP_HOST_ASSERT(launch.error_record != nullptr);
}

}  // namespace

void combine_send(const Shape& shape, const CombineArgs& args, const Launch& launch) {
    check_combine(shape, args, launch);
    EP_HOST_ASSERT(args.src_info != nullptr);
    EP_HOST_ASSERT(args.src_topk_slot != nullptr);
    EP_HOST_ASSERT(args.layout_range != nullptr);
    const CombineParams params{shape, args, launch,
                               BufferLayout(shape.num_max_tokens, shape.hidden, shape.num_ranks, shape.num_experts)};
    launch_kernel(LaunchConfig{dim3(launch.num_blocks), dim3(kNumThreadsPerBlock), 0, launch.stream, false},
                  combine_send_kernel, params);
}

void combine_recv(const Shape& shape, const CombineArgs& args, const Launch& launch) {
    check_combine(shape, args, launch);
    if (args.num_tokens > 0) {
        EP_HOST_ASSERT(args.topk_idx != nullptr);
        EP_HOST_ASSERT(args.topk_weights != nullptr);
        EP_HOST_ASSERT(args.out != nullptr);
    }
    const CombineParams params{shape, args, launch,
                               BufferLayout(shape.num_max_tokens, shape.hidden, shape.num_ranks, shape.num_experts)};
    const size_t smem_bytes = static_cast<size_t>(args.num_topk) * (sizeof(float) + sizeof(int));
    launch_kernel(LaunchConfig{dim3(launch.num_blocks), dim3(kNumThreadsPerBlock), smem_bytes, launch.stream, false},
                  combine_recv_kernel, params);
}

}  // namespace ep::low_latency
