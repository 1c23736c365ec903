// Each part of the extension registers its own Python functions; python_api.cpp calls these.
#pragma once

#include <pybind11/pybind11.h>

namespace ep {

void register_runtime(pybind11::module_& m);
void register_layout(pybind11::module_& m);
void register_low_latency(pybind11::module_& m);
void register_intranode(pybind11::module_& m);

}  // namespace ep
