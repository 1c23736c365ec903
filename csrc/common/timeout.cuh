// timeout_while: the one spin-wait helper. Every device wait goes through it, so no kernel can hang forever:
// past the deadline it records who waited for what in the host-mapped DeviceErrorRecord and returns false, and
// the kernel exits; the host then raises deep_ep_py.errors.DeepEPTimeoutError from the record.
//
// Where no host check follows a launch (the replays of a CUDA graph), a record alone would go unseen and the
// drained kernels' garbage would flow on; such launches set trap_on_error (DEEP_EP_PY_TRAP_ON_DEVICE_ERROR), and
// every recorder below then traps after writing the record.
#pragma once

#include <cstdint>
#include <cstdio>

#include "error_record.hpp"
#include "exception.hpp"
#include "ptx.cuh"

namespace ep {

// Passed by value in kernel arguments.
struct TimeoutContext {
    DeviceErrorRecord* record;  // device view of a host-mapped record (runtime/error_record.hpp)
    uint64_t timeout_ns;        // default from default_timeout_ns(): 100 s, or DEEP_EP_PY_TIMEOUT_S
    int rank;
    int channel;
    bool trap_on_error;  // WaitConfig::trap_on_error
    // Where set (the low-latency kernels under enable_shrink), a wait past the deadline stores 1 here, the awaited
    // rank's word of the rank mask, instead of recording a timeout: the call goes on without that rank.
    int* mask_on_timeout = nullptr;
};

__device__ __forceinline__ const char* error_code_name(ErrorCode code) {
    switch (code) {
        case ErrorCode::kTimeout: return "a wait timed out (or gave up after an earlier timeout)";
        case ErrorCode::kCapacity: return "a count is past the capacity the host sized";
        case ErrorCode::kInvalidInput: return "an input value is out of range";
        default: return "device error";
    }
}

// Says on stdout what a kernel recorded, then traps. That ends the CUDA context (every later CUDA call of the process
// fails), so the failure cannot pass unseen; the host-mapped record stays readable, and the next deep_ep_py call
// raises naming it. The fields are this failure's, as the record would hold them (rank: the waiting rank, or the one
// whose count overflowed). Not inlined: printf's argument buffer then lives in this cold frame, not in every kernel's.
inline __device__ __attribute__((noinline)) void print_device_error_and_trap(ErrorCode code, int rank, int channel,
                                                                               WaitSite site, int64_t value,
                                                                               int64_t bound) {
    printf("deep_ep_py: %s (rank %d, channel %d, wait site %d, value %lld, bound %lld); trapping, as "
           "DEEP_EP_PY_TRAP_ON_DEVICE_ERROR asks for this launch\n",
           error_code_name(code), rank, channel, static_cast<int>(site), static_cast<long long>(value),
           static_cast<long long>(bound));
    __threadfence_system();  // the record's stores reach the host before the context dies
    ptx::trap();
}

// Called after a record is written, or found claimed by an earlier failure: traps where the launch asked for it.
__device__ __forceinline__ void trap_after_record(bool trap_on_error, ErrorCode code, int rank, int channel,
                                                  WaitSite site, int64_t value, int64_t bound) {
    if (trap_on_error) print_device_error_and_trap(code, rank, channel, site, value, bound);
}

__device__ __forceinline__ void record_device_timeout(const TimeoutContext& ctx, WaitSite site, uint64_t waited_ns) {
    int* code = &ctx.record->code;
    // Whoever claimed first (a capacity record, another timeout) keeps the record: theirs is the first failure.
    if (ptx::atomic_cas_acquire_sys(code, static_cast<int>(ErrorCode::kNone), static_cast<int>(ErrorCode::kClaiming)) ==
        static_cast<int>(ErrorCode::kNone)) {
        ctx.record->rank = ctx.rank;
        ctx.record->channel = ctx.channel;
        ctx.record->site = static_cast<int>(site);
        ctx.record->waited_ns = waited_ns;
        ctx.record->needed = 0;
        // The fields above become visible to the host before code == kTimeout does.
        ptx::st_release_sys(code, static_cast<int>(ErrorCode::kTimeout));
    }
    // After the claim: a wait that drains on timed_out finds the code taken and records nothing over it.
    ptx::st_release_sys(&ctx.record->timed_out, 1);
    trap_after_record(ctx.trap_on_error, ErrorCode::kTimeout, ctx.rank, ctx.channel, site,
                      static_cast<int64_t>(waited_ns), static_cast<int64_t>(ctx.timeout_ns));
}

// Fills in a record of a value the device found past a bound (first writer wins, as for timeouts), and traps after
// it where trap_on_error says so.
__device__ __forceinline__ void record_device_value_error(DeviceErrorRecord* record, bool trap_on_error, ErrorCode code,
                                                          int rank, int channel, WaitSite site, int64_t value,
                                                          int64_t bound) {
    int* code_word = &record->code;
    if (ptx::atomic_cas_acquire_sys(code_word, static_cast<int>(ErrorCode::kNone),
                                    static_cast<int>(ErrorCode::kClaiming)) == static_cast<int>(ErrorCode::kNone)) {
        record->rank = rank;
        record->channel = channel;
        record->site = static_cast<int>(site);
        record->waited_ns = 0;
        record->needed = value;
        record->limit = bound;
        ptx::st_release_sys(code_word, static_cast<int>(code));
    }
    trap_after_record(trap_on_error, code, rank, channel, site, value, bound);
}

// A wait that gives up at once because an earlier wait of this rank timed out (record->timed_out, which outlives the
// host's check of that timeout): recorded only where the record is empty, i.e. the first such wait after the host
// raised the timeout, so that the next call raises again instead of returning what a drained kernel left.
__device__ __forceinline__ void record_device_drained(const TimeoutContext& ctx, WaitSite site) {
    __threadfence_system();  // acquire side of the timeout's release of timed_out: its claim is seen below
    record_device_value_error(ctx.record, ctx.trap_on_error, ErrorCode::kTimeout, ctx.rank, ctx.channel, site,
                              kDrainedAfterTimeout, 0);
}

// Records that a count the host could not know (num_worst_tokens sizing) is past its capacity, so the host raises
// instead of returning results with rows dropped. The kernel goes on within the capacity.
__device__ __forceinline__ void record_device_capacity_error(DeviceErrorRecord* record, bool trap_on_error, int rank,
                                                             WaitSite site, int64_t needed, int64_t limit) {
    record_device_value_error(record, trap_on_error, ErrorCode::kCapacity, rank, -1, site, needed, limit);
}

// Whether expert_idx names an expert, [0, num_experts). An id outside [-1, num_experts), which the host did not
// check (no host sync: CUDA-graph capture, DEEP_EP_PY_SKIP_VALUE_CHECKS), is recorded for the host to raise at the
// next call, and the caller skips that choice as it does -1 instead of indexing past its arrays. With no record,
// such an id traps.
__device__ __forceinline__ bool expert_id_is_usable(int64_t expert_idx, int num_experts, DeviceErrorRecord* record,
                                                    bool trap_on_error, int rank, int token_idx, WaitSite site) {
    if (expert_idx >= -1 && expert_idx < num_experts) return expert_idx >= 0;
    if (record == nullptr) {
        EP_DEVICE_ASSERT(expert_idx >= -1 && expert_idx < num_experts);
    } else {
        record_device_value_error(record, trap_on_error, ErrorCode::kInvalidInput, rank, token_idx, site, expert_idx,
                                  num_experts);
    }
    return false;
}

// Spins while keep_waiting() is true. Returns true when the condition cleared, false when the deadline passed (a
// timeout recorded, or the awaited rank masked where ctx.mask_on_timeout is set) or
// another waiter of this rank has already timed out (record->timed_out: then this one stops too, so the whole kernel
// drains instead of hanging, and so do the kernels queued behind it after the host has raised the timeout: those
// would otherwise wait out the limit one after another). A capacity record does not stop a wait: the kernels go on within the capacity, and a
// rank leaving a barrier before its peers would write into staging they are still reading.
// The caller must leave the kernel (or skip the work that needed the wait) on false.
template <typename KeepWaiting>
__device__ __forceinline__ bool timeout_while(KeepWaiting&& keep_waiting, const TimeoutContext& ctx, WaitSite site) {
    const uint64_t start_ns = ptx::read_globaltimer();
    uint32_t num_polls = 0;
    while (keep_waiting()) {
#ifdef DEEP_EP_PY_EMULATE
        ep_emu::poll_yield();  // the thread this one waits for may be a fiber of the same OS thread
#endif
        if ((++num_polls & 255u) != 0) continue;  // check the clock and the record every 256 polls
        const uint64_t waited_ns = ptx::read_globaltimer() - start_ns;
        if (waited_ns > ctx.timeout_ns) {
            if (ctx.mask_on_timeout != nullptr) {
                ptx::st_release_sys(ctx.mask_on_timeout, 1);
            } else {
                record_device_timeout(ctx, site, waited_ns);
            }
            return false;
        }
        if (ptx::ld_volatile_global(&ctx.record->timed_out) != 0) {
            record_device_drained(ctx, site);
            return false;
        }
    }
    return true;
}

// Whether this rank has given up on the buffer (a wait of its timed out or drained; record->timed_out), read by
// thread 0 of each kernel that writes peer memory (the intranode copy kernels; the internode copy kernels, notify and
// barriers): such a rank goes on past its waits without waiting, so its rows would land in staging or arenas that a
// late peer has not read yet, and its flags and counts would run ahead of that peer's targets.
__device__ __forceinline__ bool rank_gave_up(const DeviceErrorRecord* record) {
    return ptx::ld_volatile_global(&record->timed_out) != 0;
}

}  // namespace ep
