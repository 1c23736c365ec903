#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdlib>
#include <cstring>

#include "../common/exception.hpp"
#include "../common/launch.cuh"
#include "../common/timeout.cuh"
#include "error_record.hpp"
#include "host_wait.hpp"

namespace ep {

uint64_t default_timeout_ns() {
    static const uint64_t timeout_ns = [] {
        double seconds = 100.0;
        if (const char* env = std::getenv("DEEP_EP_PY_TIMEOUT_S")) {
            char* end = nullptr;
            const double parsed = std::strtod(env, &end);
            EP_HOST_ASSERT_MSG((end != env && parsed > 0.0),
                               "DEEP_EP_PY_TIMEOUT_S must be a positive number, got '", env, "'");
            seconds = parsed;
        }
        return static_cast<uint64_t>(seconds * 1e9);
    }();
    return timeout_ns;
}

void check_device_error_record(const DeviceErrorRecord* record, const std::string& what) {
    if (record == nullptr) return;
    const volatile int* code = &record->code;
    if (*code == static_cast<int>(ErrorCode::kNone)) return;
    // A device writer has claimed the record; its release store of the final code follows the field writes within
    // microseconds, unless the device died in between (a fault of this or another MPS client): then say so.
    const auto claimed_at = std::chrono::steady_clock::now();
    while (*code == static_cast<int>(ErrorCode::kClaiming)) {
        if (std::chrono::steady_clock::now() - claimed_at > std::chrono::seconds(5))
            throw EPException(detail::concat("a kernel claimed the device error record but never completed it (the "
                                             "device may have faulted); noticed by ", what));
        std::this_thread::yield();
    }
    std::atomic_thread_fence(std::memory_order_acquire);
    const volatile DeviceErrorRecord* r = record;
    if (*code == static_cast<int>(ErrorCode::kCapacity)) {
        // Every rank records the same error (csrc/common/worst_tokens.cuh), so each one names the rank at fault.
        if (r->site == static_cast<int>(WaitSite::kWorstTokensMismatch)) {
            throw EPException(detail::concat("num_worst_tokens differs between ranks: rank ", r->rank, " passed ",
                                             r->needed, ", this rank ", r->limit,
                                             ": every rank must pass the same value (the call's results are void and "
                                             "its waits gave up; recreate the Buffer); noticed by ", what));
        }
        throw EPException(detail::concat("num_worst_tokens: rank ", r->rank, " receives ", r->needed,
                                         " rows, more than the ", r->limit,
                                         " given: pass a larger num_worst_tokens (rows past it were dropped on rank ",
                                         r->rank, "; recreate the Buffer); noticed by ", what,
                                         r->timed_out != 0 ? "; a device wait timed out after it too" : ""));
    }
    if (*code == static_cast<int>(ErrorCode::kInvalidInput) &&
        r->site == static_cast<int>(WaitSite::kLowLatencySameHalf)) {
        throw EPException(detail::concat(
            "two low-latency calls in a row used buffer half ", r->needed, " on rank ", r->rank,
            ": a CUDA graph replays the halves chosen at its capture, so capture an even number of low-latency "
            "calls and make an even number of eager calls between replays (the second call's rows may be "
            "corrupt); noticed by ", what));
    }
    if (*code == static_cast<int>(ErrorCode::kInvalidInput) &&
        r->site == static_cast<int>(WaitSite::kLowLatencyShapeMismatch)) {
        throw EPException(detail::concat(
            "low-latency call on rank ", r->rank, " (num_max_dispatch_tokens_per_rank ", r->needed, ", hidden ",
            r->limit, "): rank ", r->channel, " sent with another num_max_dispatch_tokens_per_rank, hidden, "
            "num_experts or FP8 format (use_fp8, round_scale, use_ue8m0); every rank must pass the same (the rows "
            "from rank ", r->channel, " were dropped; clean_low_latency_buffer on every rank starts over); noticed by ",
            what));
    }
    if (*code == static_cast<int>(ErrorCode::kInvalidInput)) {
        throw EPException(detail::concat(wait_site_name(r->site), ": expected expert ids in [-1, ", r->limit,
                                         ") (-1 = none), got ", r->needed, " (token ", r->channel, ", on rank ",
                                         r->rank, "; unchecked on the host under CUDA-graph capture or "
                                         "DEEP_EP_PY_SKIP_VALUE_CHECKS, the kernel skipped that choice); noticed by ",
                                         what));
    }
    if (r->needed == kDrainedAfterTimeout) {
        throw EPTimeoutException(detail::concat(
            "device wait on rank ", r->rank, ", channel ", r->channel, ", for ", wait_site_name(r->site), " (site ",
            r->site, ") gave up at once: an earlier device wait of this rank timed out, and the ranks' buffers are "
            "out of step since; noticed by ", what, ". Destroy this Buffer and create a new one on every rank (a "
            "low-latency Buffer may instead mask the dead rank, or clean_low_latency_buffer on every rank)."));
    }
    throw EPTimeoutException(detail::concat("device wait timed out on rank ", r->rank, ", channel ", r->channel,
                                            ", waiting for ", wait_site_name(r->site), " (site ", r->site,
                                            ") after ", static_cast<double>(r->waited_ns) * 1e-9,
                                            " s (DEEP_EP_PY_TIMEOUT_S sets the limit); noticed by ", what,
                                            ". The ranks' buffers are out of step from here on: destroy this Buffer "
                                            "and create a new one on every rank."));
}

ErrorRecord::ErrorRecord() {
    void* host = nullptr;
    CUDA_CHECK(cudaHostAlloc(&host, sizeof(DeviceErrorRecord), cudaHostAllocMapped));
    std::memset(host, 0, sizeof(DeviceErrorRecord));
    host_ptr_ = static_cast<DeviceErrorRecord*>(host);
    void* device = nullptr;
    const cudaError_t status = cudaHostGetDevicePointer(&device, host, 0);
    if (status != cudaSuccess) {
        cudaFreeHost(host);
        CUDA_CHECK(status);
    }
    device_ptr_ = static_cast<DeviceErrorRecord*>(device);
}

ErrorRecord::~ErrorRecord() {
    if (host_ptr_ != nullptr) cudaFreeHost(host_ptr_);  // no throw from a destructor
}

bool ErrorRecord::has_error() const {
    return *static_cast<const volatile int*>(&host_ptr_->code) != static_cast<int>(ErrorCode::kNone);
}

void ErrorRecord::check(const std::string& what) const { check_device_error_record(host_ptr_, what); }

void ErrorRecord::check_and_reset(const std::string& what) {
    if (!has_error()) return;
    // Everything but timed_out: the host runs ahead of the device, and the kernels queued behind the one that timed
    // out must drain (and record that they did) rather than wait out the limit one after another. Kernels may be
    // running meanwhile, so timed_out is never written here (a wait may set it this moment), and the claim word
    // goes last: a kernel that claims the record once it reads free writes its fields after these zeros.
    const auto clear_but_timed_out = [this] {
        auto* fields = reinterpret_cast<unsigned char*>(host_ptr_) + offsetof(DeviceErrorRecord, rank);
        std::memset(fields, 0, offsetof(DeviceErrorRecord, timed_out) - offsetof(DeviceErrorRecord, rank));
        std::atomic_thread_fence(std::memory_order_release);
        *static_cast<volatile int*>(&host_ptr_->code) = static_cast<int>(ErrorCode::kNone);
        std::atomic_thread_fence(std::memory_order_seq_cst);
    };
    try {
        check(what);
    } catch (...) {
        clear_but_timed_out();
        throw;
    }
    clear_but_timed_out();
}

void ErrorRecord::reset() {
    std::memset(host_ptr_, 0, sizeof(DeviceErrorRecord));
    std::atomic_thread_fence(std::memory_order_release);
}

namespace {

// Two waiters on a flag nobody sets: lane 0 of warp 0 with the given timeout, lane 0 of warp 1 with 100 times it,
// which must drain when the first times out (as a kernel's other waits do) rather than wait out its own.
__global__ void timeout_self_test_kernel(TimeoutContext ctx, bool capacity_record_first) {
    __shared__ volatile int never_set;
    if (threadIdx.x == 0) never_set = 0;
    __syncthreads();
    if (threadIdx.x % 32 != 0) return;
    if (threadIdx.x == 0 && capacity_record_first)
        record_device_capacity_error(ctx.record, false, ctx.rank, WaitSite::kWorstTokensIntranode, 2, 1);
    TimeoutContext waiter = ctx;
    if (threadIdx.x != 0) waiter.timeout_ns *= 100;
    timeout_while([&] { return never_set == 0; }, waiter, WaitSite::kSelfTest);
}

}  // namespace

void launch_timeout_self_test(uintptr_t record_device_ptr, double timeout_s, int rank, int channel,
                              cudaStream_t stream, bool capacity_record_first, bool trap_on_error) {
    EP_HOST_ASSERT(record_device_ptr != 0);
    EP_HOST_ASSERT(timeout_s > 0.0);
    const TimeoutContext ctx{reinterpret_cast<DeviceErrorRecord*>(record_device_ptr),
                             static_cast<uint64_t>(timeout_s * 1e9), rank, channel, trap_on_error};
    launch_kernel(LaunchConfig{dim3(1), dim3(64), 0, stream, false}, timeout_self_test_kernel, ctx,
                  capacity_record_first);
}

}  // namespace ep
