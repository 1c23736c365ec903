// Device helpers of the internode kernels: the buffer's regions, peer addresses, the node and global barriers,
// and the arrival waits. Included by .cu files only (NVSHMEM device headers need relocatable device code).
#pragma once

#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "../common/error_record.hpp"
#include "../common/exception.hpp"
#include "../common/launch.cuh"
#include "../common/peer_signal.cuh"
#include "../common/ptx.cuh"
#include "../common/rounds.cuh"
#include "../common/timeout.cuh"
#include "internode.hpp"

namespace ep::internode {

constexpr int kControlThreads = kMaxRanks;  // the one-block kernels: one thread per rank (or node) waited for

// Everything a kernel needs to find its way in the buffer, passed by value.
struct View {
    uint8_t* base;  // this rank's symmetric buffer (the same address names it on every PE)
    ControlLayout control;
    StagingLayout staging;
    int rank, num_ranks;
    int num_nodes, num_local_ranks;  // N, P
    int node, local_rank;            // of this rank
    int rows_per_round;              // B
    int dispatch_stride, combine_stride;
    // DEEP_EP_PY_EMULATE_NETWORK=1: ranks of other nodes are reached only through NVSHMEM puts and signals, as
    // across a real network, even where nvshmem_ptr maps them (one GPU playing several nodes): the put path then
    // runs, and is tested, on a machine without a NIC.
    bool emulate_network;

    __device__ __forceinline__ int pe_of(int node_idx, int local_idx) const { return node_idx * num_local_ranks + local_idx; }
    __device__ __forceinline__ int node_of(int rank_idx) const { return rank_idx / num_local_ranks; }
    __device__ __forceinline__ int local_of(int rank_idx) const { return rank_idx % num_local_ranks; }
    template <typename T>
    __device__ __forceinline__ T* at(size_t offset) const {
        return reinterpret_cast<T*>(base + offset);
    }
    __device__ __forceinline__ int64_t* epochs() const { return at<int64_t>(control.epochs); }
    // This rank's copy of the aborted words (ControlLayout::aborted), one per rank.
    __device__ __forceinline__ uint64_t* aborted() const { return at<uint64_t>(control.aborted); }
    __device__ __forceinline__ int* counts_row(int src) const {
        return at<int>(control.counts) + static_cast<int64_t>(src) * count_row_ints(num_ranks, num_nodes);
    }
    __device__ __forceinline__ int* count_send_row(int dst) const {
        return at<int>(control.count_send) + static_cast<int64_t>(dst) * count_row_ints(num_ranks, num_nodes);
    }
    // Dispatch slot i of source node n in the forwarder's receive region, and of dest node n in the send region.
    __device__ __forceinline__ size_t dispatch_recv_slot(int src_node, int slot) const {
        return staging.dispatch_recv + (static_cast<size_t>(src_node) * rows_per_round + slot) * dispatch_stride;
    }
    __device__ __forceinline__ size_t dispatch_send_slot(int dst_node, int slot) const {
        return staging.dispatch_send + (static_cast<size_t>(dst_node) * rows_per_round + slot) * dispatch_stride;
    }
    // Combine sub-slot of receiving local rank l for slot i of source node n, at the forwarder.
    __device__ __forceinline__ size_t combine_in_slot(int src_node, int slot, int local_idx) const {
        return staging.combine_in +
               ((static_cast<size_t>(src_node) * rows_per_round + slot) * num_local_ranks + local_idx) * combine_stride;
    }
    __device__ __forceinline__ size_t combine_partial_slot(int node_idx, int slot) const {
        return staging.combine_partial + (static_cast<size_t>(node_idx) * rows_per_round + slot) * combine_stride;
    }
    __device__ __forceinline__ size_t combine_send_slot(int src_node, int slot) const {
        return staging.combine_send + (static_cast<size_t>(src_node) * rows_per_round + slot) * combine_stride;
    }
    // The address of `offset` in rank pe's buffer where nvshmem_ptr maps it (P2P), else nullptr. For ranks of
    // this node, which the kernels require to be mapped.
    template <typename T>
    __device__ __forceinline__ T* peer(size_t offset, int pe) const {
        return static_cast<T*>(nvshmem_ptr(base + offset, pe));
    }
    // As peer(), for a rank of any node: nullptr (use NVSHMEM puts and signals) where it is not mapped, or where it
    // is on another node and the network is emulated.
    template <typename T>
    __device__ __forceinline__ T* direct(size_t offset, int pe) const {
        if (emulate_network && node_of(pe) != node) return nullptr;
        return peer<T>(offset, pe);
    }
};

// Host side: the view of a launch, after checking the buffer holds the layout.
View make_view(const Buffers& buffers, int rows_per_round, int dispatch_stride, int combine_stride);

inline TimeoutContext timeout_context(const View& view, const WaitConfig& wait) {
    return TimeoutContext{wait.record, wait.timeout_ns, view.rank, -1, wait.trap_on_error};
}


// Rows of node-count `count` in the round starting at round_start.
__device__ __forceinline__ int node_rows_in_round(const View& v, int count, int round_start) {
    return rows_in_round(count, round_start, v.rows_per_round);
}

// Index of the range of `item` in first[0..num_ranges] (first[0] = 0, non-decreasing, item < first[num_ranges]).
__device__ __forceinline__ int find_range(const int* first, int num_ranges, int item) {
    int low = 0, high = num_ranges - 1;
    while (low < high) {
        const int mid = (low + high + 1) / 2;
        if (first[mid] <= item) low = mid;
        else high = mid - 1;
    }
    return low;
}

// Giving up. A rank whose wait fails (it timed out, found a peer that gave up, or drained on its record) goes on
// through its later kernels without waiting, so a peer that is late but alive would find that rank's barrier flags,
// count rows and cumulative arrival counts past its own targets, pass every wait at once and read the rows of
// another round. So such a rank writes nothing into peers' memory any more (rank_gave_up, read by thread 0 of the
// notify, the barriers, send, push and reduce) but its aborted words: announce_gave_up sets them in every peer's
// area, and every wait for a rank also stops on that rank's word (wait_for_peer). A late peer can then pass only
// waits whose writes were made before the rank gave up, while it was in step, and it fails at the first wait that
// needs a later write: on the word, or at its own timeout. So correct results need no ordering of the word against
// other writes; only the named cause does: a word may show late (over the network it is read without NVSHMEM's
// consistency step), and a wait then stops on it later, or times out naming its own site.

// Tells every peer that this rank gave up: sets aborted[me] in each peer's area, a release store where nvshmem_ptr
// maps it (direct()), else nvshmemx_signal_op SET (ranks of other nodes; under DEEP_EP_PY_EMULATE_NETWORK they are
// never mapped), then quiets so the signals leave before the kernel ends. Run by every thread of the block at a
// block-uniform point (quiet_block_puts is a block barrier).
__device__ __forceinline__ void announce_gave_up(const View& v) {
    bool issued_signals = false;
    for (int pe = static_cast<int>(threadIdx.x); pe < v.num_ranks; pe += static_cast<int>(blockDim.x)) {
        if (pe == v.rank) continue;
        uint64_t* peer_word = v.direct<uint64_t>(v.control.aborted + 8 * static_cast<size_t>(v.rank), pe);
        if (peer_word != nullptr) {
            ptx::st_release_sys(peer_word, 1);
        } else {
            nvshmemx_signal_op(v.aborted() + v.rank, 1, NVSHMEM_SIGNAL_SET, pe);
            issued_signals = true;
        }
    }
    quiet_block_puts(issued_signals);
}

// timeout_while(keep_waiting) that also stops once rank pe gave up (its aborted word in this rank's area), while
// waiting or found set once the condition cleared, be pe's flag or count behind or ahead. Returns true when the
// condition cleared and pe had not given up; false when the wait timed out or drained (recorded at `site` with
// ctx.channel), or when pe gave up (recorded as kInternodePeerAborted with pe as the channel). Each thread watches the
// rank it waits for only: its record (timed_out) drains the block's other waits at once, and a rank still waiting
// for a missing peer names that one rather than another rank that gave up on the same peer a moment earlier.
template <typename KeepWaiting>
__device__ __forceinline__ bool wait_for_peer(const View& v, int pe, KeepWaiting&& keep_waiting, TimeoutContext ctx,
                                              WaitSite site) {
    const uint64_t* peer_aborted = v.aborted() + pe;
    const uint64_t start_ns = ptx::read_globaltimer();
    if (!timeout_while([&] { return keep_waiting() && ptx::ld_acquire_sys(peer_aborted) == 0; }, ctx, site))
        return false;
    if (ptx::ld_acquire_sys(peer_aborted) == 0) return true;
    ctx.channel = pe;
    record_device_timeout(ctx, WaitSite::kInternodePeerAborted, ptx::read_globaltimer() - start_ns);
    return false;
}

// Barrier of this rank with `num_members` ranks pe_of_member(0..num_members), run by every thread of one block of
// kControlThreads. Epoch protocol: the owner counts its barriers of this kind (epochs()[epoch_idx]); it adds 1 to
// flags[my_slot] on each member (an atomic add through nvshmem_ptr, or nvshmemx_signal_op), so a flag counts the
// barriers its rank has entered, and waits for flags[i] of its own buffer to reach its epoch. Adds commute, so two
// signals of one rank landing out of order over a network cannot move a flag back, and no flag is ever reset. The
// caller's earlier writes (previous copy kernels: released by their release_peer_writes; puts: quieted there) come
// first. A rank that gave up adds no flag and fails at once; a barrier that fails (a wait timed out or drained, or a
// member gave up) tells every peer (announce_gave_up). The epochs are then out of step for good.
template <typename PeOfMember>
__device__ __forceinline__ bool epoch_barrier(const View& v, size_t flags_offset, int epoch_idx, int my_slot,
                                              int num_members, PeOfMember&& pe_of_member, TimeoutContext ctx,
                                              WaitSite site) {
    __shared__ uint64_t s_epoch;
    __shared__ int s_ok, s_gave_up;
    // Every thread, not only the one that releases the flag: a copy kernel before this one wrote peer memory with
    // weak stores and one fence a thread (release_peer_writes); fence.sc orders against fence.sc, so these fences
    // are what makes those stores reach a peer before it sees the flag.
    __threadfence_system();
    __syncthreads();
    if (threadIdx.x == 0) {
        int64_t* epoch_slot = v.epochs() + epoch_idx;
        const uint64_t epoch = static_cast<uint64_t>(*reinterpret_cast<volatile int64_t*>(epoch_slot)) + 1;
        *epoch_slot = static_cast<int64_t>(epoch);
        s_epoch = epoch;
        s_gave_up = rank_gave_up(ctx.record);
        s_ok = s_gave_up ? 0 : 1;
    }
    __syncthreads();
    const uint64_t epoch = s_epoch;
    const bool gave_up = s_gave_up != 0;
    uint64_t* flags = v.at<uint64_t>(flags_offset);
    for (int member = static_cast<int>(threadIdx.x); !gave_up && member < num_members;
         member += static_cast<int>(blockDim.x)) {
        const int pe = pe_of_member(member);
        uint64_t* peer_flag = v.direct<uint64_t>(flags_offset + 8 * static_cast<size_t>(my_slot), pe);
        if (peer_flag != nullptr) ptx::red_add_release_sys(peer_flag, 1);
        else nvshmemx_signal_op(flags + my_slot, 1, NVSHMEM_SIGNAL_ADD, pe);
        ctx.channel = pe;
        if (!wait_for_peer(v, pe, [&] { return ptx::ld_acquire_sys(flags + member) < epoch; }, ctx, site)) s_ok = 0;
    }
    __syncthreads();
    const bool ok = s_ok != 0;
    if (!ok && !gave_up) announce_gave_up(v);  // block-uniform: s_ok and s_gave_up are settled by the barrier above
    return ok;
}

__device__ __forceinline__ bool global_barrier(const View& v, TimeoutContext ctx) {
    return epoch_barrier(v, v.control.global_flags, kEpochGlobalBarrier, v.rank, v.num_ranks,
                         [](int member) { return member; }, ctx, WaitSite::kInternodeGlobalBarrier);
}

__device__ __forceinline__ bool node_barrier(const View& v, TimeoutContext ctx) {
    const int first = v.pe_of(v.node, 0);
    return epoch_barrier(v, v.control.node_flags, kEpochNodeBarrier, v.local_rank, v.num_local_ranks,
                         [first](int member) { return first + member; }, ctx, WaitSite::kInternodeNodeBarrier);
}

// Waits until arrivals[n] (rows delivered from node n, cumulative) reaches the owner's running total plus the
// rows expected_rows(n) of this round, for every node n; then advances the running totals. One block. The rows of
// node n come from its rank pe_of(n, local_rank) (the source's forwarder in dispatch, the forwarder back to this
// source in combine): the wait also stops once that rank gave up. A wait that fails tells every peer
// (announce_gave_up): the node barrier the caller then skips and the ranks waiting for this rank's rows would
// otherwise wait out their own full timeout.
template <typename ExpectedRows>
__device__ __forceinline__ bool wait_arrivals(const View& v, size_t arrivals_offset, size_t consumed_offset,
                                              ExpectedRows&& expected_rows, TimeoutContext ctx, WaitSite site) {
    __shared__ int s_ok;
    if (threadIdx.x == 0) s_ok = 1;
    __syncthreads();
    const uint64_t* arrivals = v.at<uint64_t>(arrivals_offset);
    uint64_t* consumed = v.at<uint64_t>(consumed_offset);
    for (int node_idx = static_cast<int>(threadIdx.x); node_idx < v.num_nodes; node_idx += static_cast<int>(blockDim.x)) {
        const uint64_t target = consumed[node_idx] + static_cast<uint64_t>(expected_rows(node_idx));
        ctx.channel = node_idx;
        const auto keep_waiting = [&] { return ptx::ld_acquire_sys(arrivals + node_idx) < target; };
        if (!wait_for_peer(v, v.pe_of(node_idx, v.local_rank), keep_waiting, ctx, site)) s_ok = 0;
        consumed[node_idx] = target;
    }
    __syncthreads();
    const bool ok = s_ok != 0;
    if (ok) {
        // The rows these counts announce came from other nodes, over the network.
        if (threadIdx.x == 0) settle_network_writes(arrivals);
    } else {
        announce_gave_up(v);  // block-uniform: s_ok is settled by the barrier above
    }
    __syncthreads();
    return ok;
}

// Delivers one staged row of `num_bytes` to `offset` in rank pe's buffer and adds 1 to its arrival counter at
// `arrival_offset`, called by a whole warp after write_row(dst) filled the row:
// - P2P-mapped pe: write_row writes straight into the peer's slot; every lane fences its stores at system scope,
//   then lane 0 adds to the counter with release semantics, so the row is visible before the count.
// - otherwise: write_row fills the local staging slot `local_offset`, and one put-with-signal carries row and count
//   (NVSHMEM delivers the signal after the data).
// Returns whether it used a put (the caller quiets before its kernel ends).
template <typename WriteRow>
__device__ __forceinline__ bool deliver_row(const View& v, size_t offset, size_t local_offset, int num_bytes,
                                           size_t arrival_offset, int pe, int lane, WriteRow&& write_row) {
    uint8_t* peer_slot = v.direct<uint8_t>(offset, pe);
    if (peer_slot != nullptr) {
        write_row(peer_slot);
        __threadfence_system();
        __syncwarp();
        if (lane == 0) ptx::red_add_release_sys(v.peer<uint64_t>(arrival_offset, pe), 1);
        return false;
    }
    uint8_t* local_slot = v.base + local_offset;
    write_row(local_slot);
    __threadfence_system();
    __syncwarp();
    nvshmemx_putmem_signal_nbi_warp(v.base + offset, local_slot, static_cast<size_t>(num_bytes),
                                    v.at<uint64_t>(arrival_offset), 1, NVSHMEM_SIGNAL_ADD, pe);
    return true;
}

// One block of kControlThreads running the global barrier (notify.cu): ends every round.
void launch_global_barrier(const View& view, const WaitConfig& wait, const int* num_rounds_device, int round,
                           cudaStream_t stream);

}  // namespace ep::internode
