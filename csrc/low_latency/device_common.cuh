// Device helpers shared by the low-latency kernels: timeouts, warp copies and the last-block election (memory-ordered
// loads and stores are in common/ptx.cuh, peer signals in common/peer_signal.cuh).
// Included by .cu files only (NVSHMEM device headers need relocatable device code).
#pragma once

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "../common/peer_signal.cuh"
#include "../common/ptx.cuh"
#include "../common/timeout.cuh"
#include "low_latency.hpp"

namespace ep::low_latency {

constexpr int kNumWarpsPerBlock = 8;
constexpr int kNumThreadsPerBlock = kNumWarpsPerBlock * 32;

__device__ __forceinline__ TimeoutContext timeout_context(const Launch& launch, int rank, int awaited_rank) {
    // channel = the rank waited for: the DeepEPTimeoutError then names the peer that never arrived.
    return TimeoutContext{launch.error_record, launch.timeout_ns, rank, awaited_rank, launch.trap_on_error};
}

// `pe`'s copy of the symmetric address `local` where the kernels store to it directly, or null where they reach it
// through NVSHMEM puts and signals: where nvshmem_ptr maps no P2P path, and under Launch::emulated_node_size for the
// ranks outside this rank's emulated node.
template <typename T>
__device__ __forceinline__ T* mapped_peer(const Launch& launch, T* local, int pe, int rank) {
    const int node_size = launch.emulated_node_size;
    if (node_size > 0 && pe / node_size != rank / node_size) return nullptr;
    return static_cast<T*>(nvshmem_ptr(local, pe));
}

// How a wait for a peer's signal word ended.
enum class PeerWait { kArrived, kMasked, kFailed };

// Waits for *signal, which `peer` writes, to turn nonzero. kArrived: value holds the word. kMasked: the peer is
// masked, before the wait or during it: under Launch::mask_on_timeout a wait past the deadline masks the peer (this
// one, or another waiter for it in any block), and every waiter for it then stops; its rows are not read. kFailed:
// the wait gave up, and the error record says why.
__device__ __forceinline__ PeerWait wait_peer_signal(const uint64_t* signal, uint64_t& value, int* rank_mask, int peer,
                                                     int rank, const Launch& launch, WaitSite site) {
    int* mask_word = rank_mask + peer;
    // Volatile: another block may mask the peer while this kernel runs.
    if (ptx::ld_volatile_global(mask_word) != 0) return PeerWait::kMasked;
    TimeoutContext ctx = timeout_context(launch, rank, peer);
    const bool mask_on_timeout = launch.mask_on_timeout;
    if (mask_on_timeout) ctx.mask_on_timeout = mask_word;
    const bool cleared = timeout_while(
        [&] {
            return (value = ptx::ld_acquire_sys(signal)) == 0 &&
                   !(mask_on_timeout && ptx::ld_volatile_global(mask_word) != 0);
        },
        ctx, site);
    if (cleared && value != 0) return PeerWait::kArrived;
    if (mask_on_timeout && ptx::ld_volatile_global(mask_word) != 0) return PeerWait::kMasked;
    return PeerWait::kFailed;
}

// Whether a peer is masked now (the mask may change while a kernel runs, under Launch::mask_on_timeout).
__device__ __forceinline__ bool rank_is_masked(const int* rank_mask, int rank) {
    return ptx::ld_volatile_global(rank_mask + rank) != 0;
}

// Copies num_int4 16-byte words with the lanes of one warp (plain loads: src may have been written by a peer
// before an acquire of this block, or by an earlier kernel).
__device__ __forceinline__ void warp_copy_int4(int4* dst, const int4* src, int64_t num_int4, int lane_idx) {
    for (int64_t i = lane_idx; i < num_int4; i += 32) dst[i] = src[i];
}

// Every thread of every block calls this once, after its block's work: returns true (in all threads of one
// block) in the block that arrived last. Each block fences its own writes (peer stores included) at system scope
// before its arrival, and the last block's arrival acquires them all, so what the last block does next (sending
// counts, resetting counters) is ordered after every block's work. The last block must reset *counter to 0.
__device__ __forceinline__ bool arrive_is_last_block(int* counter) {
    __shared__ int is_last;
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) is_last = ptx::atomic_add_acq_rel_sys(counter, 1) == static_cast<int>(gridDim.x) - 1;
    __syncthreads();
    return is_last != 0;
}

// A signal word carries the sender's call shape next to its count: [63:32] shape_tag, [31:0] count + 1 (dispatch)
// or 1 (combine). A receiver whose own tag differs was sent rows laid out for another M, H, E or format (ranks
// that pass different num_max_dispatch_tokens_per_rank, hidden, num_experts or use_fp8 / round_scale / ue8m0) and
// would read them at the wrong offsets: it records the peer and drops its rows instead (check_signal_shape).
// kCombineFormat stands for the combine's format (bf16 rows, whatever the dispatch sent).
constexpr int kCombineFormat = 7;

__device__ __forceinline__ uint32_t shape_tag(const Shape& shape, int format) {
    const uint32_t values[4] = {static_cast<uint32_t>(shape.num_max_tokens), static_cast<uint32_t>(shape.hidden),
                                static_cast<uint32_t>(shape.num_experts), static_cast<uint32_t>(format)};
    uint32_t tag = 0x811C9DC5u;  // FNV-1a over the four values
#pragma unroll
    for (int i = 0; i < 4; ++i) tag = (tag ^ values[i]) * 0x01000193u;
    return tag;
}

__device__ __forceinline__ uint64_t tagged_signal(uint32_t tag, uint32_t low) {
    return (static_cast<uint64_t>(tag) << 32) | low;
}

// Whether an arrived signal word (non-zero) from peer_rank was sent with this call's shape and carries a low word
// in [1, max_low] (a count + 1 of at most M rows, or the combine's 1); records the mismatch otherwise (site
// kLowLatencyShapeMismatch, needed = this rank's M, limit = its H, for the message; the peer as the channel).
__device__ __forceinline__ bool check_signal_shape(uint64_t value, const Shape& shape, uint32_t own_tag,
                                                   uint32_t max_low, int peer_rank, const Launch& launch) {
    const uint32_t low = static_cast<uint32_t>(value);
    if (static_cast<uint32_t>(value >> 32) == own_tag && low >= 1 && low <= max_low) return true;
    record_device_value_error(launch.error_record, launch.trap_on_error, ErrorCode::kInvalidInput, shape.rank, peer_rank,
                              WaitSite::kLowLatencyShapeMismatch, shape.num_max_tokens, shape.hidden);
    return false;
}

// Called by one thread at the start of each call's first kernel. Each call uses the half after the previous one's,
// which is what keeps a fast peer's next call out of the half this rank still reads. A CUDA graph replays the
// halves chosen at its capture, so replays and eager calls can put two calls in a row on one half: recorded, for
// the DeepEPError at the next check, instead of corrupting that call's rows unseen.
__device__ __forceinline__ void check_halves_alternate(int* last_half, int half_idx, const Launch& launch, int rank) {
    const int previous = atomicExch(last_half, half_idx + 1);
    if (previous == half_idx + 1)
        record_device_value_error(launch.error_record, launch.trap_on_error, ErrorCode::kInvalidInput, rank, -1,
                                  WaitSite::kLowLatencySameHalf, half_idx, 0);
}

}  // namespace ep::low_latency
