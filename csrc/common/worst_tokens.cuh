// The num_worst_tokens check of the intranode and internode notify kernels: every rank checks every rank.
//
// With num_worst_tokens > 0 the host does not wait for the counts, so a capacity error surfaces at a rank's next
// call. Were only the rank that overflows to record it, it alone would raise there, and its peers would wait for it
// at that call's barriers until they timed out (100 s by default). Every rank has every rank's counts after the
// notify exchange, and with them every rank's num_worst_tokens, so each records the same error and all raise
// together. The rounds' count comes from num_worst_tokens on each rank, so ranks that pass different values launch
// different rounds: that is recorded too, and drains every later wait of the call instead of hanging it.
#pragma once

#include <cuda_runtime.h>

#include "error_record.hpp"
#include "ptx.cuh"
#include "timeout.cuh"

namespace ep {

// Called by every thread of a block of num_threads, after a __syncthreads that follows the writes of recv_totals.
//   own_limit       this rank's num_worst_tokens (0: the host waits for the counts)
//   limit_of(r)     rank r's num_worst_tokens, as it wrote it in the exchange
//   recv_totals[r]  rows rank r receives this call, from every rank's counts (this block wrote them)
// Records, in this order of precedence and for the lowest such rank: a rank whose num_worst_tokens differs from
// this rank's (site kWorstTokensMismatch, needed = its value, limit = ours), else a rank that receives more rows
// than num_worst_tokens (overflow_site, needed = its rows).
template <typename LimitOf>
__device__ __forceinline__ void check_worst_tokens(const TimeoutContext& ctx, int num_ranks, int num_threads,
                                                   int own_limit, LimitOf&& limit_of, const int* recv_totals,
                                                   WaitSite overflow_site) {
    __shared__ int s_first_mismatch, s_first_overflow;
    const int tid = static_cast<int>(threadIdx.x);
    if (tid == 0) {
        s_first_mismatch = num_ranks;
        s_first_overflow = num_ranks;
    }
    __syncthreads();
    for (int r = tid; r < num_ranks; r += num_threads) {
        if (limit_of(r) != own_limit) {
            atomicMin(&s_first_mismatch, r);
        } else if (own_limit > 0 && recv_totals[r] > own_limit) {
            atomicMin(&s_first_overflow, r);
        }
    }
    __syncthreads();
    if (tid != 0) return;
    if (s_first_mismatch < num_ranks) {
        record_device_capacity_error(ctx.record, ctx.trap_on_error, s_first_mismatch, WaitSite::kWorstTokensMismatch,
                                     limit_of(s_first_mismatch), own_limit);
        // The ranks launch different rounds: every later wait of this rank gives up at once (each rank sees the
        // mismatch, so all of them drain) rather than waiting out the timeout for rounds a peer never runs.
        ptx::st_relaxed_sys(&ctx.record->timed_out, 1);
    } else if (s_first_overflow < num_ranks) {
        record_device_capacity_error(ctx.record, ctx.trap_on_error, s_first_overflow, overflow_site,
                                     recv_totals[s_first_overflow], own_limit);
    }
}

}  // namespace ep
