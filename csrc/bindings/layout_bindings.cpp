#include <pybind11/pybind11.h>

#include <cstdint>

#include "../layout.hpp"
#include "bindings.hpp"

namespace py = pybind11;

namespace ep {

void register_layout(py::module_& m) {
    m.def(
        "get_dispatch_layout",
        [](uintptr_t topk_idx_ptr, int num_tokens, int num_topk, int num_experts, int num_ranks,
           int num_ranks_per_node, uintptr_t num_tokens_per_rank_ptr, uintptr_t num_tokens_per_rdma_rank_ptr,
           uintptr_t num_tokens_per_expert_ptr, uintptr_t is_token_in_rank_ptr, uintptr_t stream,
           uintptr_t error_record_ptr, int rank, bool trap_on_error) {
            get_dispatch_layout(as_ptr<const int64_t>(topk_idx_ptr), num_tokens, num_topk, num_experts, num_ranks,
                                num_ranks_per_node, as_ptr<int>(num_tokens_per_rank_ptr),
                                as_ptr<int>(num_tokens_per_rdma_rank_ptr), as_ptr<int>(num_tokens_per_expert_ptr),
                                as_ptr<bool>(is_token_in_rank_ptr), reinterpret_cast<cudaStream_t>(stream),
                                as_ptr<DeviceErrorRecord>(error_record_ptr), rank, trap_on_error);
        },
        py::arg("topk_idx_ptr"), py::arg("num_tokens"), py::arg("num_topk"), py::arg("num_experts"),
        py::arg("num_ranks"), py::arg("num_ranks_per_node"), py::arg("num_tokens_per_rank_ptr"),
        py::arg("num_tokens_per_rdma_rank_ptr"), py::arg("num_tokens_per_expert_ptr"),
        py::arg("is_token_in_rank_ptr"), py::arg("stream"), py::arg("error_record_ptr") = 0, py::arg("rank") = -1,
        py::arg("trap_on_error") = false,
        "Dispatch layout on `stream` (device pointers as ints). topk_idx int64 [T, K] (-1 = none, K <= 32); "
        "outputs num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank int32 [R / num_ranks_per_node] "
        "(0 = not computed, for one node), num_tokens_per_expert int32 [E], is_token_in_rank bool [T, R]. "
        "Expert e lives on rank e // (E / R). An id outside [-1, E) is skipped and recorded in the ErrorRecord at "
        "error_record_ptr (its device_ptr; `rank` names the caller), then traps where trap_on_error is set; traps "
        "where error_record_ptr is 0.");
}

}  // namespace ep
