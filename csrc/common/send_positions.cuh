// The ordered scan that numbers a rank's tokens per destination (a rank, or a node of ranks), shared by the
// intranode and internode notify kernels. Ordinals follow token order, which is what makes received rows come out
// in (source rank, source token) order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ep {

constexpr int kSendPositionsThreads = 1024;

// Run by one block of kSendPositionsThreads for destination `dst`: a token is sent to dst when any of the
// group_size columns [dst * group_size, (dst + 1) * group_size) of its is_token_in_rank row [num_ranks] is set.
// Scans in chunks of 1024 tokens (ballot + per-warp totals) and writes, where the pointer is not null:
//   send_pos[t * num_dsts + dst]  ordinal of token t among the tokens sent to dst, -1 when not sent
//   send_list[dst * T + ordinal]  the token of each ordinal
//   send_counts[dst]              tokens sent to dst
__device__ __forceinline__ void send_positions_block(const bool* is_token_in_rank, int num_tokens, int num_ranks,
                                                     int group_size, int dst, int num_dsts, int* send_pos,
                                                     int* send_list, int* send_counts) {
    constexpr int kWarps = kSendPositionsThreads / 32;
    __shared__ int warp_totals[kWarps];
    const int lane = static_cast<int>(threadIdx.x) % 32;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const unsigned lanes_below = (1u << lane) - 1u;
    int base = 0;  // ordinals given in earlier chunks (same value in every thread)
    for (int chunk_start = 0; chunk_start < num_tokens; chunk_start += kSendPositionsThreads) {
        const int token = chunk_start + static_cast<int>(threadIdx.x);
        bool is_sent = false;
        if (token < num_tokens) {
            const bool* row = is_token_in_rank + static_cast<int64_t>(token) * num_ranks + dst * group_size;
            for (int i = 0; i < group_size; ++i) is_sent |= row[i];
        }
        const unsigned ballot = __ballot_sync(0xffffffffu, is_sent);
        if (lane == 0) warp_totals[warp] = __popc(ballot);
        __syncthreads();
        int warp_prefix = 0, chunk_total = 0;
        for (int w = 0; w < kWarps; ++w) {
            const int count = warp_totals[w];
            warp_prefix += w < warp ? count : 0;
            chunk_total += count;
        }
        const int ordinal = base + warp_prefix + __popc(ballot & lanes_below);
        if (token < num_tokens && send_pos != nullptr)
            send_pos[static_cast<int64_t>(token) * num_dsts + dst] = is_sent ? ordinal : -1;
        if (is_sent && send_list != nullptr) send_list[static_cast<int64_t>(dst) * num_tokens + ordinal] = token;
        base += chunk_total;
        __syncthreads();  // warp_totals is rewritten by the next chunk
    }
    if (threadIdx.x == 0 && send_counts != nullptr) send_counts[dst] = base;
}

}  // namespace ep
