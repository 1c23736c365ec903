// What the round-based normal kernels (intranode, internode) share: the warp-per-row work split of the copy
// kernels, the rows of a round, rank_prefix_matrix lookups and the row copies through staging slots.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ptx.cuh"

namespace ep {

constexpr int kCopyWarps = 16;  // warps per block of the copy kernels; one warp moves one row at a time
constexpr int kCopyThreads = kCopyWarps * 32;

// Global warp index and warp count of a copy kernel (grid-stride over rows).
__device__ __forceinline__ int global_warp_idx() {
    return static_cast<int>(blockIdx.x) * kCopyWarps + static_cast<int>(threadIdx.x) / 32;
}
__device__ __forceinline__ int num_global_warps() { return static_cast<int>(gridDim.x) * kCopyWarps; }
__device__ __forceinline__ int lane_idx() { return static_cast<int>(threadIdx.x) % 32; }

// The warp-per-row loop of the copy kernels over items numbered rank by rank: first_item[r] is the first item of
// rank r, first_item[num_ranks] the total. Calls work(r, index of the item among r's) for each item of this warp.
template <typename Work>
__device__ __forceinline__ void for_each_item_by_rank(const int* first_item, int num_ranks, Work&& work) {
    const int num_items = first_item[num_ranks];
    for (int item = global_warp_idx(); item < num_items; item += num_global_warps()) {
        int r = 0;
        while (item >= first_item[r + 1]) ++r;
        work(r, item - first_item[r]);
    }
}

// Whether this round's kernels (copies and barriers) have work. A launcher without a host sync (num_worst_tokens)
// launches the most rounds the counts could need; the notify kernel writes how many they do need into
// num_rounds_device, and the rounds past it return at once on every rank alike: every rank computes that count from
// the same count matrix, so the ranks' barrier epochs stay in step.
__device__ __forceinline__ bool round_is_live(const int* num_rounds_device, int round) {
    return round < ptx::ld_volatile_global(num_rounds_device);
}

// The last statement of a copy kernel that wrote peer memory with plain (weak) stores: the next kernel's barrier
// publishes them from other threads (its flag's release covers what those threads did), and a kernel boundary is a
// documented ordering for this GPU's later work, not a system-scope release for another GPU's reader. One fence a
// thread, once per kernel: cheap next to the rows it moved.
__device__ __forceinline__ void release_peer_writes() { __threadfence_system(); }

// Rows a source rank sends to a destination in one round: the part of [round_start, round_start + B) below count.
__device__ __forceinline__ int rows_in_round(int count, int round_start, int rows_per_round) {
    const int left = count - round_start;
    return left <= 0 ? 0 : (left < rows_per_round ? left : rows_per_round);
}

// Rows rank `src` sends to rank `dst`, and the first row of `src` among dst's received rows, from
// rank_prefix_matrix [R, R] ([i][r] = rows r receives from ranks 0..i).
__device__ __forceinline__ int prefix_before(const int* rank_prefix_matrix, int num_ranks, int src, int dst) {
    return src == 0 ? 0 : rank_prefix_matrix[(src - 1) * num_ranks + dst];
}

// Warp copy of n 16-byte chunks from a user tensor (read-only for the kernel) into a staging slot. The stores
// stay out of L1 (.cg): the slot is read by another rank's kernel.
// Time: this and the receive copy below are the two HBM passes per byte of the round-based designs (send into a
// peer's staging, then staging into recv_x); moving each byte once is the later optimisation.
__device__ __forceinline__ void warp_copy_to_staging(int4* dst, const int4* src, int num_chunks, int lane) {
    for (int i = lane; i < num_chunks; i += 32) __stcg(dst + i, ptx::ld_nc_no_allocate(src + i));
}

// Warp copy of n 16-byte chunks from a staging slot (written by a peer in an earlier kernel) into a user tensor.
// Loads bypass L1 (.cg) so no line cached before the peer wrote can be served.
__device__ __forceinline__ void warp_copy_from_staging(int4* dst, const int4* src, int num_chunks, int lane) {
    for (int i = lane; i < num_chunks; i += 32) dst[i] = __ldcg(src + i);
}

}  // namespace ep
