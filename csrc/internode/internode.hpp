// Internode (hierarchical) normal-mode dispatch and combine: R = N nodes x P ranks per node, on one NVSHMEM
// symmetric buffer per rank laid out as buffer_layout.hpp says. Raw device pointers and a stream; no torch.
//
// A dispatch is notify (send positions, every rank's count row to every rank, rank_prefix_matrix, the host's
// counts), then rounds of
//   send     each token once per destination node, to its forwarder (put with signal, or direct stores where
//            nvshmem_ptr maps the forwarder)
//   arrive   the forwarder waits for the rows of the round from every source node, then a node barrier
//   pull     each rank reads the rows it needs from the forwarders of its node (NVLink) into the received tensors
//   barrier  all ranks: staging is free for the next round
// A combine reverses it: push (each rank writes its rows into the forwarders' staging), node barrier, reduce (the
// forwarder sums a token's rows of its node in float32 and sends one bf16 partial per node to the source), arrive
// (the source waits for the partials), finish (the source adds them up with the bias), barrier.
//
// Rounds are counted on the device (notify writes num_rounds_device); a launcher may launch more rounds than that
// (num_worst_tokens: the host does not know the count) and the extra ones return at once on every rank alike.
// Only the one-block arrive/barrier kernels spin, so ranks sharing a GPU under MPS cannot deadlock on SMs.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../common/error_record.hpp"
#include "buffer_layout.hpp"

namespace ep::internode {

// This rank's symmetric buffer (the same address on every PE; peers through nvshmem_ptr / NVSHMEM puts).
struct Buffers {
    void* base;
    size_t num_bytes;  // Buffer.num_rdma_bytes, equal on every rank
    int rank;
    int num_ranks;        // R = N * P
    int num_local_ranks;  // P
    // Ranks of other nodes only through NVSHMEM puts and signals, though nvshmem_ptr may map them (one GPU playing
    // several nodes; deep_ep_py.config.emulate_network, DEEP_EP_PY_EMULATE_NETWORK).
    bool emulate_network;
};

// Notify of a (non-cached) dispatch. T tokens, R ranks, N nodes, L local experts.
struct NotifyArgs {
    const bool* is_token_in_rank;      // [T, R]
    int num_tokens;                    // T
    const int* num_tokens_per_expert;  // [R * L]
    int num_local_experts;             // L <= kMaxLocalExperts
    int expert_alignment;              // >= 1
    int rows_per_round;                // B
    int max_rounds;                    // rounds the launcher will launch at most: num_rounds_device is capped there
    // Scratch and outputs (device):
    int* send_pos;            // [T, R]: ordinal of token t among this rank's tokens for rank d, -1 when not sent
    int* send_counts;         // [R]
    int* node_send_pos;       // [T, N]: ordinal of token t among this rank's tokens for node n, -1 when not sent
    int* node_send_list;      // [N, T]: token of each node ordinal
    int* node_send_counts;    // [N]
    int* rank_prefix_matrix;  // [R, R]: [i][r] = tokens rank r receives from ranks 0..i
    int* node_counts;         // [R, N]: tokens rank s sends to node n, for every s
    int* num_rounds_device;   // [1]
    int* host_counters;       // kNumHostCounters ints (device view of host memory), filled when host_sequence > 0
    int host_sequence;
    int num_worst_tokens;     // > 0: the rows the host allocated without a sync; more leave a capacity record
};

void notify_dispatch(const Buffers& buffers, const NotifyArgs& args, const WaitConfig& wait, cudaStream_t stream);

// The rounds of a dispatch (cached or not).
struct DispatchArgs {
    int num_rounds;  // launched; the kernels stop at *num_rounds_device
    int rows_per_round;
    int dispatch_stride;  // staging slot strides the handle reserved (reserved_dispatch/combine_stride)
    int combine_stride;
    // Sender side.
    const void* x;               // [T, payload_bytes] row-major (bf16 or fp8)
    int payload_bytes;           // multiple of 16
    const float* x_scales;       // [T, num_scales] with any strides, or nullptr
    int num_scales;
    int64_t scale_stride_token;  // elements
    int64_t scale_stride_group;  // elements
    const int64_t* topk_idx;     // [T, K] or nullptr
    const float* topk_weights;   // [T, K] or nullptr
    int num_topk;                // K (0 without top-k)
    int num_tokens;              // T
    const int* send_pos;         // [T, R]
    const int* node_send_list;   // [N, T]
    // Everyone's counts (from notify).
    const int* rank_prefix_matrix;  // [R, R]
    const int* node_counts;         // [R, N]
    const int* num_rounds_device;   // [1]
    // Receiver side.
    void* recv_x;               // [N_cap, payload_bytes]
    float* recv_scales;         // [N_cap, num_scales] row-major, or nullptr
    int* recv_src_idx;          // [N_cap] or nullptr (cached dispatch)
    int64_t* recv_topk_idx;     // [N_cap, K] or nullptr: local expert id, -1 where not local
    float* recv_topk_weights;   // [N_cap, K] or nullptr: 0 where not local
    int* recv_node_slot;        // [N_cap]: the row's node ordinal at its source (for combine)
    int num_recv_rows;          // N_cap
    bool pad_rows;              // fill rows [N, N_cap): x 0, scales 0, src -1, idx -1, w 0, node slot -1
    int num_local_experts;      // L
    // Forwarder side.
    int* forward_mask;          // [F_cap]: receiver mask of each forwarded row, by (source node, node ordinal)
    int num_forward_rows;       // F_cap
    int num_sms;
};

void dispatch(const Buffers& buffers, const DispatchArgs& args, const WaitConfig& wait, cudaStream_t stream);

// The rounds of a combine, with the handle of the dispatch it reverses.
struct CombineArgs {
    int num_rounds;
    int rows_per_round;
    int dispatch_stride;
    int combine_stride;
    int hidden;
    // Receiver side (this rank as the dispatch's receiver).
    const void* x;               // bf16 [num_x_rows, hidden]
    int num_x_rows;
    const float* topk_weights;   // [num_x_rows, K] or nullptr
    int num_topk;                // K (0 without weights)
    const int* recv_node_slot;   // [num_x_rows]
    // Everyone's counts.
    const int* rank_prefix_matrix;  // [R, R]
    const int* node_counts;         // [R, N]
    const int* num_rounds_device;   // [1]
    // Forwarder side.
    const int* forward_mask;  // [F_cap]
    int num_forward_rows;
    // Source side.
    const int* node_send_pos;  // [T, N]
    int num_tokens;            // T
    const void* bias0;         // bf16 [T, hidden] or nullptr
    const void* bias1;         // bf16 [T, hidden] or nullptr
    float* acc_x;              // float32 [T, hidden] when num_rounds > 1, else nullptr
    float* acc_weights;        // float32 [T, K] when num_rounds > 1 and K > 0, else nullptr
    void* combined_x;          // bf16 [T, hidden]
    float* combined_weights;   // [T, K] or nullptr
    int num_sms;
};

void combine(const Buffers& buffers, const CombineArgs& args, const WaitConfig& wait, cudaStream_t stream);

// One barrier of all ranks (tests, teardown).
void barrier(const Buffers& buffers, const WaitConfig& wait, cudaStream_t stream);

// Whether nvshmem_ptr maps every rank of this rank's node (the pull and push steps read and write them directly).
bool node_peers_mapped(const Buffers& buffers);

}  // namespace ep::internode
