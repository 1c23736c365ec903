// Low-latency dispatch: a send kernel (cast, deliver each (token, top-k choice) to its expert's rank, signal the
// counts) and a receive kernel (wait per (local expert, source rank), pack into recv_x). See buffer_layout.hpp for the
// buffer and low_latency.hpp for the outputs.
//
// Protocol of one call on half h, between sender s and receiver r:
//   1. s writes message slot [l][s][slot] of r's recv area (slot from s's counter for expert (r, l)).
//   2. s's block fences (system scope; one nvshmem_quiet first where it used puts) and arrives on a grid counter;
//      the last block to arrive reads the final per-expert counts and sets r's signal [l][s] = count + 1 (and
//      s's shape tag, device_common.cuh) with a release store (or nvshmemx_signal_op). Data therefore precedes the
//      signal for every delivery path.
//   3. r polls [l][s] with an acquire load (timeout_while), reads the count, packs the rows, and its last block
//      resets all of half h's dispatch signals to 0. s writes that signal again at the earliest two calls later,
//      after r has gone through the call in between (which waits for s in turn), so the reset cannot lose it.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "../common/exception.hpp"
#include "../common/launch.cuh"
#include "device_common.cuh"
#include "buffer_layout.hpp"
#include "low_latency.hpp"

namespace ep::low_latency {

namespace {

constexpr float kFp8Max = 448.0f;
constexpr float kFp8AmaxMin = 1e-4f;

struct DispatchParams {
    Shape shape;
    DispatchArgs args;
    Launch launch;
    BufferLayout layout;
};

__device__ __forceinline__ bool rounds_scale(DispatchFormat format) {
    return format == DispatchFormat::kFp8RoundScale || format == DispatchFormat::kFp8Ue8m0;
}

// The smallest power of two >= scale (positive, normal): scale itself when its mantissa is zero, else the next
// exponent with a zero mantissa. Same as deep_ep_py/fp8.py round_up_to_power_of_two.
__device__ __forceinline__ float round_up_to_power_of_two(float scale) {
    uint32_t bits = __float_as_uint(scale);
    if ((bits & 0x007FFFFFu) != 0) bits = (bits & 0x7F800000u) + 0x00800000u;
    return __uint_as_float(bits);
}

// One warp casts one group of 128 bf16 channels to e4m3, bit-exact with deep_ep_py/fp8.py: lane l holds channels
// 4l..4l+3; amax over the group (clamped to >= 1e-4), scale = amax / 448 (rounded up to a power of two with
// round_scale), value = x / scale (true IEEE divisions, not a reciprocal), round-to-nearest-even to e4m3.
__device__ __forceinline__ void cast_group_to_fp8(const __nv_bfloat16* x_group, uint8_t* values, float* scale_out,
                                                  bool round_scale, int lane_idx) {
    const uint2 raw = *reinterpret_cast<const uint2*>(x_group + 4 * lane_idx);
    const float2 v01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
    const float2 v23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
    float amax = fmaxf(fmaxf(fabsf(v01.x), fabsf(v01.y)), fmaxf(fabsf(v23.x), fabsf(v23.y)));
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, mask));
    float scale = __fdiv_rn(fmaxf(amax, kFp8AmaxMin), kFp8Max);
    if (round_scale) scale = round_up_to_power_of_two(scale);
    const float2 q01 = make_float2(__fdiv_rn(v01.x, scale), __fdiv_rn(v01.y, scale));
    const float2 q23 = make_float2(__fdiv_rn(v23.x, scale), __fdiv_rn(v23.y, scale));
    // .x lands in the low byte: channel 4l at the lowest address.
    const uint32_t packed = static_cast<uint32_t>(__nv_cvt_float2_to_fp8x2(q01, __NV_SATFINITE, __NV_E4M3)) |
                            (static_cast<uint32_t>(__nv_cvt_float2_to_fp8x2(q23, __NV_SATFINITE, __NV_E4M3)) << 16);
    *reinterpret_cast<uint32_t*>(values + 4 * lane_idx) = packed;
    if (lane_idx == 0) *scale_out = scale;
}

// Block b handles tokens b, b + grid, ...: the block writes the token's message into the send area once, then
// warp w delivers top-k choices w, w + 8, ... to their experts' ranks.
__global__ void __launch_bounds__(kNumThreadsPerBlock) dispatch_send_kernel(const DispatchParams p) {
    const Shape& shape = p.shape;
    const DispatchArgs& args = p.args;
    const BufferLayout& layout = p.layout;
    const HalfPointers half(args.buffer, layout, args.half_idx);
    if (blockIdx.x == 0 && threadIdx.x == 0)
        check_halves_alternate(args.last_half, args.half_idx, p.launch, shape.rank);
    const int lane_idx = static_cast<int>(threadIdx.x) % 32;
    const int warp_idx = static_cast<int>(threadIdx.x) / 32;
    const int hidden = shape.hidden;
    const int num_ranks = shape.num_ranks;
    const int num_local_experts = layout.num_local_experts;
    const int64_t msg_bytes = layout.dispatch_msg_bytes;
    const bool is_fp8 = args.format != DispatchFormat::kBf16;
    // Bytes of a message this format fills (the slot stride is the larger bf16 size): header, payload, scales.
    const int64_t used_msg_bytes =
        align_up(kHeaderBytes + (is_fp8 ? hidden + 4 * (hidden / kFp8GroupSize) : 2 * static_cast<int64_t>(hidden)), 16);
    const int64_t msg_int4 = used_msg_bytes / 16;
    int* workspace = half_workspace(args.workspace, shape.num_experts, args.half_idx);
    int* next_slot = workspace;                           // [E]
    int* num_finished_blocks = workspace + shape.num_experts;
    bool issued_puts = false;

    for (int token_idx = static_cast<int>(blockIdx.x); token_idx < args.num_tokens;
         token_idx += static_cast<int>(gridDim.x)) {
        uint8_t* msg = half.send + token_idx * msg_bytes;
        const __nv_bfloat16* x_row = static_cast<const __nv_bfloat16*>(args.x) + static_cast<int64_t>(token_idx) * hidden;
        if (is_fp8) {
            float* scales = reinterpret_cast<float*>(msg + kHeaderBytes + hidden);
            for (int group_idx = warp_idx; group_idx < hidden / kFp8GroupSize; group_idx += kNumWarpsPerBlock)
                cast_group_to_fp8(x_row + group_idx * kFp8GroupSize, msg + kHeaderBytes + group_idx * kFp8GroupSize,
                                  scales + group_idx, rounds_scale(args.format), lane_idx);
        } else {
            const int4* src = reinterpret_cast<const int4*>(x_row);
            int4* dst = reinterpret_cast<int4*>(msg + kHeaderBytes);
            for (int i = static_cast<int>(threadIdx.x); i < hidden / 8; i += kNumThreadsPerBlock)
                dst[i] = ptx::ld_nc_no_allocate(src + i);
        }
        __syncthreads();  // the message is complete before any warp copies it

        for (int topk_slot = warp_idx; topk_slot < args.num_topk; topk_slot += kNumWarpsPerBlock) {
            // Uniform across the warp: every lane reads the same choice.
            const int64_t expert_idx = args.topk_idx[static_cast<int64_t>(token_idx) * args.num_topk + topk_slot];
            if (!expert_id_is_usable(expert_idx, shape.num_experts, p.launch.error_record, p.launch.trap_on_error,
                                     shape.rank, token_idx, WaitSite::kTopkIdxLowLatencyDispatch))
                continue;
            const int dst_rank = static_cast<int>(expert_idx / num_local_experts);
            if (args.rank_mask[dst_rank] != 0) continue;
            int slot = 0;
            if (lane_idx == 0) slot = atomicAdd(next_slot + expert_idx, 1);
            slot = __shfl_sync(0xffffffffu, slot, 0);
            // More than M rows for one (expert, source) happens only when tokens repeat an expert; those are dropped
            // (the count sent is capped at M to match).
            if (slot >= shape.num_max_tokens) continue;
            const int local_expert = static_cast<int>(expert_idx % num_local_experts);
            uint8_t* dst_msg = half.recv + ((static_cast<int64_t>(local_expert) * num_ranks + shape.rank) *
                                                shape.num_max_tokens + slot) * msg_bytes;
            int4* peer_msg = reinterpret_cast<int4*>(mapped_peer(p.launch, dst_msg, dst_rank, shape.rank));
            if (peer_msg != nullptr) {
                // P2P-mapped (NVLink, or the same GPU): direct stores; header first word, payload after.
                if (lane_idx == 0) peer_msg[0] = make_int4(token_idx, topk_slot, 0, 0);
                const int4* src = reinterpret_cast<const int4*>(msg);
                for (int64_t i = 1 + lane_idx; i < msg_int4; i += 32) peer_msg[i] = src[i];
            } else {
                // Through the remote transport: the payload from the (symmetric) send area, the header by value.
                __threadfence_system();
                nvshmemx_putmem_nbi_warp(dst_msg + kHeaderBytes, msg + kHeaderBytes, used_msg_bytes - kHeaderBytes,
                                         dst_rank);
                if (lane_idx == 0) {
                    nvshmem_int_p(reinterpret_cast<int*>(dst_msg), token_idx, dst_rank);
                    nvshmem_int_p(reinterpret_cast<int*>(dst_msg) + 1, topk_slot, dst_rank);
                }
                issued_puts = true;
            }
        }
    }

    // Puts complete before this block arrives; the last block then announces every expert's count.
    quiet_block_puts(issued_puts);
    if (arrive_is_last_block(num_finished_blocks)) {
        const uint32_t tag = shape_tag(shape, static_cast<int>(args.format));
        for (int expert_idx = static_cast<int>(threadIdx.x); expert_idx < shape.num_experts;
             expert_idx += kNumThreadsPerBlock) {
            const int count = min(ptx::ld_relaxed_gpu(next_slot + expert_idx), shape.num_max_tokens);
            next_slot[expert_idx] = 0;
            const int dst_rank = expert_idx / num_local_experts;
            if (args.rank_mask[dst_rank] != 0) continue;
            uint64_t* signal =
                half.dispatch_signals + static_cast<int64_t>(expert_idx % num_local_experts) * num_ranks + shape.rank;
            set_peer_signal(signal, mapped_peer(p.launch, signal, dst_rank, shape.rank), tagged_signal(tag, count + 1),
                            dst_rank);
        }
        if (threadIdx.x == 0) *num_finished_blocks = 0;
    }
}

// Under enable_shrink a source may be masked while the units of one call read its signal: one unit took its rows,
// another found it masked, and the offsets of the sources after it (which every unit sums itself) would disagree,
// leaving rows unwritten or written twice. So the first unit to read a (local expert, source) signal decides for
// all: *decision (zero before the call) becomes rows + 1, or kRowsSkipped; every unit takes what it holds.
// Returns the rows to take, -1 for none, or kRowsUnseen when that wait failed. A unit that takes rows it did not
// see arrive acquires the signal itself until it reads it set (the decider saw it set, and it is reset only after
// every unit of the call), so that the rows are visible to it: the relaxed CAS alone orders nothing. That wait is
// timed too: it ends at once in correct use, but a signal zeroed under it (two receives on one half at once, a
// clean from another thread) would hold it forever.
constexpr int kRowsSkipped = -1;
constexpr int kRowsUnseen = -2;

__device__ __forceinline__ int agree_on_rows(int* decision, int rows, const uint64_t* signal,
                                             const TimeoutContext& ctx) {
    const int mine = rows < 0 ? kRowsSkipped : rows + 1;
    const int earlier = atomicCAS(decision, 0, mine);
    if (earlier == 0 || earlier == mine) return rows;
    if (earlier == kRowsSkipped) return -1;
    if (!timeout_while([&] { return ptx::ld_acquire_sys(signal) == 0; }, ctx, WaitSite::kLowLatencyRecvCount))
        return kRowsUnseen;
    return earlier - 1;
}

__device__ __forceinline__ int warp_sum(int value) {
#pragma unroll
    for (int mask = 16; mask > 0; mask >>= 1) value += __shfl_xor_sync(0xffffffffu, value, mask);
    return value;
}

// Block b handles units b, b + grid, ... of (local expert l, source rank s). Rows of expert l are laid out by
// source rank: unit (l, s) starts after the counts of sources 0..s-1, so warp 0 waits for all of them (lane i for
// sources i, i + 32, ...), then the block copies source s's rows.
__global__ void __launch_bounds__(kNumThreadsPerBlock) dispatch_recv_kernel(const DispatchParams p) {
    const Shape& shape = p.shape;
    const DispatchArgs& args = p.args;
    const BufferLayout& layout = p.layout;
    const HalfPointers half(args.buffer, layout, args.half_idx);
    const int lane_idx = static_cast<int>(threadIdx.x) % 32;
    const int warp_idx = static_cast<int>(threadIdx.x) / 32;
    const int hidden = shape.hidden;
    const int num_ranks = shape.num_ranks;
    const int num_local_experts = layout.num_local_experts;
    const int64_t num_slots = static_cast<int64_t>(num_ranks) * shape.num_max_tokens;  // R*M rows per expert
    const int64_t msg_bytes = layout.dispatch_msg_bytes;
    const int num_groups = hidden / kFp8GroupSize;
    int* workspace = half_workspace(args.workspace, shape.num_experts, args.half_idx);
    int* num_finished_blocks = workspace + shape.num_experts + 1;
    int* row_decisions = workspace + shape.num_experts + 3;  // [L][R], agree_on_rows
    const uint32_t own_tag = shape_tag(shape, static_cast<int>(args.format));
    __shared__ int unit_offset, unit_count, unit_failed;

    for (int unit = static_cast<int>(blockIdx.x); unit < num_local_experts * num_ranks;
         unit += static_cast<int>(gridDim.x)) {
        const int local_expert = unit / num_ranks;
        const int src_rank = unit % num_ranks;
        if (warp_idx == 0) {
            const uint64_t* unit_signals = half.dispatch_signals + static_cast<int64_t>(local_expert) * num_ranks;
            int offset = 0, count = 0, failed = 0;
            for (int rank = lane_idx; rank <= src_rank; rank += 32) {
                const uint64_t start_ns = ptx::read_globaltimer();
                uint64_t value = 0;
                const PeerWait wait = wait_peer_signal(unit_signals + rank, value, args.rank_mask, rank, shape.rank,
                                                       p.launch, WaitSite::kLowLatencyRecvCount);
                // A signal of another shape (or more than M rows): none of that peer's rows is read, and the
                // record says why.
                if (wait == PeerWait::kFailed ||
                    (wait == PeerWait::kArrived &&
                     !check_signal_shape(value, shape, own_tag, shape.num_max_tokens + 1, rank, p.launch))) {
                    failed = 1;
                    continue;
                }
                // A masked source sends nothing here: it counts as no rows.
                int num_rows = wait == PeerWait::kArrived ? static_cast<int>(static_cast<uint32_t>(value)) - 1 : -1;
                if (p.launch.mask_on_timeout)
                    num_rows = agree_on_rows(row_decisions + static_cast<int64_t>(local_expert) * num_ranks + rank,
                                             num_rows, unit_signals + rank, timeout_context(p.launch, shape.rank, rank));
                if (num_rows == kRowsUnseen) failed = 1;
                if (num_rows < 0) continue;
                if (rank < src_rank) {
                    offset += num_rows;
                } else {
                    count = num_rows;
                    if (args.wait_recv_cost_stats != nullptr)
                        atomicAdd(reinterpret_cast<unsigned long long*>(args.wait_recv_cost_stats + rank),
                                  static_cast<unsigned long long>(ptx::read_globaltimer() - start_ns));
                }
            }
            offset = warp_sum(offset);
            count = warp_sum(count);
            failed = warp_sum(failed);
            // Rows from a peer without a P2P mapping came over the network: lane 0 settles them after the lane
            // that polled the signal saw it. A shuffle orders no memory accesses in the PTX model; __syncwarp does,
            // among the lanes it joins.
            __syncwarp();
            if (lane_idx == 0 && failed == 0 && count > 0 &&
                mapped_peer(p.launch, unit_signals, src_rank, shape.rank) == nullptr)
                settle_network_writes(unit_signals + src_rank);
            if (lane_idx == 0) {
                unit_offset = offset;
                unit_count = count;
                unit_failed = failed;
            }
        }
        __syncthreads();
        const bool failed = unit_failed != 0;
        const int offset = unit_offset;
        // A wait timed out (the error record says which): copy nothing, but still write an empty, in-bounds range
        // and count below, so that a combine launched on this handle before the host sees the error reads no
        // garbage offsets (an illegal address would turn the timeout into a sticky CUDA error).
        const int count = failed ? 0 : unit_count;
        __syncthreads();  // warp 0 rewrites the shared values for the next unit only after all have read them

        const uint8_t* unit_msgs =
            half.recv + (static_cast<int64_t>(local_expert) * num_ranks + src_rank) * shape.num_max_tokens * msg_bytes;
        for (int i = warp_idx; i < count; i += kNumWarpsPerBlock) {
            const uint8_t* msg = unit_msgs + i * msg_bytes;
            const int4 header = *reinterpret_cast<const int4*>(msg);
            const int64_t row = offset + i;                         // within expert local_expert
            const int64_t flat_row = local_expert * num_slots + row;  // within [L, R*M]
            if (lane_idx == 0) {
                args.src_info[flat_row] = header.x;
                args.src_topk_slot[flat_row] = header.y;
            }
            const int4* payload = reinterpret_cast<const int4*>(msg + kHeaderBytes);
            if (args.format == DispatchFormat::kBf16) {
                warp_copy_int4(reinterpret_cast<int4*>(static_cast<__nv_bfloat16*>(args.recv_x) + flat_row * hidden),
                               payload, hidden / 8, lane_idx);
                continue;
            }
            warp_copy_int4(reinterpret_cast<int4*>(static_cast<uint8_t*>(args.recv_x) + flat_row * hidden), payload,
                           hidden / 16, lane_idx);
            const float* scales = reinterpret_cast<const float*>(msg + kHeaderBytes + hidden);
            // Column-major in the last two dims: element (l, row, col) at (l * cols + col) * R*M + row.
            if (args.format != DispatchFormat::kFp8Ue8m0) {
                float* out = static_cast<float*>(args.recv_scales) + local_expert * num_groups * num_slots + row;
                for (int g = lane_idx; g < num_groups; g += 32) out[g * num_slots] = scales[g];
            } else {
                const int num_cols = num_groups / kUe8m0GroupsPerInt;
                int* out = static_cast<int*>(args.recv_scales) + local_expert * num_cols * num_slots + row;
                for (int c = lane_idx; c < num_cols; c += 32) {
                    uint32_t packed = 0;
#pragma unroll
                    for (int j = 0; j < kUe8m0GroupsPerInt; ++j)  // lowest group in the lowest byte
                        packed |= ((__float_as_uint(scales[c * kUe8m0GroupsPerInt + j]) >> 23) & 0xFFu) << (8 * j);
                    out[c * num_slots] = static_cast<int>(packed);
                }
            }
        }
        if (threadIdx.x == 0) {
            args.layout_range[static_cast<int64_t>(local_expert) * num_ranks + src_rank] =
                (static_cast<int64_t>(offset) << 32) | static_cast<int64_t>(count);
            if (src_rank == num_ranks - 1) {
                args.recv_count[local_expert] = offset + count;
                if (args.cumulative_recv_stats != nullptr && !failed)
                    atomicAdd(args.cumulative_recv_stats + local_expert, offset + count);
            }
        }
    }

    // Every unit has read its signals: the last block clears them for the call two calls from now.
    if (arrive_is_last_block(num_finished_blocks)) {
        for (int i = static_cast<int>(threadIdx.x); i < num_local_experts * num_ranks; i += kNumThreadsPerBlock) {
            half.dispatch_signals[i] = 0;
            row_decisions[i] = 0;
        }
        if (threadIdx.x == 0) *num_finished_blocks = 0;
    }
}

void check_dispatch(const Shape& shape, const DispatchArgs& args, const Launch& launch) {
    EP_HOST_ASSERT(shape.num_ranks > 0);
    EP_HOST_ASSERT(shape.rank >= 0);
    EP_HOST_ASSERT(shape.rank < shape.num_ranks);
    EP_HOST_ASSERT(shape.num_experts % shape.num_ranks == 0);
    EP_HOST_ASSERT(shape.num_max_tokens > 0);
    EP_HOST_ASSERT(args.num_tokens >= 0);
    EP_HOST_ASSERT(args.num_tokens <= shape.num_max_tokens);
    EP_HOST_ASSERT(args.num_topk > 0);
    EP_HOST_ASSERT(shape.hidden % 8 == 0);
    if (args.format != DispatchFormat::kBf16) EP_HOST_ASSERT(shape.hidden % kFp8GroupSize == 0);
    if (args.format == DispatchFormat::kFp8Ue8m0) EP_HOST_ASSERT(shape.hidden % (kFp8GroupSize * kUe8m0GroupsPerInt) == 0);
    EP_HOST_ASSERT(reinterpret_cast<uintptr_t>(args.x) % 16 == 0);
    EP_HOST_ASSERT(args.buffer != nullptr);
    EP_HOST_ASSERT(args.workspace != nullptr);
    EP_HOST_ASSERT(args.last_half != nullptr);
    EP_HOST_ASSERT(args.rank_mask != nullptr);
    EP_HOST_ASSERT((args.half_idx == 0 || args.half_idx == 1));
    EP_HOST_ASSERT(launch.num_blocks > 0);
    EP_HOST_ASSERT(launch.error_record != nullptr);
}

}  // namespace

int64_t buffer_bytes(int num_max_tokens, int hidden, int num_ranks, int num_experts) {
    EP_HOST_ASSERT(num_ranks > 0);
    EP_HOST_ASSERT(num_experts % num_ranks == 0);
    return BufferLayout(num_max_tokens, hidden, num_ranks, num_experts).total_bytes;
}

void dispatch_send(const Shape& shape, const DispatchArgs& args, const Launch& launch) {
    check_dispatch(shape, args, launch);
    const DispatchParams params{shape, args, launch,
                                BufferLayout(shape.num_max_tokens, shape.hidden, shape.num_ranks, shape.num_experts)};
    launch_kernel(LaunchConfig{dim3(launch.num_blocks), dim3(kNumThreadsPerBlock), 0, launch.stream, false},
                  dispatch_send_kernel, params);
}

void dispatch_recv(const Shape& shape, const DispatchArgs& args, const Launch& launch) {
    check_dispatch(shape, args, launch);
    EP_HOST_ASSERT(args.recv_x != nullptr);
    EP_HOST_ASSERT((args.format == DispatchFormat::kBf16 || args.recv_scales != nullptr));
    EP_HOST_ASSERT(args.src_info != nullptr);
    EP_HOST_ASSERT(args.src_topk_slot != nullptr);
    EP_HOST_ASSERT(args.layout_range != nullptr);
    EP_HOST_ASSERT(args.recv_count != nullptr);
    const DispatchParams params{shape, args, launch,
                                BufferLayout(shape.num_max_tokens, shape.hidden, shape.num_ranks, shape.num_experts)};
    launch_kernel(LaunchConfig{dim3(launch.num_blocks), dim3(kNumThreadsPerBlock), 0, launch.stream, false},
                  dispatch_recv_kernel, params);
}

}  // namespace ep::low_latency
