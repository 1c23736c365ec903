// Python bindings of the intranode normal kernels (csrc/intranode). Device pointers and streams are ints; the caller
// (deep_ep_py/backends/intranode.py) owns every tensor and the IPC buffers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../common/exception.hpp"
#include "../intranode/buffer_layout.hpp"
#include "../intranode/intranode.hpp"
#include "bindings.hpp"

namespace py = pybind11;

namespace ep {

namespace {

intranode::PeerBuffers make_peers(const std::vector<uintptr_t>& peer_ptrs, size_t num_bytes, int rank) {
    EP_HOST_ASSERT(!peer_ptrs.empty());
    EP_HOST_ASSERT_MSG(peer_ptrs.size() <= static_cast<size_t>(intranode::kMaxRanks), "at most ",
                       intranode::kMaxRanks, " ranks");
    intranode::PeerBuffers peers{};
    for (size_t r = 0; r < peer_ptrs.size(); ++r) peers.base[r] = as_ptr<void>(peer_ptrs[r]);
    peers.num_bytes = num_bytes;
    peers.rank = rank;
    peers.num_ranks = static_cast<int>(peer_ptrs.size());
    return peers;
}

// Where the recv_* tensors sit in this rank's receive arena [arena, arena + arena_bytes): byte offsets, -1 for the
// absent ones (pointer 0).
intranode::RecvBlock recv_block_in_arena(uintptr_t arena, size_t arena_bytes, int num_rows,
                                         const std::vector<uintptr_t>& outputs) {
    EP_HOST_ASSERT(outputs.size() == 5);
    intranode::RecvBlock block{};
    int64_t* offsets[5] = {&block.x, &block.scales, &block.src_idx, &block.topk_idx, &block.topk_weights};
    for (size_t i = 0; i < outputs.size(); ++i) {
        if (outputs[i] == 0) {
            *offsets[i] = -1;
            continue;
        }
        EP_HOST_ASSERT_MSG((outputs[i] >= arena && outputs[i] < arena + arena_bytes), "received tensor ", i,
                           " at ", outputs[i], " is outside the receive arena [", arena, ", +", arena_bytes, ")");
        *offsets[i] = static_cast<int64_t>(outputs[i] - arena);
    }
    block.num_rows = num_rows;
    return block;
}

// The one-copy fields of DispatchArgs / CombineArgs: with recv_arena_ptrs (every rank's arena), one_copy, and this
// rank's block: where `tensors` (x, scales, src_idx, topk_idx, topk_weights; 0 for absent) sit in its own arena
// when in_arena, else none (num_rows -1).
template <typename Args>
void set_one_copy(Args& args, int rank, const std::vector<uintptr_t>& recv_arena_ptrs, size_t recv_arena_bytes,
                  bool in_arena, int num_rows, const std::vector<uintptr_t>& tensors) {
    args.one_copy = !recv_arena_ptrs.empty();
    if (!args.one_copy) return;
    EP_HOST_ASSERT(recv_arena_ptrs.size() <= static_cast<size_t>(intranode::kMaxRanks));
    for (size_t r = 0; r < recv_arena_ptrs.size(); ++r) args.recv_arenas[r] = as_ptr<void>(recv_arena_ptrs[r]);
    args.recv_block = intranode::RecvBlock{};
    args.recv_block.num_rows = -1;
    if (in_arena) args.recv_block = recv_block_in_arena(recv_arena_ptrs[rank], recv_arena_bytes, num_rows, tensors);
}

py::dict layout_constants() {
    py::dict constants;
    constants["max_ranks"] = intranode::kMaxRanks;
    constants["max_local_experts"] = intranode::kMaxLocalExperts;
    constants["staging_offset"] = intranode::kStagingOffset;
    constants["one_copy_note_offset"] = offsetof(intranode::ControlArea, one_copy);
    constants["barrier_flags_offset"] = offsetof(intranode::ControlArea, barrier_flags);
    constants["local_epoch_offset"] = offsetof(intranode::ControlArea, local_epoch);
    constants["num_host_counters"] = intranode::kNumHostCounters;
    constants["counter_sequence"] = intranode::kCounterSequence;
    constants["counter_num_recv_tokens"] = intranode::kCounterNumRecvTokens;
    constants["counter_num_rounds"] = intranode::kCounterNumRounds;
    constants["counter_expert_base"] = intranode::kCounterExpertBase;
    return constants;
}

}  // namespace

void register_intranode(py::module_& m) {
    m.def("intranode_layout", &layout_constants,
          "Sizes of the intranode buffer layout and the host-counter indices (csrc/intranode/buffer_layout.hpp).");
    m.def("intranode_reserved_slot_bytes", &intranode::reserved_slot_bytes, py::arg("hidden"), py::arg("num_topk"),
          "Staging slot bytes a dispatch handle reserves per row (covers bf16/fp8 dispatch and its combine).");
    m.def(
        "intranode_combine_slot_bytes",
        [](int hidden, int num_topk) { return intranode::CombineRowFormat::make(hidden, num_topk).stride; },
        py::arg("hidden"), py::arg("num_topk"), "Staging slot bytes of one combine row.");
    m.def("intranode_rows_per_round", &intranode::rows_per_round, py::arg("num_bytes"), py::arg("num_ranks"),
          py::arg("slot_bytes"), "Rows per source rank per round that fit the staging area (0: none).");

    m.def(
        "intranode_notify",
        [](const std::vector<uintptr_t>& peer_ptrs, size_t num_bytes, int rank, uintptr_t is_token_in_rank,
           int num_tokens, uintptr_t num_tokens_per_expert, int num_local_experts, int expert_alignment,
           int rows_per_round, int max_rounds, uintptr_t send_pos, uintptr_t send_list, uintptr_t send_counts,
           uintptr_t rank_prefix_matrix, uintptr_t num_rounds_device, uintptr_t host_counters, int host_sequence,
           int num_worst_tokens, uintptr_t error_record,
           double timeout_s, bool trap_on_error, uintptr_t stream) {
            const intranode::NotifyArgs args{as_ptr<const bool>(is_token_in_rank),
                                             num_tokens,
                                             as_ptr<const int>(num_tokens_per_expert),
                                             num_local_experts,
                                             expert_alignment,
                                             rows_per_round,
                                             max_rounds,
                                             as_ptr<int>(send_pos),
                                             as_ptr<int>(send_list),
                                             as_ptr<int>(send_counts),
                                             as_ptr<int>(rank_prefix_matrix),
                                             as_ptr<int>(num_rounds_device),
                                             as_ptr<int>(host_counters),
                                             host_sequence,
                                             num_worst_tokens};
            intranode::notify_dispatch(make_peers(peer_ptrs, num_bytes, rank), args,
                                       make_wait(error_record, timeout_s, trap_on_error),
                                       reinterpret_cast<cudaStream_t>(stream));
        },
        py::kw_only(), py::arg("peer_ptrs"), py::arg("num_bytes"), py::arg("rank"), py::arg("is_token_in_rank"),
        py::arg("num_tokens"), py::arg("num_tokens_per_expert"), py::arg("num_local_experts"),
        py::arg("expert_alignment"), py::arg("rows_per_round"), py::arg("max_rounds"), py::arg("send_pos"),
        py::arg("send_list"), py::arg("send_counts"), py::arg("rank_prefix_matrix"), py::arg("num_rounds_device"),
        py::arg("host_counters"), py::arg("host_sequence"),
        py::arg("num_worst_tokens"), py::arg("error_record"), py::arg("timeout_s"), py::arg("trap_on_error") = false,
        py::arg("stream"),
        "Dispatch notify on `stream`: send positions, counts to every rank, barrier, rank_prefix_matrix, the rounds "
        "the counts need (num_rounds_device, at most max_rounds); with host_sequence > 0 also the host counters (N, "
        "rounds, aligned per-expert counts, then the sequence).");

    m.def(
        "intranode_dispatch",
        [](const std::vector<uintptr_t>& peer_ptrs, size_t num_bytes, int rank, int num_rounds,
           uintptr_t num_rounds_device, int rows_per_round, uintptr_t x, int payload_bytes, uintptr_t x_scales,
           int num_scales, int64_t scale_stride_token, int64_t scale_stride_group, uintptr_t topk_idx,
           uintptr_t topk_weights, int num_topk, int num_tokens,
           uintptr_t send_list, uintptr_t send_counts, uintptr_t rank_prefix_matrix, uintptr_t recv_x,
           uintptr_t recv_scales, uintptr_t recv_src_idx, uintptr_t recv_topk_idx, uintptr_t recv_topk_weights,
           int num_recv_rows, bool pad_rows, int num_local_experts, int num_sms, uintptr_t error_record,
           double timeout_s, bool trap_on_error, uintptr_t stream, const std::vector<uintptr_t>& recv_arena_ptrs,
           size_t recv_arena_bytes, bool recv_in_arena) {
            intranode::DispatchArgs args{num_rounds,
                                               as_ptr<const int>(num_rounds_device),
                                               rows_per_round,
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
                                               as_ptr<const int>(send_list),
                                               as_ptr<const int>(send_counts),
                                               as_ptr<const int>(rank_prefix_matrix),
                                               as_ptr<void>(recv_x),
                                               as_ptr<float>(recv_scales),
                                               as_ptr<int>(recv_src_idx),
                                               as_ptr<int64_t>(recv_topk_idx),
                                               as_ptr<float>(recv_topk_weights),
                                               num_recv_rows,
                                               pad_rows,
                                               num_local_experts,
                                               num_sms};
            EP_HOST_ASSERT((recv_arena_ptrs.empty() || recv_arena_ptrs.size() == peer_ptrs.size()));
            set_one_copy(args, rank, recv_arena_ptrs, recv_arena_bytes, recv_in_arena, num_recv_rows,
                         {recv_x, recv_scales, recv_src_idx, recv_topk_idx, recv_topk_weights});
            intranode::dispatch(make_peers(peer_ptrs, num_bytes, rank), args,
                                make_wait(error_record, timeout_s, trap_on_error),
                                reinterpret_cast<cudaStream_t>(stream));
        },
        py::kw_only(), py::arg("peer_ptrs"), py::arg("num_bytes"), py::arg("rank"), py::arg("num_rounds"),
        py::arg("num_rounds_device"), py::arg("rows_per_round"), py::arg("x"), py::arg("payload_bytes"),
        py::arg("x_scales"), py::arg("num_scales"),
        py::arg("scale_stride_token"), py::arg("scale_stride_group"), py::arg("topk_idx"), py::arg("topk_weights"),
        py::arg("num_topk"), py::arg("num_tokens"), py::arg("send_list"), py::arg("send_counts"),
        py::arg("rank_prefix_matrix"), py::arg("recv_x"), py::arg("recv_scales"), py::arg("recv_src_idx"),
        py::arg("recv_topk_idx"), py::arg("recv_topk_weights"), py::arg("num_recv_rows"), py::arg("pad_rows"),
        py::arg("num_local_experts"), py::arg("num_sms"), py::arg("error_record"), py::arg("timeout_s"),
        py::arg("trap_on_error") = false,
        py::arg("stream"), py::arg("recv_arena_ptrs") = std::vector<uintptr_t>{}, py::arg("recv_arena_bytes") = 0,
        py::arg("recv_in_arena") = false,
        "The rounds of a dispatch on `stream` (0 for absent tensors). With recv_arena_ptrs (every rank's receive "
        "arena), a one-copy dispatch: recv_in_arena says the recv_* tensors lie in this rank's arena; the rows go "
        "straight there when every rank's do, else through the rounds.");

    m.def(
        "intranode_combine",
        [](const std::vector<uintptr_t>& peer_ptrs, size_t num_bytes, int rank, int num_rounds,
           uintptr_t num_rounds_device, int rows_per_round, int hidden, uintptr_t x, int num_x_rows,
           uintptr_t topk_weights, int num_topk,
           uintptr_t rank_prefix_matrix, uintptr_t send_pos, int num_tokens, uintptr_t bias0, uintptr_t bias1,
           uintptr_t acc_x, uintptr_t acc_weights, uintptr_t combined_x, uintptr_t combined_weights, int num_sms,
           uintptr_t error_record, double timeout_s, bool trap_on_error, uintptr_t stream,
           const std::vector<uintptr_t>& recv_arena_ptrs,
           size_t recv_arena_bytes, bool recv_in_arena) {
            intranode::CombineArgs args{num_rounds,
                                              as_ptr<const int>(num_rounds_device),
                                              rows_per_round,
                                              hidden,
                                              as_ptr<const void>(x),
                                              num_x_rows,
                                              as_ptr<const float>(topk_weights),
                                              num_topk,
                                              as_ptr<const int>(rank_prefix_matrix),
                                              as_ptr<const int>(send_pos),
                                              num_tokens,
                                              as_ptr<const void>(bias0),
                                              as_ptr<const void>(bias1),
                                              as_ptr<float>(acc_x),
                                              as_ptr<float>(acc_weights),
                                              as_ptr<void>(combined_x),
                                              as_ptr<float>(combined_weights),
                                              num_sms};
            EP_HOST_ASSERT((recv_arena_ptrs.empty() || recv_arena_ptrs.size() == peer_ptrs.size()));
            set_one_copy(args, rank, recv_arena_ptrs, recv_arena_bytes, recv_in_arena, num_x_rows,
                         {x, 0, 0, 0, topk_weights});
            intranode::combine(make_peers(peer_ptrs, num_bytes, rank), args,
                               make_wait(error_record, timeout_s, trap_on_error),
                               reinterpret_cast<cudaStream_t>(stream));
        },
        py::kw_only(), py::arg("peer_ptrs"), py::arg("num_bytes"), py::arg("rank"), py::arg("num_rounds"),
        py::arg("num_rounds_device"), py::arg("rows_per_round"), py::arg("hidden"), py::arg("x"), py::arg("num_x_rows"),
        py::arg("topk_weights"),
        py::arg("num_topk"), py::arg("rank_prefix_matrix"), py::arg("send_pos"), py::arg("num_tokens"),
        py::arg("bias0"), py::arg("bias1"), py::arg("acc_x"), py::arg("acc_weights"), py::arg("combined_x"),
        py::arg("combined_weights"), py::arg("num_sms"), py::arg("error_record"), py::arg("timeout_s"),
        py::arg("trap_on_error") = false,
        py::arg("stream"), py::arg("recv_arena_ptrs") = std::vector<uintptr_t>{}, py::arg("recv_arena_bytes") = 0,
        py::arg("recv_in_arena") = false,
        "The rounds of a combine on `stream` (0 for absent tensors). With recv_arena_ptrs (every rank's receive "
        "arena), a one-copy combine: recv_in_arena says x and topk_weights lie in this rank's arena; every source "
        "then reads its rows straight from their ranks when every rank's do, else the rounds move them.");

    m.def(
        "intranode_barrier",
        [](const std::vector<uintptr_t>& peer_ptrs, size_t num_bytes, int rank, uintptr_t error_record,
           double timeout_s, bool trap_on_error, uintptr_t stream) {
            intranode::barrier(make_peers(peer_ptrs, num_bytes, rank),
                               make_wait(error_record, timeout_s, trap_on_error),
                               reinterpret_cast<cudaStream_t>(stream));
        },
        py::kw_only(), py::arg("peer_ptrs"), py::arg("num_bytes"), py::arg("rank"), py::arg("error_record"),
        py::arg("timeout_s"), py::arg("trap_on_error") = false, py::arg("stream"),
        "One cross-rank barrier kernel on `stream`.");
}

}  // namespace ep
