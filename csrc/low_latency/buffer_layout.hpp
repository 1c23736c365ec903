// The low-latency symmetric buffer, written once: sizes for the host, pointers for the device.
//
// The buffer (num_rdma_bytes, one NVSHMEM symmetric allocation, zero-filled) holds two alternating halves; each
// call uses the half after the previous call's (dispatch and combine alike, as DeepEP V1), so a call never
// overwrites what a peer may still read from the call before it. The two halves' signals come first, at offsets
// that depend on E alone (as DeepEP's), then the two halves' send and recv areas:
//
//   [signals of half 0][signals of half 1][send area 0][recv area 0][send area 1][recv area 1]
//
// so that a call whose M or H differs from the calls before it on this buffer (or a peer's) polls signal words
// that only signals have written, each reset to 0 after it was read, rather than rows of an earlier call that a
// receiver would take for counts. A half is
//
//   send area     max(M * dispatch_msg, E * M * combine_msg) bytes, rounded up to 128
//                 dispatch: the message of token t at t * dispatch_msg (cast once, then copied per top-k choice)
//                 combine:  bf16 [L, R*M, H] rows, the zero-copy combine buffer (and the staging of rows put
//                           through NVSHMEM to peers without a P2P mapping)
//   recv area     max(E, 16) * M * max(dispatch_msg, combine_msg) bytes, rounded up to 128
//                 dispatch: [L local experts][R source ranks][M slots] messages of dispatch_msg bytes
//                 combine:  [M tokens][S = max(E, 16) top-k slots] bf16 rows of combine_msg bytes
//   signals       2 * E * 8 bytes, rounded up to 128: uint64, 0 = not arrived
//                 dispatch: [L][R] = count + 1 of the rows source rank r sent to local expert l
//                 combine:  [E]    = 1 once global expert e's rank has sent back all its rows for this rank
//
// dispatch_msg = align16(16 + max(2H, H + 4 * ceil(H / 128))): a 16-byte header {source token, top-k slot, 0, 0},
// then bf16 [H], or fp8 [H] followed by float32 scales [H / 128]. combine_msg = align16(2H).
// deep_ep_py/config.py low_latency_rdma_size_hint is the same formula; the bindings expose total_bytes so that a
// test checks both agree.
#pragma once

#include <cstdint>

// Host and device in .cu files; host only where g++ compiles it (the bindings).
#ifdef __CUDACC__
#define EP_HOST_DEVICE __host__ __device__
#else
#define EP_HOST_DEVICE
#endif

namespace ep::low_latency {

// Top-k slots the combine receive area keeps per token at least (the contract's largest top-k).
constexpr int kMinCombineSlotsPerToken = 16;
constexpr int64_t kHeaderBytes = 16;
constexpr int kFp8GroupSize = 128;
constexpr int kUe8m0GroupsPerInt = 4;

EP_HOST_DEVICE constexpr int64_t align_up(int64_t value, int64_t alignment) {
    return (value + alignment - 1) / alignment * alignment;
}
EP_HOST_DEVICE constexpr int64_t max_of(int64_t a, int64_t b) { return a > b ? a : b; }

struct BufferLayout {
    int num_max_tokens;   // M
    int hidden;           // H
    int num_ranks;        // R
    int num_experts;      // E
    int num_local_experts;       // L = E / R
    int combine_slots_per_token; // S = max(E, 16)
    int64_t dispatch_msg_bytes;  // align16(16 + max(2H, H + 4 * ceil(H / 128)))
    int64_t combine_msg_bytes;   // align16(2H)
    int64_t send_bytes;          // align128(max(M * dispatch_msg, E * M * combine_msg))
    int64_t recv_bytes;          // align128(S * M * max(dispatch_msg, combine_msg))
    int64_t signal_bytes;        // align128(2 * E * 8)
    int64_t half_bytes;          // send_bytes + recv_bytes + signal_bytes
    int64_t total_bytes;         // 2 * half_bytes: what num_rdma_bytes must be at least

    EP_HOST_DEVICE BufferLayout(int m, int h, int r, int e)
        : num_max_tokens(m), hidden(h), num_ranks(r), num_experts(e), num_local_experts(e / r),
          combine_slots_per_token(e > kMinCombineSlotsPerToken ? e : kMinCombineSlotsPerToken) {
        const int64_t scale_bytes = 4 * ((static_cast<int64_t>(h) + kFp8GroupSize - 1) / kFp8GroupSize);
        dispatch_msg_bytes = align_up(kHeaderBytes + max_of(2 * static_cast<int64_t>(h), h + scale_bytes), 16);
        combine_msg_bytes = align_up(2 * static_cast<int64_t>(h), 16);
        send_bytes = align_up(max_of(static_cast<int64_t>(m) * dispatch_msg_bytes,
                                     static_cast<int64_t>(e) * m * combine_msg_bytes),
                              128);
        recv_bytes = align_up(static_cast<int64_t>(combine_slots_per_token) * m *
                                  max_of(dispatch_msg_bytes, combine_msg_bytes),
                              128);
        signal_bytes = align_up(2 * static_cast<int64_t>(e) * 8, 128);
        half_bytes = send_bytes + recv_bytes + signal_bytes;
        total_bytes = 2 * half_bytes;
    }

    // Byte offsets from the start of the symmetric buffer; half_idx is 0 or 1.
    EP_HOST_DEVICE int64_t dispatch_signal_offset(int half_idx) const { return half_idx * signal_bytes; }
    EP_HOST_DEVICE int64_t send_offset(int half_idx) const {
        return 2 * signal_bytes + half_idx * (send_bytes + recv_bytes);
    }
    EP_HOST_DEVICE int64_t recv_offset(int half_idx) const { return send_offset(half_idx) + send_bytes; }
    EP_HOST_DEVICE int64_t combine_signal_offset(int half_idx) const {
        return dispatch_signal_offset(half_idx) + static_cast<int64_t>(num_experts) * 8;
    }
};

// Device pointers of one half, resolved from the buffer base (symmetric: the same offsets on every PE, so a
// pointer here is also the address to hand nvshmem_ptr / nvshmem puts for the peer's copy).
struct HalfPointers {
    uint8_t* send;              // send area
    uint8_t* recv;              // recv area
    uint64_t* dispatch_signals; // [L][R]
    uint64_t* combine_signals;  // [E]

    EP_HOST_DEVICE HalfPointers(void* buffer, const BufferLayout& layout, int half_idx) {
        uint8_t* base = static_cast<uint8_t*>(buffer);
        send = base + layout.send_offset(half_idx);
        recv = base + layout.recv_offset(half_idx);
        dispatch_signals = reinterpret_cast<uint64_t*>(base + layout.dispatch_signal_offset(half_idx));
        combine_signals = reinterpret_cast<uint64_t*>(base + layout.combine_signal_offset(half_idx));
    }
};

// The non-symmetric int32 workspace of one Buffer (zeroed once; every kernel leaves its counters at zero), one
// copy per buffer half, so that kernels of two pending calls (which use different halves) never share a counter
// even when they run at once (a hook's receive on one stream, the next call on another):
//   half h at h * (2E + 3):
//   [0, E)       dispatch send: next receive slot of (global expert e, this rank)
//   E            dispatch send: blocks finished
//   E + 1        dispatch receive: blocks finished
//   E + 2        combine receive: blocks finished
//   [E + 3, 2E + 3)  dispatch receive under enable_shrink: at E + 3 + l * R + r, the rows every unit of the call
//                takes from (local expert l, source r), as the first unit to read that signal decided (0: not yet;
//                dispatch.cu agree_on_rows)
EP_HOST_DEVICE constexpr int workspace_ints_per_half(int num_experts) { return 2 * num_experts + 3; }
inline int workspace_ints(int num_experts) { return 2 * workspace_ints_per_half(num_experts); }
EP_HOST_DEVICE inline int* half_workspace(int* workspace, int num_experts, int half_idx) {
    return workspace + static_cast<int64_t>(half_idx) * workspace_ints_per_half(num_experts);
}

}  // namespace ep::low_latency
