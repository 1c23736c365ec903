// One dispatched token through a staging slot, shared by the intranode and internode dispatch kernels. `Row` is a
// row format (intranode or internode DispatchRowFormat) with the offsets payload / scales_offset / src_idx_offset /
// topk_idx_offset / topk_weights_offset and the counts payload_bytes, num_scales, num_topk; its own extra fields
// (the internode receiver mask) are the caller's. Each function is called by all lanes of one warp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "exception.hpp"
#include "rounds.cuh"

namespace ep {

// The host checks both dispatch launchers (intranode, internode) make on the arguments their DispatchArgs share by
// name: rounds, row sizes, and the tensors a call with tokens or received rows must have. Tensors with no rows may
// be null (torch gives zero-size tensors no storage).
template <typename Args>
void check_dispatch_row_args(const Args& args) {
    EP_HOST_ASSERT(args.num_rounds >= 1);
    EP_HOST_ASSERT(args.rows_per_round >= 1);
    EP_HOST_ASSERT(args.payload_bytes > 0);
    EP_HOST_ASSERT_MSG(args.payload_bytes % 16 == 0, "rows must be whole 16-byte chunks");
    EP_HOST_ASSERT(args.num_scales >= 0);
    EP_HOST_ASSERT(args.num_topk >= 0);
    EP_HOST_ASSERT(args.num_tokens >= 0);
    EP_HOST_ASSERT(args.num_recv_rows >= 0);
    if (args.num_tokens > 0) {
        EP_HOST_ASSERT(args.x != nullptr);
        if (args.num_scales > 0) EP_HOST_ASSERT(args.x_scales != nullptr);
        if (args.num_topk > 0) EP_HOST_ASSERT(args.topk_idx != nullptr);
        if (args.num_topk > 0) EP_HOST_ASSERT(args.topk_weights != nullptr);
    }
    if (args.num_recv_rows > 0) {
        EP_HOST_ASSERT(args.recv_x != nullptr);
        if (args.num_scales > 0) EP_HOST_ASSERT(args.recv_scales != nullptr);
        if (args.num_topk > 0) EP_HOST_ASSERT(args.recv_topk_idx != nullptr);
        if (args.num_topk > 0) EP_HOST_ASSERT(args.recv_topk_weights != nullptr);
    }
    EP_HOST_ASSERT(args.rank_prefix_matrix != nullptr);
    EP_HOST_ASSERT(args.num_local_experts >= 1);
    EP_HOST_ASSERT(args.num_sms >= 1);
}

// Where a dispatch's received rows go (N_cap rows; pointers of absent outputs are null).
struct ReceivedRows {
    uint8_t* x;              // [N_cap, payload_bytes]
    float* scales;           // [N_cap, num_scales] row-major
    int* src_idx;            // [N_cap], or nullptr (cached dispatch)
    int64_t* topk_idx;       // [N_cap, K]: local expert id, -1 where not local
    float* topk_weights;     // [N_cap, K]: 0 where not local
};

// Entry `entry` of a received row's top-k: the global expert id as a local id of the receiver's experts
// [first_local_expert, + num_local_experts) with its weight, or -1 with weight 0 for another rank's expert.
__device__ __forceinline__ void store_received_topk(const ReceivedRows& out, int64_t entry, int64_t expert,
                                                    float weight, int64_t first_local_expert,
                                                    int num_local_experts) {
    const int64_t local_expert = expert - first_local_expert;
    const bool is_local = expert >= 0 && local_expert >= 0 && local_expert < num_local_experts;
    __stcg(reinterpret_cast<long long*>(out.topk_idx) + entry, is_local ? local_expert : -1LL);
    __stcg(out.topk_weights + entry, is_local ? weight : 0.0f);
}

// The sender's token (payload from x, scales with any strides, source index, top-k ids and weights) into `slot`.
// Stores stay out of L1 (.cg): another rank's kernel reads the slot.
template <typename Row>
__device__ __forceinline__ void pack_dispatch_row(uint8_t* slot, const Row& row, const uint8_t* x,
                                                  const float* x_scales, int64_t scale_stride_token,
                                                  int64_t scale_stride_group, const int64_t* topk_idx,
                                                  const float* topk_weights, int token, int lane) {
    warp_copy_to_staging(reinterpret_cast<int4*>(slot),
                         reinterpret_cast<const int4*>(x + static_cast<int64_t>(token) * row.payload_bytes),
                         row.payload_bytes / 16, lane);
    float* slot_scales = reinterpret_cast<float*>(slot + row.scales_offset);
    for (int group = lane; group < row.num_scales; group += 32)
        __stcg(slot_scales + group, __ldg(x_scales + token * scale_stride_token + group * scale_stride_group));
    if (lane == 0) __stcg(reinterpret_cast<int*>(slot + row.src_idx_offset), token);
    long long* slot_topk_idx = reinterpret_cast<long long*>(slot + row.topk_idx_offset);
    float* slot_topk_weights = reinterpret_cast<float*>(slot + row.topk_weights_offset);
    for (int k = lane; k < row.num_topk; k += 32) {
        const int64_t entry = static_cast<int64_t>(token) * row.num_topk + k;
        __stcg(slot_topk_idx + k, __ldg(reinterpret_cast<const long long*>(topk_idx) + entry));
        __stcg(slot_topk_weights + k, __ldg(topk_weights + entry));
    }
}

// A slot (written by a peer in an earlier kernel) into received row `out_row`; global expert ids become local ids
// of the experts [first_local_expert, + num_local_experts), -1 (weight 0) for the others. Loads bypass L1 (.cg).
template <typename Row>
__device__ __forceinline__ void unpack_dispatch_row(const uint8_t* slot, const Row& row, const ReceivedRows& out,
                                                    int out_row, int64_t first_local_expert, int num_local_experts,
                                                    int lane) {
    warp_copy_from_staging(reinterpret_cast<int4*>(out.x + static_cast<int64_t>(out_row) * row.payload_bytes),
                           reinterpret_cast<const int4*>(slot), row.payload_bytes / 16, lane);
    const float* slot_scales = reinterpret_cast<const float*>(slot + row.scales_offset);
    for (int group = lane; group < row.num_scales; group += 32)
        out.scales[static_cast<int64_t>(out_row) * row.num_scales + group] = __ldcg(slot_scales + group);
    if (lane == 0 && out.src_idx != nullptr)
        out.src_idx[out_row] = __ldcg(reinterpret_cast<const int*>(slot + row.src_idx_offset));
    const long long* slot_topk_idx = reinterpret_cast<const long long*>(slot + row.topk_idx_offset);
    const float* slot_topk_weights = reinterpret_cast<const float*>(slot + row.topk_weights_offset);
    for (int k = lane; k < row.num_topk; k += 32) {
        store_received_topk(out, static_cast<int64_t>(out_row) * row.num_topk + k, __ldcg(slot_topk_idx + k),
                            __ldcg(slot_topk_weights + k), first_local_expert, num_local_experts);
    }
}

// The sender's token straight into received row `out_row` of a receiver whose tensors this process maps (the
// one-copy dispatch): what pack_dispatch_row then unpack_dispatch_row leave there, with one pass over the bytes.
// first_local_expert and num_local_experts are the receiver's. Stores stay out of L1 (.cg).
template <typename Row>
__device__ __forceinline__ void write_dispatch_row(const ReceivedRows& out, int out_row, const Row& row,
                                                   const uint8_t* x, const float* x_scales,
                                                   int64_t scale_stride_token, int64_t scale_stride_group,
                                                   const int64_t* topk_idx, const float* topk_weights, int token,
                                                   int64_t first_local_expert, int num_local_experts, int lane) {
    warp_copy_to_staging(reinterpret_cast<int4*>(out.x + static_cast<int64_t>(out_row) * row.payload_bytes),
                         reinterpret_cast<const int4*>(x + static_cast<int64_t>(token) * row.payload_bytes),
                         row.payload_bytes / 16, lane);
    for (int group = lane; group < row.num_scales; group += 32)
        __stcg(out.scales + static_cast<int64_t>(out_row) * row.num_scales + group,
               __ldg(x_scales + token * scale_stride_token + group * scale_stride_group));
    if (lane == 0 && out.src_idx != nullptr) __stcg(out.src_idx + out_row, token);
    for (int k = lane; k < row.num_topk; k += 32) {
        const int64_t entry = static_cast<int64_t>(token) * row.num_topk + k;
        store_received_topk(out, static_cast<int64_t>(out_row) * row.num_topk + k,
                            __ldg(reinterpret_cast<const long long*>(topk_idx) + entry), __ldg(topk_weights + entry),
                            first_local_expert, num_local_experts);
    }
}

// A padding row of num_worst_tokens (past the real count): x 0, scales 0, source index -1, top-k -1, weights 0.
template <typename Row>
__device__ __forceinline__ void pad_dispatch_row(const Row& row, const ReceivedRows& out, int out_row, int lane) {
    int4* payload = reinterpret_cast<int4*>(out.x + static_cast<int64_t>(out_row) * row.payload_bytes);
    for (int i = lane; i < row.payload_bytes / 16; i += 32) payload[i] = make_int4(0, 0, 0, 0);
    for (int group = lane; group < row.num_scales; group += 32)
        out.scales[static_cast<int64_t>(out_row) * row.num_scales + group] = 0.0f;
    if (lane == 0 && out.src_idx != nullptr) out.src_idx[out_row] = -1;
    for (int k = lane; k < row.num_topk; k += 32) {
        const int64_t entry = static_cast<int64_t>(out_row) * row.num_topk + k;
        out.topk_idx[entry] = -1;
        out.topk_weights[entry] = 0.0f;
    }
}

}  // namespace ep
