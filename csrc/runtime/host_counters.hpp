// Host-mapped int counters: pinned host memory that kernels write (through device_ptr) and the host polls.
// Used for the counts a dispatch needs before the host can size its outputs (the notify path).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ep {

class HostCounters {
public:
    explicit HostCounters(int num_counters);  // cudaHostAlloc(mapped), all counters 0: needs a GPU
    ~HostCounters();
    HostCounters(const HostCounters&) = delete;
    HostCounters& operator=(const HostCounters&) = delete;

    int size() const { return num_counters_; }
    uintptr_t device_ptr() const { return reinterpret_cast<uintptr_t>(device_ptr_); }
    uintptr_t host_ptr() const { return reinterpret_cast<uintptr_t>(host_ptr_); }
    int get(int idx) const;
    // counter[first], ..., counter[first + count - 1], read in one call (a dispatch's per-expert counts: one binding
    // call per local expert costs ~0.2 ms at 1024 of them).
    std::vector<int> get_range(int first, int count) const;
    void set(int idx, int value);
    // Waits until counter[idx] == value; throws EPTimeoutException naming `what` after timeout_s seconds, or as
    // soon as the device error record at error_record_host_ptr (0 = none) reports a device timeout. Equality, not
    // >=: the callers' sequence numbers wrap (past 2^31 - 1 back to 1), and the host waits for each before it issues
    // the next, so the counter holds the previous number or this one (or an older one from a kernel that ran late).
    void wait_eq(int idx, int value, double timeout_s, const std::string& what, uintptr_t error_record_host_ptr = 0,
                 int rank = -1) const;

private:
    void check_idx(int idx) const;

    int num_counters_ = 0;
    volatile int* host_ptr_ = nullptr;
    int* device_ptr_ = nullptr;
};

}  // namespace ep
