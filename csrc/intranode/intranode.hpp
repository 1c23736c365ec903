// Intranode normal-mode dispatch and combine (all ranks of the group on one node, 1..8 ranks), over IPC-mapped
// buffers laid out as buffer_layout.hpp says. Raw device pointers and a stream; no torch.
//
// A dispatch is: notify (send positions, counts to every peer, one barrier, rank_prefix_matrix and the host's
// counts), then num_rounds rounds of [send kernel -> barrier -> receive kernel -> barrier]. A cached dispatch skips
// notify; a combine runs the rounds in the reverse direction and reduces at the source. Without a host sync
// (num_worst_tokens) the host launches the most rounds the counts could need, and those past the count the notify
// found (num_rounds_device) return at once, barriers included, on every rank alike.
//
// One-copy dispatch (DispatchArgs::one_copy): the received tensors of every rank live in its receive arena, a
// second IPC-mapped allocation, so senders write rows straight into them: [publish (each receiver writes where its
// block is) -> barrier -> send -> barrier], one HBM read and one write per payload byte instead of two of each.
// A receiver without a block this call publishes none; then every rank finds that after the publish barrier, the
// one-copy send does nothing, and the rounds (launched after it in every one-copy dispatch) carry the rows.
// One-copy combine (CombineArgs::one_copy) is the same in reverse: each rank publishes where its combine input
// (and its top-k weights) sit in its arena, and every source reads the rows it sums straight from their ranks:
// [publish -> barrier -> pull and sum -> barrier], one read of each row where the rounds write it into staging and
// read it back.
//
// Only the barrier kernels (one block each) spin on other ranks; the copy kernels never wait, so ranks sharing one
// GPU under MPS cannot deadlock on SM occupancy.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../common/error_record.hpp"
#include "buffer_layout.hpp"

namespace ep::intranode {

// Every rank's buffer as this process sees it (IPC-mapped peers, own pointer at `rank`).
struct PeerBuffers {
    void* base[kMaxRanks];
    size_t num_bytes;  // Buffer.num_nvl_bytes, equal on every rank
    int rank;
    int num_ranks;
};

using ep::WaitConfig;

// Notify of a (non-cached) dispatch. Shapes: T tokens, R ranks, L local experts.
struct NotifyArgs {
    const bool* is_token_in_rank;      // [T, R]
    int num_tokens;                    // T
    const int* num_tokens_per_expert;  // [R * L]
    int num_local_experts;             // L <= kMaxLocalExperts
    int expert_alignment;              // >= 1
    int rows_per_round;                // B
    int max_rounds;                    // rounds the launcher will launch at most: num_rounds_device is capped there
    // Outputs (device):
    int* send_pos;            // [T, R]: ordinal of token t among this rank's tokens for rank d, -1 when not sent
    int* send_list;           // [R, T]: token index of each ordinal (the first send_counts[d] entries of row d)
    int* send_counts;         // [R]
    int* rank_prefix_matrix;  // [R, R]: [i][r] = tokens rank r receives from ranks 0..i
    int* num_rounds_device;   // [1]: rounds the count matrix needs, at least 1 (0 when the notify failed)
    // Host-mapped counters (device view of kNumHostCounters ints), filled when host_sequence > 0.
    int* host_counters;
    int host_sequence;
    // > 0: the rows the host allocated without a sync; more rows for this rank leave a capacity record.
    int num_worst_tokens;
};

void notify_dispatch(const PeerBuffers& peers, const NotifyArgs& args, const WaitConfig& wait, cudaStream_t stream);

// The rounds of a dispatch (cached or not). N_cap = rows allocated in the received tensors.
struct DispatchArgs {
    int num_rounds;                 // launched; the kernels and barriers of rounds past *num_rounds_device do nothing
    const int* num_rounds_device;   // [1], from the notify of the dispatch (or of the cached handle's)
    int rows_per_round;
    // Sender side.
    const void* x;             // [T, payload_bytes] row-major (bf16 or fp8)
    int payload_bytes;         // bytes per row of x: multiple of 16
    const float* x_scales;     // [T, num_scales] with any strides, or nullptr
    int num_scales;
    int64_t scale_stride_token;  // elements
    int64_t scale_stride_group;  // elements
    const int64_t* topk_idx;   // [T, K] or nullptr
    const float* topk_weights; // [T, K] or nullptr
    int num_topk;              // K (0 without top-k)
    int num_tokens;            // T
    const int* send_list;      // [R, T]
    const int* send_counts;    // [R]
    // Receiver side.
    const int* rank_prefix_matrix;  // [R, R]
    void* recv_x;                   // [N_cap, payload_bytes]
    float* recv_scales;             // [N_cap, num_scales] row-major, or nullptr
    int* recv_src_idx;              // [N_cap]
    int64_t* recv_topk_idx;         // [N_cap, K] or nullptr: local expert id, -1 where not local
    float* recv_topk_weights;       // [N_cap, K] or nullptr: 0 where not local
    int num_recv_rows;              // N_cap
    bool pad_rows;                  // fill rows [N, N_cap) (num_worst_tokens): x 0, scales 0, src -1, idx -1, w 0
    int num_local_experts;          // L
    int num_sms;                    // blocks of the copy kernels
    // One-copy mode: every rank's receive arena as this process sees it, and where this rank's recv_* tensors
    // above sit in its own arena (num_rows -1: they do not, this call goes through staging on every rank).
    bool one_copy;
    void* recv_arenas[kMaxRanks];
    RecvBlock recv_block;
};

void dispatch(const PeerBuffers& peers, const DispatchArgs& args, const WaitConfig& wait, cudaStream_t stream);

// The rounds of a combine, with the handle of the dispatch it reverses.
struct CombineArgs {
    int num_rounds;                 // launched, as DispatchArgs
    const int* num_rounds_device;   // [1], from the notify of the handle's dispatch
    int rows_per_round;
    int hidden;
    // Sender side (this rank as the dispatch's receiver).
    const void* x;                  // bf16 [num_x_rows, hidden]
    int num_x_rows;
    const float* topk_weights;      // [num_x_rows, K] or nullptr
    int num_topk;                   // K (0 without weights)
    const int* rank_prefix_matrix;  // [R, R]
    // Reducer side (this rank as the dispatch's source).
    const int* send_pos;            // [T, R]
    int num_tokens;                 // T
    const void* bias0;              // bf16 [T, hidden] or nullptr
    const void* bias1;              // bf16 [T, hidden] or nullptr
    float* acc_x;                   // float32 [T, hidden] when num_rounds > 1, else nullptr
    float* acc_weights;             // float32 [T, K] when num_rounds > 1 and K > 0, else nullptr
    void* combined_x;               // bf16 [T, hidden]
    float* combined_weights;        // [T, K] or nullptr
    int num_sms;
    // One-copy mode: every rank's receive arena as this process sees it, and where this rank's x and topk_weights
    // sit in its own arena (num_rows -1: they do not, and this call goes through staging on every rank). The
    // source then reads every row it sums straight from the rank that holds it.
    bool one_copy;
    void* recv_arenas[kMaxRanks];
    RecvBlock recv_block;
};

void combine(const PeerBuffers& peers, const CombineArgs& args, const WaitConfig& wait, cudaStream_t stream);

// One cross-rank barrier (for tests and teardown).
void barrier(const PeerBuffers& peers, const WaitConfig& wait, cudaStream_t stream);

}  // namespace ep::intranode
