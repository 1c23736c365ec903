// The record a timed-out device wait leaves for the host, shared by device code (which writes it) and host code
// (which reads it and throws). Lives in host-mapped pinned memory, so the host can read it while the kernel runs
// and after it has exited.
#pragma once

#include <cstdint>

namespace ep {

enum class ErrorCode : int {
    kNone = 0,
    // A writer won the compare-and-swap and is filling in the fields; the host waits for kTimeout.
    kClaiming = 1,
    kTimeout = 2,
    // A count the device found past the capacity the host sized without a sync (num_worst_tokens): rows were
    // dropped. Raised as DeepEPError, not as a timeout.
    kCapacity = 3,
    // An input value a kernel found out of range where the host did not check it (no host sync: CUDA-graph
    // capture, or DEEP_EP_PY_SKIP_VALUE_CHECKS): the kernel skipped it. Raised as DeepEPError.
    kInvalidInput = 4,
};

// What a wait was waiting for. Each spin-wait in the kernels names its site, so the Python error says what hung.
// A new wait adds its site here and its name in wait_site_name().
enum class WaitSite : int {
    kUnknown = 0,
    kSelfTest = 1,
    kNotifyBarrier = 2,
    kDispatchSenderFreeSlots = 3,
    kDispatchReceiverTail = 4,
    kCombineSenderFreeSlots = 5,
    kCombineReceiverTail = 6,
    kLowLatencyRecvCount = 7,
    kLowLatencyRecvFlag = 8,
    // Intranode normal kernels (csrc/intranode): the channel of the record is the peer rank that did not arrive.
    kIntranodeNotifyBarrier = 16,
    kIntranodeRoundBarrier = 17,
    kIntranodePublishBarrier = 18,
    // A peer (the channel) gave up at a barrier earlier (csrc/intranode/buffer_layout.hpp, ControlArea::aborted).
    kIntranodePeerAborted = 19,
    // Internode normal kernels (csrc/internode): the channel is the rank (or the node, for arrivals) waited for.
    kInternodeNotifyCounts = 24,
    kInternodeDispatchArrivals = 25,
    kInternodeCombineArrivals = 26,
    kInternodeNodeBarrier = 27,
    kInternodeGlobalBarrier = 28,
    // A peer (the channel, a rank) gave up earlier (csrc/internode/buffer_layout.hpp, ControlLayout::aborted).
    kInternodePeerAborted = 29,
    // Capacity records (ErrorCode::kCapacity): what overflowed.
    kWorstTokensIntranode = 32,
    kWorstTokensInternode = 33,
    // The ranks passed different num_worst_tokens (rank = one that differs, needed = its value, limit = ours).
    kWorstTokensMismatch = 34,
    // Input records (ErrorCode::kInvalidInput): needed = the value, limit = the bound, channel = the token.
    kTopkIdxLowLatencyDispatch = 40,
    kTopkIdxLowLatencyCombine = 41,
    kTopkIdxLayout = 42,
    // A low-latency call on the buffer half of the call before it (needed = the half).
    kLowLatencySameHalf = 43,
    // A low-latency signal from the peer given as the channel, sent with another M, H, E or format than this
    // rank's call (needed = this rank's M, limit = its H).
    kLowLatencyShapeMismatch = 44,
    // clean_low_latency_buffer's barrier: the channel is the rank that did not arrive (under enable_shrink it is
    // masked instead, and a record comes only from a wait that drained).
    kLowLatencyBarrier = 45,
};

inline const char* wait_site_name(int site) {
    switch (static_cast<WaitSite>(site)) {
        case WaitSite::kSelfTest: return "self-test flag that is never set";
        case WaitSite::kNotifyBarrier: return "notify barrier (peer ranks' signals)";
        case WaitSite::kDispatchSenderFreeSlots: return "dispatch sender: free slots in the peer's receive queue";
        case WaitSite::kDispatchReceiverTail: return "dispatch receiver: tokens from the sender (queue tail)";
        case WaitSite::kCombineSenderFreeSlots: return "combine sender: free slots in the peer's receive queue";
        case WaitSite::kCombineReceiverTail: return "combine receiver: tokens from the sender (queue tail)";
        case WaitSite::kLowLatencyRecvCount: return "low-latency dispatch receiver: the token count of source rank <channel>";
        case WaitSite::kLowLatencyRecvFlag: return "low-latency combine receiver: the rows back from expert rank <channel>";
        case WaitSite::kIntranodeNotifyBarrier:
            return "intranode dispatch notify barrier: the peer rank given as the channel did not arrive";
        case WaitSite::kIntranodeRoundBarrier:
            return "intranode dispatch/combine round barrier: the peer rank given as the channel did not arrive";
        case WaitSite::kIntranodePublishBarrier:
            return "intranode one-copy dispatch: the peer rank given as the channel did not say where its rows go";
        case WaitSite::kIntranodePeerAborted:
            return "intranode barrier: the peer rank given as the channel timed out earlier (or drained) and gave up";
        case WaitSite::kInternodeNotifyCounts:
            return "internode dispatch notify: the counts of the rank given as the channel did not arrive";
        case WaitSite::kInternodeDispatchArrivals:
            return "internode dispatch forwarder: rows from the node given as the channel did not all arrive";
        case WaitSite::kInternodeCombineArrivals:
            return "internode combine: partial sums from the node given as the channel did not all arrive";
        case WaitSite::kInternodeNodeBarrier:
            return "internode node barrier: the rank given as the channel did not arrive";
        case WaitSite::kInternodeGlobalBarrier:
            return "internode round barrier: the rank given as the channel did not arrive";
        case WaitSite::kInternodePeerAborted:
            return "internode wait: the peer rank given as the channel timed out earlier (or drained) and gave up";
        case WaitSite::kWorstTokensIntranode:
        case WaitSite::kWorstTokensInternode:
            return "num_worst_tokens: the rows rank <rank> receives";
        case WaitSite::kWorstTokensMismatch:
            return "num_worst_tokens: the value rank <rank> passed";
        case WaitSite::kTopkIdxLowLatencyDispatch: return "topk_idx of low_latency_dispatch";
        case WaitSite::kTopkIdxLowLatencyCombine: return "topk_idx of low_latency_combine";
        case WaitSite::kTopkIdxLayout: return "topk_idx of get_dispatch_layout";
        case WaitSite::kLowLatencySameHalf: return "low-latency buffer half of the call before";
        case WaitSite::kLowLatencyShapeMismatch:
            return "low-latency signal of a peer's call with another M, hidden, num_experts or format";
        case WaitSite::kLowLatencyBarrier:
            return "low-latency clean barrier: the rank given as the channel did not arrive";
        case WaitSite::kUnknown: break;
    }
    return "unknown wait site";
}

// First writer wins (atomicCAS on `code`); the other fields are valid once `code` reads kTimeout, kCapacity or
// kInvalidInput.
// DeviceErrorRecord::needed of a kTimeout record left by a wait that gave up at once on timed_out.
constexpr int64_t kDrainedAfterTimeout = 1;

struct DeviceErrorRecord {
    int code;     // ErrorCode
    int rank;     // rank whose kernel timed out (or overflowed)
    int channel;  // channel (or block) index within that kernel, -1 when not meaningful
    int site;     // WaitSite
    uint64_t waited_ns;
    int64_t needed;  // kCapacity: the count found on the device; kInvalidInput: the value
    int64_t limit;   // kCapacity: the capacity the host gave; kInvalidInput: the bound it broke
    // 1 once any wait of this rank timed out, whoever owns `code`: the other waits drain on it even when a capacity
    // record (which does not stop them) came first. ErrorRecord::check_and_reset leaves it set (kernels still
    // queued then drain too); only reset(), after the device has gone idle, clears it.
    int timed_out;
    int reserved;
};

// Where device waits record a timeout, and how long they wait (each launcher's argument).
struct WaitConfig {
    DeviceErrorRecord* record;  // device view of the host-mapped record
    uint64_t timeout_ns;
    // Trap after recording an error (common/timeout.cuh): set for launches no host check follows (captured into a
    // CUDA graph), per DEEP_EP_PY_TRAP_ON_DEVICE_ERROR.
    bool trap_on_error;
};

}  // namespace ep
