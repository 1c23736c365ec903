// Each part of the extension registers its own Python functions; python_api.cpp calls these.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace ep {

// Python passes device pointers as ints (tensor.data_ptr()): csrc never sees a torch tensor.
template <typename T>
T* as_ptr(uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

void register_runtime(pybind11::module_& m);
void register_layout(pybind11::module_& m);
void register_low_latency(pybind11::module_& m);
void register_intranode(pybind11::module_& m);

}  // namespace ep
