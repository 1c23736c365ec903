// The layout of each rank's intranode buffer (Buffer.num_nvl_bytes of IPC-mapped device memory), written once:
// host code takes sizes from here, device code takes pointers from here.
//
//   [0, sizeof(ControlArea))                  ControlArea: barrier flags and aborted words of the peers, the
//                                             owner's epoch, counts from peers
//   [kStagingOffset, num_bytes)               staging: R blocks (one per source rank) of rows_per_round slots
//
// A dispatch or combine moves rows in rounds. Round r carries, for every (source s, destination d), the rows of
// s bound for d whose ordinal among them is in [r * B, (r + 1) * B), B = rows_per_round. They land in d's staging
// at slot s * B + (ordinal - r * B): fixed blocks per source, so a sender needs no other rank's counts to place its
// rows, and the receiver knows from rank_prefix_matrix alone how many rows each block holds and where they go.
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

namespace ep::intranode {

constexpr int kMaxRanks = 8;             // ranks of one node (NVLink domain) the layout has room for
constexpr int kMaxLocalExperts = 1024;   // E / R the per-expert counts have room for
constexpr int kMinReservedTopk = 16;     // top-k every slot reserves room for (config.MAX_TOPK)
constexpr int kFp8GroupSize = 128;       // channels per FP8 scale
constexpr size_t kStagingAlignment = 128;

EP_HOST_DEVICE constexpr size_t align_up(size_t value, size_t alignment) {
    return (value + alignment - 1) / alignment * alignment;
}

// Where a receiver's rows of one one-copy dispatch go: byte offsets into the receiver's receive arena (a second
// IPC-mapped allocation, deep_ep_py/recv_arena.py), -1 for an output the call does not have. num_rows = -1: the
// receiver has no block this call (its arena is full, or the call is being captured), and every rank then moves
// the rows through staging instead. A one-copy combine publishes its input the same way: x (bf16 rows) and
// topk_weights, the other offsets -1.
struct RecvBlock {
    int64_t x;             // [num_rows, payload_bytes]
    int64_t scales;        // float32 [num_rows, num_scales]
    int64_t src_idx;       // int32 [num_rows]
    int64_t topk_idx;      // int64 [num_rows, K]
    int64_t topk_weights;  // float32 [num_rows, K]
    int64_t num_rows;
    int64_t reserved[2];
};
static_assert(sizeof(RecvBlock) == 64, "RecvBlock is half a 128 B line");

// Who writes and who reads each field:
// - barrier_flags[s]: written by rank s (st_release_sys) with its barrier epoch; read by the owner (ld_acquire_sys).
// - aborted[s]: written by rank s (st_release_sys, 1) when it gave up at a barrier (a wait timed out, or drained);
//   read by the owner's barriers, which then give up too and name s. Rank s goes on through its later barriers
//   without waiting, so its flags run ahead: without this word the owner, arriving late, would pass them at once
//   and read rows of the wrong round. Never reset: the buffer is out of step and must be recreated (a new IPC
//   allocation, zeroed by ipc_malloc).
// - local_epoch: the owner's count of barriers entered, modulo 2^32 (compared wrap-safe, epoch_reached in
//   device_common.cuh); only the owner's barrier code touches it.
// - send_counts[s][d]: written by rank s in the notify kernel before its barrier arrival, read by the owner after
//   the barrier. Every rank gets the whole matrix (rank_prefix_matrix needs every column).
// - expert_counts[s][l]: written by rank s likewise: s's tokens routed to the owner's local expert l.
// - worst_tokens[s]: written by rank s likewise: the num_worst_tokens of its call (csrc/common/worst_tokens.cuh).
// A peer writes counts for the next call only after passing a barrier of this call that the owner reaches after
// its notify kernel has read them (every dispatch has at least one round, i.e. two more barriers).
// - recv_block: written by the owner before the publish barrier of a one-copy dispatch, read by every sender after
//   it. The owner rewrites it only in its next dispatch, after the landing barrier every sender passes last.
// - one_copy: the owner's own note, made after the publish barrier, of whether every rank published a block (the
//   same answer on every rank); the copy kernels and the round barriers of the call read it to know which path
//   carries the rows (the rounds' barriers are skipped with their copies, on every rank alike).
struct ControlArea {
    int barrier_flags[kMaxRanks];                    // 4 * kMaxRanks = 32 B
    int aborted[kMaxRanks];                          // 4 * kMaxRanks = 32 B, polled with the flags
    int reserved0[32 - 2 * kMaxRanks];               // pads the flags and the aborted words to one 128 B line
    int local_epoch;                                 // 4 B
    int reserved1[31];                               // pads the epoch to its own 128 B line
    RecvBlock recv_block;                            // 64 B
    int one_copy;                                    // 4 B
    int worst_tokens[kMaxRanks];                     // 4 * kMaxRanks = 32 B
    int reserved2[15 - kMaxRanks];                   // pads the block, the note and the limits to one 128 B line
    int send_counts[kMaxRanks][kMaxRanks];           // 4 * kMaxRanks^2 = 256 B
    int expert_counts[kMaxRanks][kMaxLocalExperts];  // 4 * kMaxRanks * kMaxLocalExperts = 32 KiB
};
static_assert(offsetof(ControlArea, local_epoch) == 128, "the flags and the aborted words fill one 128 B line");
static_assert(sizeof(ControlArea) % 16 == 0, "ControlArea must keep the staging area 16-byte aligned");

// Start of the staging area: align_up(sizeof(ControlArea), 128) = 33408 B.
constexpr size_t kStagingOffset = align_up(sizeof(ControlArea), kStagingAlignment);

EP_HOST_DEVICE inline ControlArea* control_area(void* buffer_base) { return static_cast<ControlArea*>(buffer_base); }

// Staging bytes of a buffer of num_bytes: num_bytes - kStagingOffset (0 when it does not even hold the control area).
EP_HOST_DEVICE inline size_t staging_bytes(size_t num_bytes) {
    return num_bytes > kStagingOffset ? num_bytes - kStagingOffset : 0;
}

// Slot `slot_idx` of source block `src_rank`: kStagingOffset + (src_rank * rows_per_round + slot_idx) * slot_stride.
EP_HOST_DEVICE inline uint8_t* staging_slot(void* buffer_base, int src_rank, int slot_idx, int rows_per_round,
                                            int slot_stride) {
    const size_t slot = static_cast<size_t>(src_rank) * rows_per_round + slot_idx;
    return static_cast<uint8_t*>(buffer_base) + kStagingOffset + slot * static_cast<size_t>(slot_stride);
}

// Rows per source per round for slots of slot_bytes: staging_bytes / (num_ranks * slot_bytes); 0 = does not fit.
EP_HOST_DEVICE inline int rows_per_round(size_t num_bytes, int num_ranks, size_t slot_bytes) {
    const size_t rows = staging_bytes(num_bytes) / (static_cast<size_t>(num_ranks) * slot_bytes);
    return rows > (1u << 30) ? (1 << 30) : static_cast<int>(rows);
}

// One dispatched token in a staging slot, all offsets in bytes from the slot start:
//   [0, payload_bytes)                     payload: hidden bf16 (2 B each) or fp8 (1 B each); a multiple of 16
//   [scales_offset, + 4 * num_scales)      float32 FP8 scales (num_scales = 0 for bf16)
//   [src_idx_offset, + 4)                  int32 source token index
//   [topk_idx_offset, + 8 * num_topk)      int64 global expert ids (-1 = none), 8-byte aligned
//   [topk_weights_offset, + 4 * num_topk)  float32 weights
//   stride = align_up(end, 16)
struct DispatchRowFormat {
    int payload_bytes;
    int num_scales;
    int num_topk;
    int scales_offset;
    int src_idx_offset;
    int topk_idx_offset;
    int topk_weights_offset;
    int stride;

    EP_HOST_DEVICE static DispatchRowFormat make(int payload_bytes, int num_scales, int num_topk) {
        DispatchRowFormat f{};
        f.payload_bytes = payload_bytes;
        f.num_scales = num_scales;
        f.num_topk = num_topk;
        f.scales_offset = payload_bytes;
        f.src_idx_offset = f.scales_offset + 4 * num_scales;
        f.topk_idx_offset = static_cast<int>(align_up(static_cast<size_t>(f.src_idx_offset) + 4, 8));
        f.topk_weights_offset = f.topk_idx_offset + 8 * num_topk;
        f.stride = static_cast<int>(align_up(static_cast<size_t>(f.topk_weights_offset) + 4 * num_topk, 16));
        return f;
    }
};

// One combined row in a staging slot: bf16 payload [0, 2 * hidden), then float32 top-k weights; stride 16-aligned.
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

// The slot size a dispatch handle reserves, so that its dispatch, every cached dispatch (bf16 or fp8) and its
// combine use the same rows_per_round: a bf16 dispatch row with FP8 scales and room for max(num_topk, 16) top-k
// entries. A combine row (2 * hidden + 4 * K') fits as long as K' <= 3 * max(num_topk, 16).
EP_HOST_DEVICE inline int reserved_slot_bytes(int hidden, int num_topk) {
    const int num_scales = (hidden + kFp8GroupSize - 1) / kFp8GroupSize;
    const int topk = num_topk > kMinReservedTopk ? num_topk : kMinReservedTopk;
    return DispatchRowFormat::make(2 * hidden, num_scales, topk).stride;
}

// Host-mapped counters the notify kernel fills for the host (HostCounters of kNumHostCounters ints):
// the values first, then kCounterSequence last (release), tagged with the call's sequence number.
constexpr int kCounterSequence = 0;      // sequence number of the call whose values follow
constexpr int kCounterNumRecvTokens = 1; // N: rows this rank receives
constexpr int kCounterNumRounds = 2;     // max(1, ceil(max over (s, d) of send_counts[s][d] / rows_per_round))
constexpr int kCounterExpertBase = 3;    // [3, 3 + L): per-local-expert received counts, aligned
constexpr int kNumHostCounters = kCounterExpertBase + kMaxLocalExperts;

}  // namespace ep::intranode
