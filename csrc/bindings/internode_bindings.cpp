// Python bindings of the internode normal kernels (csrc/internode). Device pointers and streams are ints; the caller
// (deep_ep_py/backends/internode.py) owns every tensor and the NVSHMEM buffer.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <utility>

#include "../common/exception.hpp"
#include "../internode/buffer_layout.hpp"
#include "../internode/internode.hpp"
#include "bindings.hpp"

namespace py = pybind11;

namespace ep {

namespace {

internode::Buffers make_buffers(uintptr_t buffer, size_t num_bytes, int rank, int num_ranks, int num_local_ranks,
                                bool emulate_network) {
    return internode::Buffers{as_ptr<void>(buffer), num_bytes, rank, num_ranks, num_local_ranks, emulate_network};
}

py::dict layout_constants(int num_ranks, int num_nodes) {
    EP_HOST_ASSERT(num_ranks >= 1);
    EP_HOST_ASSERT(num_nodes >= 1);
    py::dict constants;
    constants["control_bytes"] = internode::ControlLayout::make(num_ranks, num_nodes).bytes;
    constants["max_ranks"] = internode::kMaxRanks;
    constants["max_ranks_per_node"] = internode::kMaxRanksPerNode;
    constants["max_local_experts"] = internode::kMaxLocalExperts;
    constants["num_host_counters"] = internode::kNumHostCounters;
    constants["counter_sequence"] = internode::kCounterSequence;
    constants["counter_num_recv_tokens"] = internode::kCounterNumRecvTokens;
    constants["counter_num_rounds"] = internode::kCounterNumRounds;
    constants["counter_num_forwarded"] = internode::kCounterNumForwarded;
    constants["counter_expert_base"] = internode::kCounterExpertBase;
    return constants;
}

// (dispatch slot stride, combine slot stride) a handle of this hidden and top-k reserves.
std::pair<int, int> strides(int hidden, int num_topk, int num_local_ranks) {
    return {internode::reserved_dispatch_stride(hidden, num_topk, num_local_ranks),
            internode::reserved_combine_stride(hidden, num_topk)};
}

int rows_per_round(size_t num_bytes, int num_ranks, int num_nodes, int hidden, int num_topk) {
    EP_HOST_ASSERT(num_nodes >= 1);
    EP_HOST_ASSERT(num_ranks % num_nodes == 0);
    const int num_local_ranks = num_ranks / num_nodes;
    const auto [dispatch_stride, combine_stride] = strides(hidden, num_topk, num_local_ranks);
    return internode::rows_per_round(num_bytes, num_ranks, num_nodes, num_local_ranks, dispatch_stride,
                                     combine_stride);
}

size_t min_bytes(int num_ranks, int num_nodes, int hidden, int num_topk, int rows) {
    EP_HOST_ASSERT(num_nodes >= 1);
    EP_HOST_ASSERT(num_ranks % num_nodes == 0);
    EP_HOST_ASSERT(rows >= 1);
    const int num_local_ranks = num_ranks / num_nodes;
    const auto [dispatch_stride, combine_stride] = strides(hidden, num_topk, num_local_ranks);
    const internode::ControlLayout control = internode::ControlLayout::make(num_ranks, num_nodes);
    return internode::StagingLayout::make(control, num_nodes, num_local_ranks, rows, dispatch_stride, combine_stride)
        .end;
}

}  // namespace

void register_internode(py::module_& m) {
    m.def("internode_layout", &layout_constants, py::arg("num_ranks"), py::arg("num_nodes"),
          "Sizes of the internode buffer layout and the host-counter indices (csrc/internode/buffer_layout.hpp).");
    m.def("internode_strides", &strides, py::arg("hidden"), py::arg("num_topk"), py::arg("num_local_ranks"),
          "(dispatch, combine) staging slot bytes a dispatch handle reserves per row.");
    m.def(
        "internode_combine_row_bytes",
        [](int hidden, int num_topk) { return internode::CombineRowFormat::make(hidden, num_topk).stride; },
        py::arg("hidden"), py::arg("num_topk"), "Staging bytes of one combine row.");
    m.def("internode_rows_per_round", &rows_per_round, py::arg("num_bytes"), py::arg("num_ranks"),
          py::arg("num_nodes"), py::arg("hidden"), py::arg("num_topk"),
          "Rows per source block per round that fit num_bytes (0: none).");
    m.def("internode_min_bytes", &min_bytes, py::arg("num_ranks"), py::arg("num_nodes"), py::arg("hidden"),
          py::arg("num_topk"), py::arg("rows_per_round"),
          "Buffer bytes that hold exactly rows_per_round rows per block (control area included).");
    m.def(
        "internode_node_peers_mapped",
        [](uintptr_t buffer, size_t num_bytes, int rank, int num_ranks, int num_local_ranks, bool emulate_network) {
            return internode::node_peers_mapped(
                make_buffers(buffer, num_bytes, rank, num_ranks, num_local_ranks, emulate_network));
        },
        py::kw_only(), py::arg("buffer"), py::arg("num_bytes"), py::arg("rank"), py::arg("num_ranks"),
        py::arg("num_local_ranks"), py::arg("emulate_network"),
        "Whether nvshmem_ptr maps the buffer of every rank of this rank's node.");

    m.def(
        "internode_notify",
        [](uintptr_t buffer, size_t num_bytes, int rank, int num_ranks, int num_local_ranks, bool emulate_network,
           uintptr_t is_token_in_rank, int num_tokens, uintptr_t num_tokens_per_expert, int num_local_experts,
           int expert_alignment, int rows_per_round, int max_rounds, uintptr_t send_pos, uintptr_t send_counts,
           uintptr_t node_send_pos, uintptr_t node_send_list, uintptr_t node_send_counts,
           uintptr_t rank_prefix_matrix, uintptr_t node_counts, uintptr_t num_rounds_device, uintptr_t host_counters,
           int host_sequence, int num_worst_tokens, uintptr_t error_record, double timeout_s, bool trap_on_error,
           uintptr_t stream) {
            const internode::NotifyArgs args{as_ptr<const bool>(is_token_in_rank),
                                             num_tokens,
                                             as_ptr<const int>(num_tokens_per_expert),
                                             num_local_experts,
                                             expert_alignment,
                                             rows_per_round,
                                             max_rounds,
                                             as_ptr<int>(send_pos),
                                             as_ptr<int>(send_counts),
                                             as_ptr<int>(node_send_pos),
                                             as_ptr<int>(node_send_list),
                                             as_ptr<int>(node_send_counts),
                                             as_ptr<int>(rank_prefix_matrix),
                                             as_ptr<int>(node_counts),
                                             as_ptr<int>(num_rounds_device),
                                             as_ptr<int>(host_counters),
                                             host_sequence,
                                             num_worst_tokens};
            internode::notify_dispatch(
                make_buffers(buffer, num_bytes, rank, num_ranks, num_local_ranks, emulate_network), args,
                make_wait(error_record, timeout_s, trap_on_error), reinterpret_cast<cudaStream_t>(stream));
        },
        py::kw_only(), py::arg("buffer"), py::arg("num_bytes"), py::arg("rank"), py::arg("num_ranks"),
        py::arg("num_local_ranks"), py::arg("emulate_network"), py::arg("is_token_in_rank"), py::arg("num_tokens"),
        py::arg("num_tokens_per_expert"), py::arg("num_local_experts"), py::arg("expert_alignment"),
        py::arg("rows_per_round"), py::arg("max_rounds"), py::arg("send_pos"), py::arg("send_counts"),
        py::arg("node_send_pos"), py::arg("node_send_list"), py::arg("node_send_counts"),
        py::arg("rank_prefix_matrix"), py::arg("node_counts"), py::arg("num_rounds_device"),
        py::arg("host_counters"), py::arg("host_sequence"), py::arg("num_worst_tokens"), py::arg("error_record"),
        py::arg("timeout_s"), py::arg("trap_on_error") = false, py::arg("stream"),
        "Dispatch notify on `stream`: send positions, every rank's counts, rank_prefix_matrix, node counts, the "
        "round count; with host_sequence > 0 also the host counters (N, rounds, forwarded rows, per-expert).");

    m.def(
        "internode_dispatch",
        [](uintptr_t buffer, size_t num_bytes, int rank, int num_ranks, int num_local_ranks, bool emulate_network,
           int num_rounds, int rows_per_round, int dispatch_stride, int combine_stride, uintptr_t x, int payload_bytes,
           uintptr_t x_scales, int num_scales, int64_t scale_stride_token, int64_t scale_stride_group,
           uintptr_t topk_idx, uintptr_t topk_weights, int num_topk, int num_tokens, uintptr_t send_pos,
           uintptr_t node_send_list, uintptr_t rank_prefix_matrix, uintptr_t node_counts,
           uintptr_t num_rounds_device, uintptr_t recv_x, uintptr_t recv_scales, uintptr_t recv_src_idx,
           uintptr_t recv_topk_idx, uintptr_t recv_topk_weights, uintptr_t recv_node_slot, int num_recv_rows,
           bool pad_rows, int num_local_experts, uintptr_t forward_mask, int num_forward_rows, int num_sms,
           uintptr_t error_record, double timeout_s, bool trap_on_error, uintptr_t stream) {
            const internode::DispatchArgs args{num_rounds,
                                               rows_per_round,
                                               dispatch_stride,
                                               combine_stride,
                                               as_ptr<const void>(x),
                                               payload_bytes,
                                               as_ptr<const float>(x_scales),
                                               num_scales,
                                               scale_stride_token,
                                               scale_stride_group,
                                               as_ptr<const int64_t>(topk_idx),
                                               as_ptr<const float>(topk_weights),
                                               num_topk,
                                               num_tokens,
                                               as_ptr<const int>(send_pos),
                                               as_ptr<const int>(node_send_list),
                                               as_ptr<const int>(rank_prefix_matrix),
                                               as_ptr<const int>(node_counts),
                                               as_ptr<const int>(num_rounds_device),
                                               as_ptr<void>(recv_x),
                                               as_ptr<float>(recv_scales),
                                               as_ptr<int>(recv_src_idx),
                                               as_ptr<int64_t>(recv_topk_idx),
                                               as_ptr<float>(recv_topk_weights),
                                               as_ptr<int>(recv_node_slot),
                                               num_recv_rows,
                                               pad_rows,
                                               num_local_experts,
                                               as_ptr<int>(forward_mask),
                                               num_forward_rows,
                                               num_sms};
            internode::dispatch(make_buffers(buffer, num_bytes, rank, num_ranks, num_local_ranks, emulate_network),
                                args, make_wait(error_record, timeout_s, trap_on_error),
                                reinterpret_cast<cudaStream_t>(stream));
        },
        py::kw_only(), py::arg("buffer"), py::arg("num_bytes"), py::arg("rank"), py::arg("num_ranks"),
        py::arg("num_local_ranks"), py::arg("emulate_network"), py::arg("num_rounds"), py::arg("rows_per_round"),
        py::arg("dispatch_stride"), py::arg("combine_stride"), py::arg("x"), py::arg("payload_bytes"),
        py::arg("x_scales"), py::arg("num_scales"), py::arg("scale_stride_token"), py::arg("scale_stride_group"),
        py::arg("topk_idx"), py::arg("topk_weights"), py::arg("num_topk"), py::arg("num_tokens"), py::arg("send_pos"),
        py::arg("node_send_list"), py::arg("rank_prefix_matrix"), py::arg("node_counts"),
        py::arg("num_rounds_device"), py::arg("recv_x"), py::arg("recv_scales"), py::arg("recv_src_idx"),
        py::arg("recv_topk_idx"), py::arg("recv_topk_weights"), py::arg("recv_node_slot"), py::arg("num_recv_rows"),
        py::arg("pad_rows"), py::arg("num_local_experts"), py::arg("forward_mask"), py::arg("num_forward_rows"),
        py::arg("num_sms"), py::arg("error_record"), py::arg("timeout_s"), py::arg("trap_on_error") = false,
        py::arg("stream"),
        "The rounds of an internode dispatch on `stream` (0 for absent tensors).");

    m.def(
        "internode_combine",
        [](uintptr_t buffer, size_t num_bytes, int rank, int num_ranks, int num_local_ranks, bool emulate_network,
           int num_rounds, int rows_per_round, int dispatch_stride, int combine_stride, int hidden, uintptr_t x,
           int num_x_rows, uintptr_t topk_weights, int num_topk, uintptr_t recv_node_slot, uintptr_t rank_prefix_matrix,
           uintptr_t node_counts, uintptr_t num_rounds_device, uintptr_t forward_mask, int num_forward_rows,
           uintptr_t node_send_pos, int num_tokens, uintptr_t bias0, uintptr_t bias1, uintptr_t acc_x,
           uintptr_t acc_weights, uintptr_t combined_x, uintptr_t combined_weights, int num_sms,
           uintptr_t error_record, double timeout_s, bool trap_on_error, uintptr_t stream) {
            const internode::CombineArgs args{num_rounds,
                                              rows_per_round,
                                              dispatch_stride,
                                              combine_stride,
                                              hidden,
                                              as_ptr<const void>(x),
                                              num_x_rows,
                                              as_ptr<const float>(topk_weights),
                                              num_topk,
                                              as_ptr<const int>(recv_node_slot),
                                              as_ptr<const int>(rank_prefix_matrix),
                                              as_ptr<const int>(node_counts),
                                              as_ptr<const int>(num_rounds_device),
                                              as_ptr<const int>(forward_mask),
                                              num_forward_rows,
                                              as_ptr<const int>(node_send_pos),
                                              num_tokens,
                                              as_ptr<const void>(bias0),
                                              as_ptr<const void>(bias1),
                                              as_ptr<float>(acc_x),
                                              as_ptr<float>(acc_weights),
                                              as_ptr<void>(combined_x),
                                              as_ptr<float>(combined_weights),
                                              num_sms};
            internode::combine(make_buffers(buffer, num_bytes, rank, num_ranks, num_local_ranks, emulate_network),
                               args, make_wait(error_record, timeout_s, trap_on_error),
                               reinterpret_cast<cudaStream_t>(stream));
        },
        py::kw_only(), py::arg("buffer"), py::arg("num_bytes"), py::arg("rank"), py::arg("num_ranks"),
        py::arg("num_local_ranks"), py::arg("emulate_network"), py::arg("num_rounds"), py::arg("rows_per_round"),
        py::arg("dispatch_stride"), py::arg("combine_stride"), py::arg("hidden"), py::arg("x"), py::arg("num_x_rows"),
        py::arg("topk_weights"), py::arg("num_topk"), py::arg("recv_node_slot"), py::arg("rank_prefix_matrix"),
        py::arg("node_counts"), py::arg("num_rounds_device"), py::arg("forward_mask"), py::arg("num_forward_rows"),
        py::arg("node_send_pos"), py::arg("num_tokens"), py::arg("bias0"), py::arg("bias1"), py::arg("acc_x"),
        py::arg("acc_weights"), py::arg("combined_x"), py::arg("combined_weights"), py::arg("num_sms"),
        py::arg("error_record"), py::arg("timeout_s"), py::arg("trap_on_error") = false, py::arg("stream"),
        "The rounds of an internode combine on `stream` (0 for absent tensors).");

    m.def(
        "internode_barrier",
        [](uintptr_t buffer, size_t num_bytes, int rank, int num_ranks, int num_local_ranks, bool emulate_network,
           uintptr_t error_record, double timeout_s, bool trap_on_error, uintptr_t stream) {
            internode::barrier(make_buffers(buffer, num_bytes, rank, num_ranks, num_local_ranks, emulate_network),
                               make_wait(error_record, timeout_s, trap_on_error),
                               reinterpret_cast<cudaStream_t>(stream));
        },
        py::kw_only(), py::arg("buffer"), py::arg("num_bytes"), py::arg("rank"), py::arg("num_ranks"),
        py::arg("num_local_ranks"), py::arg("emulate_network"), py::arg("error_record"), py::arg("timeout_s"),
        py::arg("trap_on_error") = false, py::arg("stream"),
        "One barrier kernel of all ranks on `stream`.");
}

}  // namespace ep
