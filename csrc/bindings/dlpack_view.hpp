// Device memory we own, handed to torch as a tensor with a deleter of ours: a DLPack capsule (the "dltensor"
// protocol every torch since 1.10 reads with torch.from_dlpack). The receive arena of the one-copy intranode
// dispatch (deep_ep_py/recv_arena.py) returns its blocks this way, so a block goes back to the arena exactly when
// the last tensor viewing it dies, whatever torch version runs, without linking torch.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace ep {

// A capsule viewing [ptr, ptr + num_bytes) as a 1-D uint8 tensor on (device_type, device_id), DLPack's codes:
// 1 = CPU, 2 = CUDA. `on_release()` is called once, with the GIL held, when the consumer (or an unconsumed
// capsule) lets go; exceptions it raises are printed, not propagated (it may run inside torch's deleter).
pybind11::capsule make_dlpack_view(uintptr_t ptr, int64_t num_bytes, int device_type, int device_id,
                                   pybind11::object on_release);

}  // namespace ep
