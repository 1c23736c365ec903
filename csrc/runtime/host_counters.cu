#include <cuda_runtime.h>

#include <atomic>

#include "../common/exception.hpp"
#include "host_counters.hpp"
#include "host_wait.hpp"

namespace ep {

HostCounters::HostCounters(int num_counters) : num_counters_(num_counters) {
    EP_HOST_ASSERT(num_counters > 0);
    void* host = nullptr;
    CUDA_CHECK(cudaHostAlloc(&host, sizeof(int) * num_counters, cudaHostAllocMapped));
    host_ptr_ = static_cast<volatile int*>(host);
    for (int i = 0; i < num_counters; ++i) host_ptr_[i] = 0;
    void* device = nullptr;
    const cudaError_t status = cudaHostGetDevicePointer(&device, host, 0);
    if (status != cudaSuccess) {
        cudaFreeHost(host);
        CUDA_CHECK(status);
    }
    device_ptr_ = static_cast<int*>(device);
}

HostCounters::~HostCounters() {
    if (host_ptr_ != nullptr) cudaFreeHost(const_cast<int*>(host_ptr_));  // no throw from a destructor
}

void HostCounters::check_idx(int idx) const {
    EP_HOST_ASSERT_MSG(idx >= 0, "counter index out of range [0, ", num_counters_, ")");
    EP_HOST_ASSERT_MSG(idx < num_counters_, "counter index out of range");
}

int HostCounters::get(int idx) const {
    check_idx(idx);
    const int value = host_ptr_[idx];
    // What the device wrote before its (release, sys-scope) counter store is visible after this read.
    std::atomic_thread_fence(std::memory_order_acquire);
    return value;
}

std::vector<int> HostCounters::get_range(int first, int count) const {
    const bool in_range = first >= 0 && count >= 0 && count <= num_counters_ - first;
    EP_HOST_ASSERT_MSG(in_range, "counters [", first, ", ", static_cast<int64_t>(first) + count, ") out of range [0, ",
                       num_counters_, ")");
    std::vector<int> values(static_cast<size_t>(count));
    for (int i = 0; i < count; ++i) values[static_cast<size_t>(i)] = host_ptr_[first + i];
    std::atomic_thread_fence(std::memory_order_acquire);  // as in get()
    return values;
}

void HostCounters::set(int idx, int value) {
    check_idx(idx);
    std::atomic_thread_fence(std::memory_order_release);
    host_ptr_[idx] = value;
}

void HostCounters::wait_eq(int idx, int value, double timeout_s, const std::string& what,
                           uintptr_t error_record_host_ptr, int rank) const {
    check_idx(idx);
    const volatile int* counter = host_ptr_ + idx;
    host_timeout_while([&] { return *counter != value; }, timeout_s, what, rank,
                       reinterpret_cast<const DeviceErrorRecord*>(error_record_host_ptr));
    std::atomic_thread_fence(std::memory_order_acquire);
}

}  // namespace ep
