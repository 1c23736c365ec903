#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <string>

#include "../common/exception.hpp"
#include "../runtime/device.hpp"
#include "../runtime/error_record.hpp"
#include "../runtime/host_counters.hpp"
#include "../runtime/host_wait.hpp"
#include "../runtime/ipc.hpp"
#include "../runtime/nvshmem_runtime.hpp"
#include "bindings.hpp"
#include "dlpack_view.hpp"

namespace py = pybind11;

namespace ep {

namespace {

using ReleaseGil = py::call_guard<py::gil_scoped_release>;

void register_device(py::module_& m) {
    m.def("device_count", &device_count, "Number of CUDA devices; 0 without a GPU or driver. Never raises.");
    m.def("gpu_status", &gpu_status, "Human-readable GPU status, e.g. 'no GPU: cudaGetDeviceCount returned ...'.");
    m.def("stream_capture_id", &stream_capture_id, py::arg("stream"),
          "The id of the CUDA-graph capture the stream (a cudaStream_t as int) takes part in; 0 when not capturing.");
}

void register_waits(py::module_& m) {
    // module_local: deep_ep_py._C and its CPU emulator _C_emu bind the same C++ types, and one process may load both
    // (the test session decides where the GPU tier runs after loading _C).
    py::class_<ErrorRecord>(m, "ErrorRecord",
                            "Host-mapped record where a timed-out device wait leaves rank, channel and wait site.",
                            py::module_local())
        .def(py::init<>())
        .def_property_readonly("device_ptr", &ErrorRecord::device_ptr)
        .def_property_readonly("host_ptr", &ErrorRecord::host_ptr)
        .def("has_error", &ErrorRecord::has_error)
        .def("check", &ErrorRecord::check, py::arg("what"),
             "Raise DeepEPTimeoutError if a kernel recorded a timeout; `what` names the operation that checked.")
        .def("reset", &ErrorRecord::reset, "Clear the whole record; only once no kernel that may write it runs.")
        .def("check_and_reset", &ErrorRecord::check_and_reset, py::arg("what"),
             "Raise what check(what) would, and clear the record but its timed_out word (kernels still queued "
             "give up at once on it, and record that they did).");

    py::class_<HostCounters>(m, "HostCounters", "Host-mapped int32 counters written by kernels, polled by the host.",
                             py::module_local())
        .def(py::init<int>(), py::arg("num_counters"))
        .def("__len__", &HostCounters::size)
        .def_property_readonly("device_ptr", &HostCounters::device_ptr)
        .def_property_readonly("host_ptr", &HostCounters::host_ptr)
        .def("get", &HostCounters::get, py::arg("idx"))
        .def("get_range", &HostCounters::get_range, py::arg("first"), py::arg("count"),
             "[counter[first], ..., counter[first + count - 1]] as a list.")
        .def("set", &HostCounters::set, py::arg("idx"), py::arg("value"))
        .def("wait_eq", &HostCounters::wait_eq, py::arg("idx"), py::arg("value"), py::arg("timeout_s"),
             py::arg("what"), py::arg("error_record_host_ptr") = 0, py::arg("rank") = -1, ReleaseGil(),
             "Wait (GIL released) until counter[idx] == value; DeepEPTimeoutError naming `what` after timeout_s.");

    m.def("default_timeout_s", [] { return static_cast<double>(default_timeout_ns()) * 1e-9; },
          "Device wait timeout in seconds: DEEP_EP_PY_TIMEOUT_S, else 100.");
    m.def(
        "launch_timeout_self_test",
        [](uintptr_t record_device_ptr, double timeout_s, int rank, int channel, uintptr_t stream,
           bool capacity_record_first, bool trap_on_error) {
            launch_timeout_self_test(record_device_ptr, timeout_s, rank, channel,
                                     reinterpret_cast<cudaStream_t>(stream), capacity_record_first, trap_on_error);
        },
        py::arg("record_device_ptr"), py::arg("timeout_s"), py::arg("rank"), py::arg("channel"), py::arg("stream"),
        py::arg("capacity_record_first") = false, py::arg("trap_on_error") = false,
        "Launch a kernel whose device wait never completes: it must time out into the error record. With "
        "capacity_record_first it records a num_worst_tokens capacity error first, which must not cut the wait short. "
        "With trap_on_error the kernel traps after recording the timeout (the CUDA context ends).");
}

void register_ipc(py::module_& m) {
    m.def("ipc_malloc", &ipc_malloc, py::arg("num_bytes"), "cudaMalloc + zero; returns the device pointer.");
    m.def("ipc_free", &ipc_free, py::arg("ptr"));
    m.def(
        "ipc_get_mem_handle", [](uintptr_t ptr) { return py::bytes(ipc_get_mem_handle(ptr)); }, py::arg("ptr"),
        "cudaIpcMemHandle_t of the allocation at ptr, as 64 bytes.");
    m.def(
        "ipc_open_mem_handle", [](py::bytes handle) { return ipc_open_mem_handle(std::string(handle)); },
        py::arg("handle"), "Map a peer's allocation; returns the local device pointer.");
    m.def("ipc_close_mem_handle", &ipc_close_mem_handle, py::arg("ptr"));
    m.def("dlpack_view", &make_dlpack_view, py::arg("ptr"), py::arg("num_bytes"), py::arg("device_type"),
          py::arg("device_id"), py::arg("on_release"),
          "A DLPack capsule viewing num_bytes at ptr as uint8 on (device_type 1 = CPU, 2 = CUDA, device_id), for "
          "torch.from_dlpack; on_release() is called once, when the last tensor over it dies.");
}

void register_nvshmem(py::module_& m) {
    m.def("nvshmem_compiled_version", &nvshmem_compiled_version);
    m.def("nvshmem_host_version", &nvshmem_host_version);
    m.def("nvshmem_check_version", &nvshmem_check_version);
    m.def(
        "nvshmem_get_unique_id", [] { return py::bytes(nvshmem_get_unique_id()); },
        "Unique id (bytes) made by rank 0 and broadcast to all ranks before nvshmem_init.");
    m.def(
        "nvshmem_init",
        [](py::bytes unique_id, int rank, int num_ranks) {
            std::string id(unique_id);
            py::gil_scoped_release release;
            nvshmem_init(id, rank, num_ranks);
        },
        py::arg("unique_id"), py::arg("rank"), py::arg("num_ranks"),
        "NVSHMEMX_INIT_WITH_UNIQUEID bootstrap (GIL released while the ranks meet).");
    m.def("nvshmem_finalize", &nvshmem_finalize, ReleaseGil());
    m.def("nvshmem_is_initialized", &nvshmem_is_initialized);
    m.def("nvshmem_my_pe", &nvshmem_my_pe);
    m.def("nvshmem_n_pes", &nvshmem_n_pes);
    m.def("nvshmem_malloc", &nvshmem_malloc, py::arg("num_bytes"), py::arg("alignment") = 128, ReleaseGil(),
          "Collective symmetric allocation, zero-filled; returns the device pointer.");
    m.def("nvshmem_free", &nvshmem_free, py::arg("ptr"), ReleaseGil());
    m.def("nvshmem_ptr", &nvshmem_ptr, py::arg("ptr"), py::arg("pe"),
          "Peer address of a symmetric pointer mapped here (P2P), or 0.");
    m.def("nvshmem_barrier_all", &nvshmem_barrier_all, ReleaseGil());
}

void register_test_hooks(py::module_& m) {
    m.def(
        "_test_host_assert", [](int64_t a, int64_t b) { EP_HOST_ASSERT(a == b); }, py::arg("a"), py::arg("b"),
        "EP_HOST_ASSERT(a == b): the DeepEPError message carries both values.");
    m.def(
        "_test_host_timeout",
        [](double timeout_s, const std::string& what) {
            const volatile int never_changes = 0;
            host_timeout_while([&] { return never_changes == 0; }, timeout_s, what);
        },
        py::arg("timeout_s"), py::arg("what"), ReleaseGil(),
        "Wait on a host int that never changes: raises DeepEPTimeoutError naming `what`. Needs no GPU.");
}

}  // namespace

void register_runtime(py::module_& m) {
    register_device(m);
    register_waits(m);
    register_ipc(m);
    register_nvshmem(m);
    register_test_hooks(m);
}

}  // namespace ep
