#include <cuda_runtime.h>

#include <algorithm>

#include "common/exception.hpp"
#include "common/launch.cuh"
#include "common/timeout.cuh"
#include "layout.hpp"

namespace ep {

namespace {

constexpr int kNumWarpsPerBlock = 8;
constexpr int kNumThreadsPerBlock = kNumWarpsPerBlock * 32;
constexpr int kMaxNumTopk = 32;  // one lane per top-k choice
// Per-block counters live in shared memory when they fit in the default 48 KiB.
constexpr size_t kMaxSmemCountersBytes = 48 * 1024;

struct LayoutParams {
    const int64_t* topk_idx;      // [T, K]
    int num_tokens;               // T
    int num_topk;                 // K
    int num_experts;              // E
    int num_ranks;                // R
    int num_experts_per_rank;     // E / R
    int num_ranks_per_node;
    int num_nodes;                // counted only when num_tokens_per_rdma_rank != nullptr
    int* num_tokens_per_rank;     // [R], zeroed before the kernel
    int* num_tokens_per_rdma_rank;  // [num_nodes] or nullptr, zeroed before the kernel
    int* num_tokens_per_expert;   // [E], zeroed before the kernel
    bool* is_token_in_rank;       // [T, R], zeroed before the kernel
    bool counts_in_smem;          // dynamic smem holds [E + R + num_nodes] ints
    DeviceErrorRecord* error_record;  // where an id outside [-1, E) is recorded (then skipped), or nullptr: trap
    bool trap_on_error;               // trap after recording it (WaitConfig::trap_on_error)
    int rank;                         // the calling rank, for that record
};

// One warp per token, one lane per top-k choice. __match_any_sync groups lanes that chose the same expert (or
// rank, or node); the lowest lane of each group counts it, so a token is counted once per destination even when
// its top-k repeats an expert or hits several experts of one rank.
__global__ void __launch_bounds__(kNumThreadsPerBlock) dispatch_layout_kernel(LayoutParams p) {
    EP_DYNAMIC_SHARED(int, smem_counts);
    const int num_counters = p.num_experts + p.num_ranks + p.num_nodes;
    int* expert_counts = p.num_tokens_per_expert;
    int* rank_counts = p.num_tokens_per_rank;
    int* node_counts = p.num_tokens_per_rdma_rank;
    if (p.counts_in_smem) {
        for (int i = threadIdx.x; i < num_counters; i += blockDim.x) smem_counts[i] = 0;
        expert_counts = smem_counts;
        rank_counts = smem_counts + p.num_experts;
        node_counts = smem_counts + p.num_experts + p.num_ranks;
        __syncthreads();
    }

    const int lane_idx = static_cast<int>(threadIdx.x) % 32;
    const int warp_idx = static_cast<int>(threadIdx.x) / 32;
    const int num_warps = static_cast<int>(gridDim.x) * kNumWarpsPerBlock;
    const bool count_nodes = p.num_tokens_per_rdma_rank != nullptr;
    for (int token_idx = static_cast<int>(blockIdx.x) * kNumWarpsPerBlock + warp_idx; token_idx < p.num_tokens;
         token_idx += num_warps) {
        const int64_t row = static_cast<int64_t>(token_idx);
        const int64_t expert_idx = lane_idx < p.num_topk ? p.topk_idx[row * p.num_topk + lane_idx] : -1;
        const bool is_valid = expert_id_is_usable(expert_idx, p.num_experts, p.error_record, p.trap_on_error, p.rank,
                                                  token_idx, WaitSite::kTopkIdxLayout);
        const int expert = is_valid ? static_cast<int>(expert_idx) : -1;
        const int rank = is_valid ? expert / p.num_experts_per_rank : -1;
        const int node = is_valid ? rank / p.num_ranks_per_node : -1;

        const unsigned same_expert_lanes = __match_any_sync(0xffffffffu, expert);
        const unsigned same_rank_lanes = __match_any_sync(0xffffffffu, rank);
        const unsigned same_node_lanes = __match_any_sync(0xffffffffu, node);
        if (!is_valid) continue;
        if (__ffs(same_expert_lanes) - 1 == lane_idx) atomicAdd(expert_counts + expert, 1);
        if (__ffs(same_rank_lanes) - 1 == lane_idx) {
            atomicAdd(rank_counts + rank, 1);
            p.is_token_in_rank[row * p.num_ranks + rank] = true;
        }
        if (count_nodes && __ffs(same_node_lanes) - 1 == lane_idx) atomicAdd(node_counts + node, 1);
    }

    if (!p.counts_in_smem) return;
    __syncthreads();
    for (int i = threadIdx.x; i < num_counters; i += blockDim.x) {
        const int count = smem_counts[i];
        if (count == 0) continue;
        if (i < p.num_experts) {
            atomicAdd(p.num_tokens_per_expert + i, count);
        } else if (i < p.num_experts + p.num_ranks) {
            atomicAdd(p.num_tokens_per_rank + (i - p.num_experts), count);
        } else {
            atomicAdd(p.num_tokens_per_rdma_rank + (i - p.num_experts - p.num_ranks), count);
        }
    }
}

}  // namespace

void get_dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts, int num_ranks,
                         int num_ranks_per_node, int* num_tokens_per_rank, int* num_tokens_per_rdma_rank,
                         int* num_tokens_per_expert, bool* is_token_in_rank, cudaStream_t stream,
                         DeviceErrorRecord* error_record, int rank, bool trap_on_error) {
    EP_HOST_ASSERT(num_tokens >= 0);
    EP_HOST_ASSERT(num_topk >= 1);
    EP_HOST_ASSERT_MSG(num_topk <= kMaxNumTopk, "at most ", kMaxNumTopk, " experts per token");
    EP_HOST_ASSERT(num_ranks >= 1);
    EP_HOST_ASSERT(num_experts >= num_ranks);
    EP_HOST_ASSERT_MSG(num_experts % num_ranks == 0, "num_experts must be divisible by num_ranks");
    EP_HOST_ASSERT(num_ranks_per_node >= 1);
    EP_HOST_ASSERT(num_tokens_per_rank != nullptr);
    EP_HOST_ASSERT(num_tokens_per_expert != nullptr);
    int num_nodes = 0;
    if (num_tokens_per_rdma_rank != nullptr) {
        EP_HOST_ASSERT_MSG(num_ranks % num_ranks_per_node == 0, "num_ranks must be a multiple of num_ranks_per_node");
        num_nodes = num_ranks / num_ranks_per_node;
    }
    if (num_tokens > 0) {
        EP_HOST_ASSERT(topk_idx != nullptr);
        EP_HOST_ASSERT(is_token_in_rank != nullptr);
    }

    // The kernel only adds and sets: start from zeros.
    CUDA_CHECK(cudaMemsetAsync(num_tokens_per_rank, 0, sizeof(int) * num_ranks, stream));
    CUDA_CHECK(cudaMemsetAsync(num_tokens_per_expert, 0, sizeof(int) * num_experts, stream));
    if (num_nodes > 0) CUDA_CHECK(cudaMemsetAsync(num_tokens_per_rdma_rank, 0, sizeof(int) * num_nodes, stream));
    if (num_tokens == 0) return;
    CUDA_CHECK(cudaMemsetAsync(is_token_in_rank, 0, static_cast<size_t>(num_tokens) * num_ranks, stream));

    int device = 0, num_sms = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
    const size_t smem_bytes = sizeof(int) * (static_cast<size_t>(num_experts) + num_ranks + num_nodes);
    const bool counts_in_smem = smem_bytes <= kMaxSmemCountersBytes;
    // Enough blocks to fill the GPU; each block's warps stride over the tokens, so every block flushes its
    // counters once however many tokens there are.
    const int num_blocks = std::max(1, std::min((num_tokens + kNumWarpsPerBlock - 1) / kNumWarpsPerBlock, num_sms));

    const LayoutParams params{topk_idx,
                              num_tokens,
                              num_topk,
                              num_experts,
                              num_ranks,
                              num_experts / num_ranks,
                              num_ranks_per_node,
                              num_nodes,
                              num_tokens_per_rank,
                              num_tokens_per_rdma_rank,
                              num_tokens_per_expert,
                              is_token_in_rank,
                              counts_in_smem,
                              error_record,
                              trap_on_error,
                              rank};
    launch_kernel(LaunchConfig{dim3(num_blocks), dim3(kNumThreadsPerBlock), counts_in_smem ? smem_bytes : 0, stream,
                               false},
                  dispatch_layout_kernel, params);
}

}  // namespace ep
