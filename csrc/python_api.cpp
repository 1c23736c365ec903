// The deep_ep_py._C module. Importing it touches no CUDA API, so it imports on machines without a driver.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <exception>

#include "bindings/bindings.hpp"
#include "common/exception.hpp"
#include "runtime/nvshmem_runtime.hpp"

namespace py = pybind11;

#ifndef DEEP_EP_PY_CUDA_ARCHS
#define DEEP_EP_PY_CUDA_ARCHS "unknown"
#endif

namespace {

// EPException -> deep_ep_py.errors.DeepEPError, EPTimeoutException -> deep_ep_py.errors.DeepEPTimeoutError.
void register_exception_translators() {
    py::module_ errors = py::module_::import("deep_ep_py.errors");
    // Deliberately leaked: the translator may run until interpreter shutdown.
    static py::handle error_type = py::object(errors.attr("DeepEPError")).release();
    static py::handle timeout_type = py::object(errors.attr("DeepEPTimeoutError")).release();
    py::register_exception_translator([](std::exception_ptr exception) {
        try {
            if (exception) std::rethrow_exception(exception);
        } catch (const ep::EPTimeoutException& e) {
            py::set_error(timeout_type, e.what());
        } catch (const ep::EPException& e) {
            py::set_error(error_type, e.what());
        }
    });
}

py::dict build_info() {
    py::dict info;
    info["cuda_version"] = ep::detail::concat(CUDART_VERSION / 1000, ".", (CUDART_VERSION % 1000) / 10);
    info["cuda_archs"] = DEEP_EP_PY_CUDA_ARCHS;
    info["nvshmem_version"] = ep::nvshmem_compiled_version();
    info["pybind11_version"] = ep::detail::concat(PYBIND11_VERSION_MAJOR, ".", PYBIND11_VERSION_MINOR, ".",
                                                  PYBIND11_VERSION_PATCH);
#ifdef NDEBUG
    info["build_type"] = "release";
#else
    info["build_type"] = "debug";
#endif
    return info;
}

}  // namespace

// deep_ep_py._C, or deep_ep_py._C_emu: the same sources built for the CPU emulator (csrc/emu).
#ifndef DEEP_EP_PY_MODULE_NAME
#define DEEP_EP_PY_MODULE_NAME _C
#endif

PYBIND11_MODULE(DEEP_EP_PY_MODULE_NAME, m) {
    m.doc() = "deep_ep_py CUDA kernels and runtime (raw device pointers as ints, streams as ints).";
    register_exception_translators();
    m.def("build_info", &build_info, "CUDA version, target archs and NVSHMEM version the module was built with.");
    ep::register_runtime(m);
    ep::register_layout(m);
    ep::register_low_latency(m);
    ep::register_intranode(m);
    ep::register_internode(m);
}
