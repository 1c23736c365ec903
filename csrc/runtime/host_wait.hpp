// host_timeout_while: the host-side spin-wait with a deadline. Callers from Python release the GIL around it
// (py::gil_scoped_release in the binding), so other Python threads run while it waits.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <thread>

#include "../common/error_record.hpp"
#include "../common/exception.hpp"

namespace ep {

// Device timeout to put into TimeoutContext: DEEP_EP_PY_TIMEOUT_S seconds if set, else 100 s.
uint64_t default_timeout_ns();

// Throws EPTimeoutException if a device wait has recorded a timeout in `record` (a host pointer to a host-mapped
// record); `what` says which host operation noticed it.
void check_device_error_record(const DeviceErrorRecord* record, const std::string& what);

// Spins while keep_waiting() is true. Throws EPTimeoutException naming `what` (and `rank` when >= 0) after
// timeout_s seconds; also throws as soon as the device error record (if given) reports a device timeout, since
// what the host waits for will then never come.
template <typename KeepWaiting>
void host_timeout_while(KeepWaiting&& keep_waiting, double timeout_s, const std::string& what, int rank = -1,
                        const DeviceErrorRecord* record = nullptr) {
    EP_HOST_ASSERT(timeout_s >= 0.0);
    using Clock = std::chrono::steady_clock;
    const auto start = Clock::now();
    const auto deadline = start + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s));
    uint64_t num_polls = 0;
    while (keep_waiting()) {
        ++num_polls;
        if ((num_polls & 1023u) != 0) continue;
        if (record != nullptr) check_device_error_record(record, "host wait for " + what);
        if (Clock::now() > deadline) {
            const double waited_s = std::chrono::duration<double>(Clock::now() - start).count();
            throw EPTimeoutException(detail::concat("timed out after ", waited_s, " s (limit ", timeout_s,
                                                    " s) on the host waiting for ", what,
                                                    rank >= 0 ? detail::concat(" (rank ", rank, ")") : std::string()));
        }
        // Give the core back now and then: the other side may be a process on this CPU.
        if ((num_polls & 65535u) == 0) std::this_thread::yield();
    }
}

}  // namespace ep
