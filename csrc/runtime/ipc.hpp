// Device buffers shared between processes on one node with CUDA IPC. A process cannot open its own handle.
#pragma once

#include <cstdint>
#include <string>

namespace ep {

// cudaMalloc'd and zeroed; the pointer is suitable for cudaIpcGetMemHandle.
uintptr_t ipc_malloc(size_t num_bytes);
void ipc_free(uintptr_t ptr);
// The cudaIpcMemHandle_t of the allocation containing ptr, as raw bytes (64) to send to peers.
std::string ipc_get_mem_handle(uintptr_t ptr);
// Maps a peer's allocation into this process (cudaIpcMemLazyEnablePeerAccess); returns the local pointer.
uintptr_t ipc_open_mem_handle(const std::string& handle_bytes);
void ipc_close_mem_handle(uintptr_t ptr);

}  // namespace ep
