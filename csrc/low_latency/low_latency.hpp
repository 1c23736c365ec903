// Low-latency (decode) dispatch and combine on NVSHMEM's standard device API: the host entry points. Raw device
// pointers and a stream, no torch; deep_ep_py/backends/low_latency.py allocates the outputs and calls these.
//
// T tokens on this rank, H hidden, K top-k, R ranks, E experts, L = E / R local experts, M max tokens per rank.
// Each call is split into a send launch and a receive launch (hook mode runs the receive later), so no SM spins
// between them. Every launch is CUDA-graph capturable: fixed grid, no host sync, no allocation.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/error_record.hpp"

namespace ep::low_latency {

// What dispatch puts on the wire and writes into recv_x.
enum class DispatchFormat : int {
    kBf16 = 0,           // recv_x bf16 [L, R*M, H], no scales
    kFp8 = 1,            // fp8 e4m3 + float32 scales [L, R*M, H/128] (column-major in the last two dims)
    kFp8RoundScale = 2,  // as kFp8, each scale rounded up to a power of two
    kFp8Ue8m0 = 3,       // as kFp8RoundScale, scales stored as exponent bytes: int32 [L, R*M, H/512] col-major
};

// Sizes shared by all launches of one call.
struct Shape {
    int num_max_tokens;  // M
    int hidden;          // H
    int num_ranks;       // R
    int num_experts;     // E
    int rank;            // this rank = this PE
};

struct Launch {
    int num_blocks;  // grid size of every kernel of the call (each loops over its work)
    cudaStream_t stream;
    DeviceErrorRecord* error_record;  // device view of the host-mapped record a timed-out wait fills in
    uint64_t timeout_ns;              // how long one wait may take; the record's channel is the awaited rank
    bool trap_on_error;               // trap after recording (WaitConfig::trap_on_error)
    // enable_shrink (DeepEP's shrink mode): a wait for a peer past the deadline masks that peer in rank_mask instead
    // of recording a timeout, and the call completes without it (as if it had been masked before the call).
    bool mask_on_timeout;
    // 0: a peer that nvshmem_ptr maps gets direct stores, any other NVSHMEM puts and signals. k > 0 (one GPU playing
    // nodes of k ranks, DEEP_EP_PY_EMULATE_NETWORK=1): peers outside this rank's block of k consecutive ranks get
    // puts and signals even where mapped, so the path a NIC takes runs, and is tested, on a machine without one.
    int emulated_node_size;
};

// Total bytes of the symmetric buffer layout (buffer_layout.hpp), for the check against config.py's hint.
int64_t buffer_bytes(int num_max_tokens, int hidden, int num_ranks, int num_experts);

struct DispatchArgs {
    const void* x;            // bf16 [T, H], 16-byte aligned
    const int64_t* topk_idx;  // int64 [T, K], -1 = none
    int num_tokens;           // T <= M
    int num_topk;             // K
    int* rank_mask;           // int32 [R] on the device, 1 = masked (neither sent to nor waited for); written by
                              // the receive under Launch::mask_on_timeout
    DispatchFormat format;
    void* buffer;             // symmetric buffer base (buffer_layout.hpp)
    int half_idx;             // 0 or 1
    int* workspace;           // int32 [workspace_ints(E)], zero between launches
    int* last_half;           // int32 [1]: 1 + the half of this rank's previous call (any E), 0 after a clean
    // Receive outputs (written by dispatch_recv):
    void* recv_x;             // [L, R*M, H] bf16 or fp8
    void* recv_scales;        // float32 [L, H/128, R*M] or int32 [L, H/512, R*M] storage; nullptr for bf16
    int* src_info;            // int32 [L, R*M]: source token of each row (rows past recv_count: untouched)
    int* src_topk_slot;       // int32 [L, R*M]: top-k slot of each row
    int64_t* layout_range;    // int64 [L, R]: (row offset << 32) | rows, source ranks in increasing order
    int* recv_count;          // int32 [L]
    int* cumulative_recv_stats;  // int32 [L] or nullptr: recv_count is added
    int64_t* wait_recv_cost_stats;  // int64 [R] or nullptr: ns waited for each source, summed over local experts
};

// Cast (fp8 formats) and send every (token, top-k choice) to its expert's rank, then signal the counts.
void dispatch_send(const Shape& shape, const DispatchArgs& args, const Launch& launch);
// Wait for every unmasked source's counts and pack the received rows into the outputs; reset the signals.
void dispatch_recv(const Shape& shape, const DispatchArgs& args, const Launch& launch);

struct CombineArgs {
    const void* x;                // bf16 [L, R*M, H] expert outputs (the zero-copy buffer itself with zero_copy)
    const int* src_info;          // int32 [L, R*M] from the dispatch handle
    const int* src_topk_slot;     // int32 [L, R*M]
    const int64_t* layout_range;  // int64 [L, R]
    const int64_t* topk_idx;      // int64 [T, K] of this rank's tokens (as given to dispatch)
    const float* topk_weights;    // float32 [T, K]
    int num_tokens;               // T
    int num_topk;                 // K <= max(E, 16)
    int* rank_mask;               // int32 [R] on the device, as in DispatchArgs
    void* buffer;
    int half_idx;
    int* workspace;
    int* last_half;               // as in DispatchArgs
    void* out;                    // bf16 [T, H]
    int64_t* wait_recv_cost_stats;  // int64 [R] or nullptr
};

// Send each received row back to its source rank's slot (token, top-k slot); signal per (local expert, source).
void combine_send(const Shape& shape, const CombineArgs& args, const Launch& launch);
// Wait for every unmasked expert's signal, then out[t] = sum_k w[t,k] * row(t,k) in float32; reset the signals.
void combine_recv(const Shape& shape, const CombineArgs& args, const Launch& launch);

// clean_low_latency_buffer's barrier, where a dead rank must not hang the others: each rank sets its word of every
// unmasked peer's sync_words (symmetric uint64 [R]) to epoch, then waits for the word of every unmasked peer to
// reach epoch; a peer that does not arrive within the timeout is masked (Launch::mask_on_timeout) or recorded as a
// timeout. One block; epoch grows by one per barrier, in step on the ranks that take part.
void masked_barrier(uint64_t* sync_words, uint64_t epoch, int* rank_mask, int rank, int num_ranks,
                    const Launch& launch);

}  // namespace ep::low_latency
