// Dispatch layout: from each token's top-k experts, how many tokens go to each rank, node and expert, and which
// ranks each token goes to.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/error_record.hpp"

namespace ep {

// Shapes (T tokens, K = top-k <= 32, E experts, R ranks, N = R / num_ranks_per_node nodes):
//   topk_idx                 int64 [T, K]  expert of each choice, -1 = none; expert e lives on rank e / (E / R)
//   num_tokens_per_rank      int32 [R]     tokens with at least one expert on rank r
//   num_tokens_per_rdma_rank int32 [N]     tokens with at least one expert on node n; nullptr when one node
//   num_tokens_per_expert    int32 [E]     tokens having e among their top-k (counted once per token)
//   is_token_in_rank         bool  [T, R]  token t has an expert on rank r
// All outputs are fully written (zeros included); all pointers are device pointers; runs on `stream`.
// An id outside [-1, E) is skipped and recorded in error_record (a device view of a host-mapped record, with `rank`
// as the rank that saw it), and then traps where trap_on_error is set; with error_record null it traps.
void get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
                         int num_ranks_per_node, int* num_tokens_per_rank, int* num_tokens_per_rdma_rank,
                         int* num_tokens_per_expert, bool* is_token_in_rank, cudaStream_t stream,
                         DeviceErrorRecord* error_record = nullptr, int rank = -1, bool trap_on_error = false);

}  // namespace ep
