// Each part of the extension registers its own Python functions; python_api.cpp calls these.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "../common/error_record.hpp"
#include "../common/exception.hpp"

namespace ep {

// Python passes device pointers as ints (tensor.data_ptr()): csrc never sees a torch tensor.
template <typename T>
T* as_ptr(uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

// The wait settings of a launch: the host-mapped error record (its device view), the timeout in seconds, and whether
// a recorded error traps (deep_ep_py.config.trap_on_device_error).
inline WaitConfig make_wait(uintptr_t error_record_ptr, double timeout_s, bool trap_on_error) {
    EP_HOST_ASSERT(error_record_ptr != 0);
    EP_HOST_ASSERT(timeout_s > 0.0);
    return WaitConfig{as_ptr<DeviceErrorRecord>(error_record_ptr), static_cast<uint64_t>(timeout_s * 1e9),
                      trap_on_error};
}

void register_runtime(pybind11::module_& m);
void register_layout(pybind11::module_& m);
void register_low_latency(pybind11::module_& m);
void register_intranode(pybind11::module_& m);
void register_internode(pybind11::module_& m);

}  // namespace ep
