// Host side of the device error record (common/error_record.hpp): owns one host-mapped record, hands its device
// pointer to kernels (TimeoutContext::record), and turns a recorded timeout into EPTimeoutException.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "../common/error_record.hpp"

namespace ep {

class ErrorRecord {
public:
    ErrorRecord();  // cudaHostAlloc(mapped): needs a GPU
    ~ErrorRecord();
    ErrorRecord(const ErrorRecord&) = delete;
    ErrorRecord& operator=(const ErrorRecord&) = delete;

    uintptr_t device_ptr() const { return reinterpret_cast<uintptr_t>(device_ptr_); }
    uintptr_t host_ptr() const { return reinterpret_cast<uintptr_t>(host_ptr_); }
    const DeviceErrorRecord* host_record() const { return host_ptr_; }
    bool has_error() const;
    // Throws EPTimeoutException if a kernel recorded a timeout; `what` names the host operation that checked.
    void check(const std::string& what) const;
    void reset();
    // check(), then clear what it raised: for records whose errors leave the kernels in step (the next call may run).
    void check_and_reset(const std::string& what);

private:
    DeviceErrorRecord* host_ptr_ = nullptr;
    DeviceErrorRecord* device_ptr_ = nullptr;
};

// Launches a one-block kernel that waits, through timeout_while, on a flag nobody sets: checks on a GPU that a
// device timeout is recorded and becomes a Python exception instead of a hang, and that the kernel's other wait
// (given 100 times the timeout) drains with it. With capacity_record_first the kernel first records a capacity
// error (as an overflowing notify does), which must neither cut the waits short nor keep the second from draining.
// With trap_on_error the first wait traps after recording its timeout, as a captured launch's does.
void launch_timeout_self_test(uintptr_t record_device_ptr, double timeout_s, int rank, int channel, cudaStream_t stream,
                              bool capacity_record_first = false, bool trap_on_error = false);

}  // namespace ep
