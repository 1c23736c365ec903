// The layout of each rank's internode buffer (Buffer.num_rdma_bytes on the NVSHMEM symmetric heap, the same
// offsets on every PE), written once: host code takes sizes from here, device code takes pointers from here.
//
//   [0, control_bytes)          the control area: signals, the aborted words of the peers, the owner's epochs, counts
//                               from every rank
//   [staging_offset, num_bytes) staging, used by one call at a time (dispatch and combine share it)
//
// Ranks: R = N nodes x P ranks per node, rank = node * P + local. A token of source s = (ns, ls) bound for node n
// travels once to its forwarder (n, ls), the rank of node n with the source's local index, in round r of its
// node ordinal (its index among s's tokens for node n, in token order); every rank of node n that needs it then
// reads it from the forwarder over NVLink. Combine runs the other way: each receiver writes its row into the
// forwarder's staging, the forwarder sums them and sends one partial per node back to the source.
//
// Staging, B = rows per source block per round, ds / cs = dispatch / combine slot strides:
//   dispatch  recv   [N source nodes][B] ds     forwarder: rows from source (n', own local index)
//             send   [N dest nodes][B] ds       sender: rows assembled for NVSHMEM puts (peers without P2P)
//   combine   in     [N source nodes][B][P] cs  forwarder: one sub-slot per receiving rank of the node
//             partial[N nodes][B] cs            source: one summed row per node
//             send   [N source nodes][B] cs     forwarder: partials assembled for NVSHMEM puts
//
// This header is plain C++ plus __host__ __device__ markers: the bindings (g++) include it for the sizes.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define EP_HOST_DEVICE __host__ __device__
#else
#define EP_HOST_DEVICE
#endif

namespace ep::internode {

constexpr int kMaxRanks = 128;          // ranks of the group the control area and the kernels have room for
constexpr int kMaxRanksPerNode = 8;     // P: ranks of one NVLink domain (the receiver mask is one byte)
constexpr int kMaxNodes = kMaxRanks;    // N (with one rank per node)
constexpr int kMaxLocalExperts = 1024;  // E / R the per-expert counts have room for
constexpr int kMinReservedTopk = 16;    // top-k every slot reserves room for (config.MAX_TOPK)
constexpr int kFp8GroupSize = 128;      // channels per FP8 scale
constexpr size_t kAlignment = 128;

EP_HOST_DEVICE constexpr size_t align_up(size_t value, size_t alignment) {
    return (value + alignment - 1) / alignment * alignment;
}

// Ints of one rank's count row as each peer receives it: [0, R) tokens for each rank, [R, R + N) tokens for each
// node, [R + N] the sender's num_worst_tokens (csrc/common/worst_tokens.cuh), [R + N + 1, R + N + 1 +
// kMaxLocalExperts) tokens for each of the receiving peer's local experts.
EP_HOST_DEVICE constexpr int count_row_worst_tokens(int num_ranks, int num_nodes) { return num_ranks + num_nodes; }
EP_HOST_DEVICE constexpr int count_row_experts(int num_ranks, int num_nodes) { return num_ranks + num_nodes + 1; }
EP_HOST_DEVICE constexpr int count_row_ints(int num_ranks, int num_nodes) {
    return count_row_experts(num_ranks, num_nodes) + kMaxLocalExperts;
}

// Byte offsets of the control area for R ranks and N nodes. Who writes and who reads:
// - global_flags[s] / node_flags[l] (uint64): barriers rank s / local rank l of this node has entered, each adding
//   1 (atomic add through nvshmem_ptr, or nvshmemx_signal_op); polled by the owner.
// - count_flags[s] (uint64): rank s's count row of this call has landed in counts[s] (value: notify epoch).
// - aborted[s] (uint64): 1 once rank s gave up (a wait of its timed out or drained): set by rank s (release store
//   through nvshmem_ptr, or nvshmemx_signal_op SET) in every peer's area when its wait fails; the owner's waits for
//   rank s stop on it, fail and name s. A rank that gave up goes on through its later kernels without waiting, so
//   without this word a peer late but alive would wait out its whole timeout for rows or flags that never come, or
//   name another cause. Never reset: the buffer is out of step for good and must be recreated (a new allocation,
//   zeroed by the runtime's malloc).
// - dispatch_arrivals[n] / combine_arrivals[n] (uint64): rows delivered to this rank from node n, cumulative over
//   calls (atomic add per row); the owner waits until they reach its own running total (consumed).
// - epochs and consumed totals: the owner's alone, touched by one thread of its one-block kernels in stream order.
// - counts[s]: rank s's count row (count_row_ints); count_send[d]: the row this rank assembles for peer d when it
//   has to put it with NVSHMEM (no P2P mapping).
struct ControlLayout {
    size_t global_flags;
    size_t node_flags;
    size_t count_flags;
    size_t aborted;
    size_t dispatch_arrivals;
    size_t combine_arrivals;
    size_t epochs;  // int64 [kNumEpochs]
    size_t dispatch_consumed;
    size_t combine_consumed;
    size_t counts;
    size_t count_send;
    size_t bytes;  // = staging offset

    EP_HOST_DEVICE static ControlLayout make(int num_ranks, int num_nodes) {
        ControlLayout c{};
        size_t offset = 0;
        auto take = [&offset](size_t bytes) {
            const size_t start = offset;
            offset = align_up(offset + bytes, kAlignment);
            return start;
        };
        c.global_flags = take(8 * static_cast<size_t>(num_ranks));
        c.node_flags = take(8 * static_cast<size_t>(kMaxRanksPerNode));
        c.count_flags = take(8 * static_cast<size_t>(num_ranks));
        c.aborted = take(8 * static_cast<size_t>(num_ranks));
        c.dispatch_arrivals = take(8 * static_cast<size_t>(num_nodes));
        c.combine_arrivals = take(8 * static_cast<size_t>(num_nodes));
        c.epochs = take(8 * 4);
        c.dispatch_consumed = take(8 * static_cast<size_t>(num_nodes));
        c.combine_consumed = take(8 * static_cast<size_t>(num_nodes));
        const size_t row_bytes = 4 * static_cast<size_t>(count_row_ints(num_ranks, num_nodes));
        c.counts = take(row_bytes * num_ranks);
        c.count_send = take(row_bytes * num_ranks);
        c.bytes = offset;
        return c;
    }
};

// The owner's epochs (ControlLayout::epochs).
constexpr int kEpochGlobalBarrier = 0;
constexpr int kEpochNodeBarrier = 1;
constexpr int kEpochNotify = 2;

// One dispatched token in a staging slot, offsets in bytes from the slot start:
//   [0, payload_bytes)                     payload: hidden bf16 or fp8; a multiple of 16
//   [scales_offset, + 4 * num_scales)      float32 FP8 scales (none for bf16)
//   [src_idx_offset, + 4)                  int32 source token index
//   [mask_offset, + 4)                     int32 bit l: local rank l of the destination node receives the token
//   [ordinals_offset, + 4 * P)             int32 the token's ordinal among the source's tokens for local rank l
//   [topk_idx_offset, + 8 * num_topk)      int64 global expert ids (-1 = none)
//   [topk_weights_offset, + 4 * num_topk)  float32 weights
//   stride = align_up(end, 16)
struct DispatchRowFormat {
    int payload_bytes;
    int num_scales;
    int num_topk;
    int num_local_ranks;
    int scales_offset;
    int src_idx_offset;
    int mask_offset;
    int ordinals_offset;
    int topk_idx_offset;
    int topk_weights_offset;
    int stride;

    EP_HOST_DEVICE static DispatchRowFormat make(int payload_bytes, int num_scales, int num_topk, int num_local_ranks) {
        DispatchRowFormat f{};
        f.payload_bytes = payload_bytes;
        f.num_scales = num_scales;
        f.num_topk = num_topk;
        f.num_local_ranks = num_local_ranks;
        f.scales_offset = payload_bytes;
        f.src_idx_offset = f.scales_offset + 4 * num_scales;
        f.mask_offset = f.src_idx_offset + 4;
        f.ordinals_offset = f.mask_offset + 4;
        f.topk_idx_offset = static_cast<int>(align_up(static_cast<size_t>(f.ordinals_offset) + 4 * num_local_ranks, 8));
        f.topk_weights_offset = f.topk_idx_offset + 8 * num_topk;
        f.stride = static_cast<int>(align_up(static_cast<size_t>(f.topk_weights_offset) + 4 * num_topk, 16));
        return f;
    }
};

// One combine row (a receiver's row, or a node's partial sum): bf16 payload [0, 2 * hidden), then float32 top-k
// weights; stride 16-aligned.
struct CombineRowFormat {
    int payload_bytes;
    int num_topk;
    int weights_offset;
    int stride;

    EP_HOST_DEVICE static CombineRowFormat make(int hidden, int num_topk) {
        CombineRowFormat f{};
        f.payload_bytes = 2 * hidden;
        f.num_topk = num_topk;
        f.weights_offset = f.payload_bytes;
        f.stride = static_cast<int>(align_up(static_cast<size_t>(f.weights_offset) + 4 * num_topk, 16));
        return f;
    }
};

EP_HOST_DEVICE inline int reserved_topk(int num_topk) { return num_topk > kMinReservedTopk ? num_topk : kMinReservedTopk; }

// Slot strides a dispatch handle reserves, so that its dispatch, every cached dispatch (bf16 or fp8) and its
// combine (top-k up to reserved_topk) use the same rows per round: a bf16 row with FP8 scales.
EP_HOST_DEVICE inline int reserved_dispatch_stride(int hidden, int num_topk, int num_local_ranks) {
    const int num_scales = (hidden + kFp8GroupSize - 1) / kFp8GroupSize;
    return DispatchRowFormat::make(2 * hidden, num_scales, reserved_topk(num_topk), num_local_ranks).stride;
}
EP_HOST_DEVICE inline int reserved_combine_stride(int hidden, int num_topk) {
    return CombineRowFormat::make(hidden, reserved_topk(num_topk)).stride;
}

// Where each staging region starts, for B rows per block.
struct StagingLayout {
    size_t dispatch_recv;
    size_t dispatch_send;
    size_t combine_in;
    size_t combine_partial;
    size_t combine_send;
    size_t end;  // bytes of the whole buffer this needs

    EP_HOST_DEVICE static StagingLayout make(const ControlLayout& control, int num_nodes, int num_local_ranks,
                                             int rows_per_round, int dispatch_stride, int combine_stride) {
        StagingLayout s{};
        const size_t block_rows = static_cast<size_t>(num_nodes) * rows_per_round;
        s.dispatch_recv = control.bytes;
        s.dispatch_send = s.dispatch_recv + block_rows * dispatch_stride;
        const size_t dispatch_end = s.dispatch_send + block_rows * dispatch_stride;
        s.combine_in = control.bytes;
        s.combine_partial = s.combine_in + block_rows * num_local_ranks * combine_stride;
        s.combine_send = s.combine_partial + block_rows * combine_stride;
        const size_t combine_end = s.combine_send + block_rows * combine_stride;
        s.end = dispatch_end > combine_end ? dispatch_end : combine_end;
        return s;
    }
};

// Rows per source block per round that fit num_bytes (0: not even one), capped at 2^30.
EP_HOST_DEVICE inline int rows_per_round(size_t num_bytes, int num_ranks, int num_nodes, int num_local_ranks,
                                         int dispatch_stride, int combine_stride) {
    const ControlLayout control = ControlLayout::make(num_ranks, num_nodes);
    if (num_bytes <= control.bytes) return 0;
    const size_t per_row_dispatch = 2 * static_cast<size_t>(num_nodes) * dispatch_stride;
    const size_t per_row_combine = static_cast<size_t>(num_nodes) * (num_local_ranks + 2) * combine_stride;
    const size_t per_row = per_row_dispatch > per_row_combine ? per_row_dispatch : per_row_combine;
    const size_t rows = (num_bytes - control.bytes) / per_row;
    return rows > (1u << 30) ? (1 << 30) : static_cast<int>(rows);
}

// Host-mapped counters the notify kernel fills for the host (HostCounters of kNumHostCounters ints): the values
// first, then kCounterSequence last (release), tagged with the call's sequence number.
constexpr int kCounterSequence = 0;
constexpr int kCounterNumRecvTokens = 1;  // N: rows this rank receives
constexpr int kCounterNumRounds = 2;      // max(1, ceil(max over (s, n) of node counts / B))
constexpr int kCounterNumForwarded = 3;   // F: rows this rank forwards (from every source node, for its node)
constexpr int kCounterExpertBase = 4;     // [4, 4 + L): per-local-expert received counts, aligned
constexpr int kNumHostCounters = kCounterExpertBase + kMaxLocalExperts;

}  // namespace ep::internode
