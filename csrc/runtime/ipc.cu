#include <cuda_runtime.h>

#include <cstring>

#include "../common/exception.hpp"
#include "ipc.hpp"

namespace ep {

uintptr_t ipc_malloc(size_t num_bytes) {
    EP_HOST_ASSERT(num_bytes > 0);
    void* ptr = nullptr;
    CUDA_CHECK(cudaMalloc(&ptr, num_bytes));
    // cudaMemset is asynchronous to the host, on the legacy stream that torch's communication streams do not wait
    // for: done before the pointer is returned, so that neither a peer (once the handle is exchanged) nor this
    // rank's first kernel can write a flag the zeroing then wipes. The legacy stream only, not the device: another
    // thread's stream capture must not see a device-wide sync.
    cudaError_t status = cudaMemset(ptr, 0, num_bytes);
    if (status == cudaSuccess) status = cudaStreamSynchronize(nullptr);
    if (status != cudaSuccess) {
        cudaFree(ptr);
        CUDA_CHECK(status);
    }
    return reinterpret_cast<uintptr_t>(ptr);
}

void ipc_free(uintptr_t ptr) {
    EP_HOST_ASSERT(ptr != 0);
    CUDA_CHECK(cudaFree(reinterpret_cast<void*>(ptr)));
}

std::string ipc_get_mem_handle(uintptr_t ptr) {
    EP_HOST_ASSERT(ptr != 0);
    cudaIpcMemHandle_t handle;
    CUDA_CHECK(cudaIpcGetMemHandle(&handle, reinterpret_cast<void*>(ptr)));
    return std::string(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

uintptr_t ipc_open_mem_handle(const std::string& handle_bytes) {
    EP_HOST_ASSERT_MSG(handle_bytes.size() == sizeof(cudaIpcMemHandle_t), "an IPC handle has ",
                       sizeof(cudaIpcMemHandle_t), " bytes");
    cudaIpcMemHandle_t handle;
    std::memcpy(&handle, handle_bytes.data(), sizeof(handle));
    void* ptr = nullptr;
    CUDA_CHECK(cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess));
    return reinterpret_cast<uintptr_t>(ptr);
}

void ipc_close_mem_handle(uintptr_t ptr) {
    EP_HOST_ASSERT(ptr != 0);
    CUDA_CHECK(cudaIpcCloseMemHandle(reinterpret_cast<void*>(ptr)));
}

}  // namespace ep
