// Python bindings of the low-latency kernels: device pointers and streams as ints, shapes as ints, the dispatch
// format as its enum value. deep_ep_py/backends/low_latency.py is the only caller.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "../common/exception.hpp"
#include "../low_latency/buffer_layout.hpp"
#include "../low_latency/low_latency.hpp"
#include "bindings.hpp"

namespace py = pybind11;

namespace ep {

namespace {

low_latency::Launch make_launch(int num_blocks, uintptr_t stream, uintptr_t error_record, double timeout_s,
                                bool trap_on_error, bool mask_on_timeout, int emulated_node_size) {
    EP_HOST_ASSERT(emulated_node_size >= 0);
    const WaitConfig wait = make_wait(error_record, timeout_s, trap_on_error);
    return low_latency::Launch{num_blocks,         reinterpret_cast<cudaStream_t>(stream),
                               wait.record,        wait.timeout_ns,
                               wait.trap_on_error, mask_on_timeout,
                               emulated_node_size};
}

// One binding serves the send and the receive launch of dispatch (the receive reads the output pointers).
void dispatch_launch(bool is_recv, int num_max_tokens, int hidden, int num_ranks, int num_experts, int rank,
                     uintptr_t x, uintptr_t topk_idx, int num_tokens, int num_topk, uintptr_t rank_mask, int format,
                     uintptr_t buffer, int half_idx, uintptr_t workspace, uintptr_t last_half, uintptr_t recv_x,
                     uintptr_t recv_scales, uintptr_t src_info, uintptr_t src_topk_slot, uintptr_t layout_range,
                     uintptr_t recv_count, uintptr_t cumulative_recv_stats, uintptr_t wait_recv_cost_stats,
                     int num_blocks, uintptr_t stream, uintptr_t error_record, double timeout_s, bool trap_on_error,
                     bool mask_on_timeout, int emulated_node_size) {
    EP_HOST_ASSERT(format >= 0);
    EP_HOST_ASSERT(format <= static_cast<int>(low_latency::DispatchFormat::kFp8Ue8m0));
    const low_latency::Shape shape{num_max_tokens, hidden, num_ranks, num_experts, rank};
    const low_latency::DispatchArgs args{as_ptr<const void>(x),
                                         as_ptr<const int64_t>(topk_idx),
                                         num_tokens,
                                         num_topk,
                                         as_ptr<int>(rank_mask),
                                         static_cast<low_latency::DispatchFormat>(format),
                                         as_ptr<void>(buffer),
                                         half_idx,
                                         as_ptr<int>(workspace),
                                         as_ptr<int>(last_half),
                                         as_ptr<void>(recv_x),
                                         as_ptr<void>(recv_scales),
                                         as_ptr<int>(src_info),
                                         as_ptr<int>(src_topk_slot),
                                         as_ptr<int64_t>(layout_range),
                                         as_ptr<int>(recv_count),
                                         as_ptr<int>(cumulative_recv_stats),
                                         as_ptr<int64_t>(wait_recv_cost_stats)};
    const low_latency::Launch launch =
        make_launch(num_blocks, stream, error_record, timeout_s, trap_on_error, mask_on_timeout, emulated_node_size);
    if (is_recv) {
        low_latency::dispatch_recv(shape, args, launch);
    } else {
        low_latency::dispatch_send(shape, args, launch);
    }
}

void combine_launch(bool is_recv, int num_max_tokens, int hidden, int num_ranks, int num_experts, int rank,
                    uintptr_t x, uintptr_t src_info, uintptr_t src_topk_slot, uintptr_t layout_range,
                    uintptr_t topk_idx, uintptr_t topk_weights, int num_tokens, int num_topk, uintptr_t rank_mask,
                    uintptr_t buffer, int half_idx, uintptr_t workspace, uintptr_t last_half, uintptr_t out,
                    uintptr_t wait_recv_cost_stats, int num_blocks, uintptr_t stream, uintptr_t error_record,
                    double timeout_s, bool trap_on_error, bool mask_on_timeout, int emulated_node_size) {
    const low_latency::Shape shape{num_max_tokens, hidden, num_ranks, num_experts, rank};
    const low_latency::CombineArgs args{as_ptr<const void>(x),
                                        as_ptr<const int>(src_info),
                                        as_ptr<const int>(src_topk_slot),
                                        as_ptr<const int64_t>(layout_range),
                                        as_ptr<const int64_t>(topk_idx),
                                        as_ptr<const float>(topk_weights),
                                        num_tokens,
                                        num_topk,
                                        as_ptr<int>(rank_mask),
                                        as_ptr<void>(buffer),
                                        half_idx,
                                        as_ptr<int>(workspace),
                                        as_ptr<int>(last_half),
                                        as_ptr<void>(out),
                                        as_ptr<int64_t>(wait_recv_cost_stats)};
    const low_latency::Launch launch =
        make_launch(num_blocks, stream, error_record, timeout_s, trap_on_error, mask_on_timeout, emulated_node_size);
    if (is_recv) {
        low_latency::combine_recv(shape, args, launch);
    } else {
        low_latency::combine_send(shape, args, launch);
    }
}

}  // namespace

void register_low_latency(py::module_& m) {
    m.def("low_latency_buffer_bytes", &low_latency::buffer_bytes, py::arg("num_max_dispatch_tokens_per_rank"),
          py::arg("hidden"), py::arg("num_ranks"), py::arg("num_experts"),
          "Bytes of the low-latency symmetric buffer layout (csrc/low_latency/buffer_layout.hpp); equals "
          "deep_ep_py.config.low_latency_rdma_size_hint.");
    m.def("low_latency_workspace_ints", &low_latency::workspace_ints, py::arg("num_experts"),
          "int32 counters of the low-latency workspace (zeroed once; the kernels leave them zero).");
    m.def("low_latency_send_offset",
          [](int num_max_tokens, int hidden, int num_ranks, int num_experts, int half_idx) {
              EP_HOST_ASSERT(num_ranks > 0);
              EP_HOST_ASSERT(num_experts % num_ranks == 0);
              EP_HOST_ASSERT((half_idx == 0 || half_idx == 1));
              return low_latency::BufferLayout(num_max_tokens, hidden, num_ranks, num_experts).send_offset(half_idx);
          },
          py::arg("num_max_dispatch_tokens_per_rank"), py::arg("hidden"), py::arg("num_ranks"), py::arg("num_experts"),
          py::arg("half_idx"),
          "Byte offset of a half's send area (the zero-copy combine buffer, bf16 [L, R*M, H]) in the buffer.");
    const auto dispatch_args = [](bool is_recv) {
        return [is_recv](int num_max_tokens, int hidden, int num_ranks, int num_experts, int rank, uintptr_t x,
                         uintptr_t topk_idx, int num_tokens, int num_topk, uintptr_t rank_mask, int format,
                         uintptr_t buffer, int half_idx, uintptr_t workspace, uintptr_t last_half, uintptr_t recv_x,
                         uintptr_t recv_scales, uintptr_t src_info, uintptr_t src_topk_slot, uintptr_t layout_range,
                         uintptr_t recv_count, uintptr_t cumulative_recv_stats, uintptr_t wait_recv_cost_stats,
                         int num_blocks, uintptr_t stream, uintptr_t error_record, double timeout_s,
                         bool trap_on_error, bool mask_on_timeout, int emulated_node_size) {
            dispatch_launch(is_recv, num_max_tokens, hidden, num_ranks, num_experts, rank, x, topk_idx, num_tokens,
                            num_topk, rank_mask, format, buffer, half_idx, workspace, last_half, recv_x, recv_scales,
                            src_info,
                            src_topk_slot, layout_range, recv_count, cumulative_recv_stats, wait_recv_cost_stats,
                            num_blocks, stream, error_record, timeout_s, trap_on_error, mask_on_timeout,
                            emulated_node_size);
        };
    };
    const char* dispatch_doc =
        "Low-latency dispatch launch on `stream` (device pointers as ints, 0 = none). format: 0 bf16, 1 fp8, "
        "2 fp8 with power-of-two scales, 3 fp8 with ue8m0 scales. See csrc/low_latency/low_latency.hpp.";
    for (const bool is_recv : {false, true}) {
        m.def(is_recv ? "low_latency_dispatch_recv" : "low_latency_dispatch_send", dispatch_args(is_recv),
              py::arg("num_max_dispatch_tokens_per_rank"), py::arg("hidden"), py::arg("num_ranks"),
              py::arg("num_experts"), py::arg("rank"), py::arg("x_ptr"), py::arg("topk_idx_ptr"),
              py::arg("num_tokens"), py::arg("num_topk"), py::arg("rank_mask_ptr"), py::arg("format"),
              py::arg("buffer_ptr"), py::arg("half_idx"), py::arg("workspace_ptr"), py::arg("last_half_ptr"),
              py::arg("recv_x_ptr"),
              py::arg("recv_scales_ptr"), py::arg("src_info_ptr"), py::arg("src_topk_slot_ptr"),
              py::arg("layout_range_ptr"), py::arg("recv_count_ptr"), py::arg("cumulative_recv_stats_ptr"),
              py::arg("wait_recv_cost_stats_ptr"), py::arg("num_blocks"), py::arg("stream"),
              py::arg("error_record_ptr"), py::arg("timeout_s"), py::arg("trap_on_error") = false,
              py::arg("mask_on_timeout") = false, py::arg("emulated_node_size") = 0, dispatch_doc);
    }
    const auto combine_args = [](bool is_recv) {
        return [is_recv](int num_max_tokens, int hidden, int num_ranks, int num_experts, int rank, uintptr_t x,
                         uintptr_t src_info, uintptr_t src_topk_slot, uintptr_t layout_range, uintptr_t topk_idx,
                         uintptr_t topk_weights, int num_tokens, int num_topk, uintptr_t rank_mask, uintptr_t buffer,
                         int half_idx, uintptr_t workspace, uintptr_t last_half, uintptr_t out,
                         uintptr_t wait_recv_cost_stats, int num_blocks, uintptr_t stream, uintptr_t error_record,
                         double timeout_s, bool trap_on_error, bool mask_on_timeout, int emulated_node_size) {
            combine_launch(is_recv, num_max_tokens, hidden, num_ranks, num_experts, rank, x, src_info, src_topk_slot,
                           layout_range, topk_idx, topk_weights, num_tokens, num_topk, rank_mask, buffer, half_idx,
                           workspace, last_half, out, wait_recv_cost_stats, num_blocks, stream, error_record,
                           timeout_s, trap_on_error, mask_on_timeout, emulated_node_size);
        };
    };
    const char* combine_doc =
        "Low-latency combine launch on `stream` (device pointers as ints, 0 = none). See "
        "csrc/low_latency/low_latency.hpp.";
    for (const bool is_recv : {false, true}) {
        m.def(is_recv ? "low_latency_combine_recv" : "low_latency_combine_send", combine_args(is_recv),
              py::arg("num_max_dispatch_tokens_per_rank"), py::arg("hidden"), py::arg("num_ranks"),
              py::arg("num_experts"), py::arg("rank"), py::arg("x_ptr"), py::arg("src_info_ptr"),
              py::arg("src_topk_slot_ptr"), py::arg("layout_range_ptr"), py::arg("topk_idx_ptr"),
              py::arg("topk_weights_ptr"), py::arg("num_tokens"), py::arg("num_topk"), py::arg("rank_mask_ptr"),
              py::arg("buffer_ptr"), py::arg("half_idx"), py::arg("workspace_ptr"), py::arg("last_half_ptr"),
              py::arg("out_ptr"),
              py::arg("wait_recv_cost_stats_ptr"), py::arg("num_blocks"), py::arg("stream"),
              py::arg("error_record_ptr"), py::arg("timeout_s"), py::arg("trap_on_error") = false,
              py::arg("mask_on_timeout") = false, py::arg("emulated_node_size") = 0, combine_doc);
    }
    m.def(
        "low_latency_masked_barrier",
        [](uintptr_t sync_words, uint64_t epoch, uintptr_t rank_mask, int rank, int num_ranks, uintptr_t stream,
           uintptr_t error_record, double timeout_s, bool mask_on_timeout, int emulated_node_size) {
            const low_latency::Launch launch =
                make_launch(1, stream, error_record, timeout_s, false, mask_on_timeout, emulated_node_size);
            low_latency::masked_barrier(as_ptr<uint64_t>(sync_words), epoch, as_ptr<int>(rank_mask), rank, num_ranks,
                                        launch);
        },
        py::arg("sync_words_ptr"), py::arg("epoch"), py::arg("rank_mask_ptr"), py::arg("rank"), py::arg("num_ranks"),
        py::arg("stream"), py::arg("error_record_ptr"), py::arg("timeout_s"), py::arg("mask_on_timeout"),
        py::arg("emulated_node_size") = 0,
        "clean_low_latency_buffer's barrier on `stream`: waits for every unmasked rank; one that does not arrive "
        "within timeout_s is masked (mask_on_timeout) or recorded as a timeout. sync_words: symmetric uint64 "
        "[num_ranks], never zeroed; epoch: one more than the last barrier's. See csrc/low_latency/low_latency.hpp.");
}

}  // namespace ep
