// The CUDA runtime calls of csrc/, on host memory, for the CPU emulator: definitions of the toolkit's declarations
// (include/cuda_runtime.h), so that deep_ep_py._C_emu links no libcudart.
//
// Device memory must be mappable by the other rank processes, as CUDA IPC maps a GPU allocation into a peer: every
// cudaMalloc is a memfd mapped MAP_SHARED, and its IPC handle names the owner's pid and fd, which a peer opens through
// /proc/<pid>/fd/<fd> (same user, no file left behind in /dev/shm when a rank dies).
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <string>

#include <cuda_runtime_api.h>

#include "emu_device.hpp"

namespace {

constexpr char kHandleMagic[8] = {'D', 'E', 'E', 'P', 'E', 'M', 'U', '1'};

struct HandleFields {
    char magic[8];
    int64_t pid;
    int64_t fd;
    int64_t size;
};
static_assert(sizeof(HandleFields) <= sizeof(cudaIpcMemHandle_t));

struct Allocation {
    int fd;  // -1 for a peer's memory opened here
    size_t size;
};

std::mutex allocations_mutex;
std::map<void*, Allocation> allocations;
thread_local cudaError_t last_error = cudaSuccess;

cudaError_t fail(cudaError_t error) {
    last_error = error;
    return error;
}

// Emulated SMs: what a device query answers, so that a default of "all SMs" stays a handful of block threads.
int num_emulated_sms() {
    const char* text = std::getenv("DEEP_EP_PY_EMULATE_NUM_SMS");
    const int value = text != nullptr ? std::atoi(text) : 0;
    return value > 0 ? value : 8;
}

cudaError_t unmap(void* ptr, bool owned) {
    if (ptr == nullptr) return cudaSuccess;
    std::lock_guard<std::mutex> lock(allocations_mutex);
    const auto it = allocations.find(ptr);
    if (it == allocations.end() || (it->second.fd >= 0) != owned) return fail(cudaErrorInvalidDevicePointer);
    munmap(ptr, it->second.size);
    if (it->second.fd >= 0) close(it->second.fd);
    allocations.erase(it);
    return cudaSuccess;
}


}  // namespace

extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
    *count = 1;
    return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
    if (device != 0) return fail(cudaErrorInvalidDevice);
    std::memset(prop, 0, sizeof(*prop));
    std::snprintf(prop->name, sizeof(prop->name), "deep_ep_py CPU emulator");
    prop->totalGlobalMem = static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<size_t>(sysconf(_SC_PAGE_SIZE));
    prop->major = 9;
    prop->minor = 0;
    prop->multiProcessorCount = num_emulated_sms();
    return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
    if (device != 0) return fail(cudaErrorInvalidDevice);
    if (attr != cudaDevAttrMultiProcessorCount) return fail(cudaErrorInvalidValue);
    *value = num_emulated_sms();
    return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int* version) {
    *version = CUDART_VERSION;
    return cudaSuccess;
}

cudaError_t cudaRuntimeGetVersion(int* version) {
    *version = CUDART_VERSION;
    return cudaSuccess;
}

cudaError_t cudaGetLastError() {
    const cudaError_t error = last_error;
    last_error = cudaSuccess;
    return error;
}

const char* cudaGetErrorName(cudaError_t error) {
    switch (error) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
        case cudaErrorNoDevice: return "cudaErrorNoDevice";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        case cudaErrorMapBufferObjectFailed: return "cudaErrorMapBufferObjectFailed";
        case cudaErrorIllegalInstruction: return "cudaErrorIllegalInstruction";
        case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
        default: return "cudaErrorUnknown";
    }
}

const char* cudaGetErrorString(cudaError_t error) {
    switch (error) {
        case cudaSuccess: return "no error";
        case cudaErrorMemoryAllocation: return "out of memory (emulator: memfd_create, ftruncate or mmap failed)";
        case cudaErrorInvalidDevicePointer: return "not a pointer from cudaMalloc (emulator)";
        case cudaErrorMapBufferObjectFailed: return "cannot map the peer's memory (emulator: /proc/<pid>/fd)";
        default: return cudaGetErrorName(error);
    }
}

// Launches run to completion before they return.
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
// No CUDA graphs: no stream is ever capturing.
cudaError_t cudaStreamGetCaptureInfo(cudaStream_t, cudaStreamCaptureStatus* status, unsigned long long* id,
                                     cudaGraph_t*, const cudaGraphNode_t**, const cudaGraphEdgeData**, size_t*) {
    if (status != nullptr) *status = cudaStreamCaptureStatusNone;
    if (id != nullptr) *id = 0;
    return cudaSuccess;
}

cudaError_t cudaMalloc(void** ptr, size_t size) {
    *ptr = nullptr;
    if (size == 0) return cudaSuccess;
    const int fd = memfd_create("deep_ep_py_emu", 0);
    if (fd < 0) return fail(cudaErrorMemoryAllocation);
    if (ftruncate(fd, static_cast<off_t>(size)) != 0) {
        close(fd);
        return fail(cudaErrorMemoryAllocation);
    }
    void* memory = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (memory == MAP_FAILED) {
        close(fd);
        return fail(cudaErrorMemoryAllocation);
    }
    std::memset(memory, ep_emu::kUninitializedByte, size);
    std::lock_guard<std::mutex> lock(allocations_mutex);
    allocations[memory] = Allocation{fd, size};
    *ptr = memory;
    return cudaSuccess;
}

cudaError_t cudaFree(void* ptr) { return unmap(ptr, true); }

cudaError_t cudaMemset(void* ptr, int value, size_t count) {
    std::memset(ptr, value, count);
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) { return cudaMemset(ptr, value, count); }

cudaError_t cudaHostAlloc(void** ptr, size_t size, unsigned int) {
    *ptr = std::malloc(size == 0 ? 1 : size);
    if (*ptr == nullptr) return fail(cudaErrorMemoryAllocation);
    std::memset(*ptr, ep_emu::kUninitializedByte, size);
    return cudaSuccess;
}

cudaError_t cudaFreeHost(void* ptr) {
    std::free(ptr);
    return cudaSuccess;
}

cudaError_t cudaHostGetDevicePointer(void** device_ptr, void* host_ptr, unsigned int) {
    *device_ptr = host_ptr;
    return cudaSuccess;
}

cudaError_t cudaIpcGetMemHandle(cudaIpcMemHandle_t* handle, void* ptr) {
    std::lock_guard<std::mutex> lock(allocations_mutex);
    const auto it = allocations.find(ptr);
    if (it == allocations.end() || it->second.fd < 0) return fail(cudaErrorInvalidDevicePointer);
    HandleFields fields{};
    std::memcpy(fields.magic, kHandleMagic, sizeof(kHandleMagic));
    fields.pid = getpid();
    fields.fd = it->second.fd;
    fields.size = static_cast<int64_t>(it->second.size);
    std::memset(handle, 0, sizeof(*handle));
    std::memcpy(handle, &fields, sizeof(fields));
    return cudaSuccess;
}

cudaError_t cudaIpcOpenMemHandle(void** ptr, cudaIpcMemHandle_t handle, unsigned int) {
    *ptr = nullptr;
    HandleFields fields;
    std::memcpy(&fields, &handle, sizeof(fields));
    if (std::memcmp(fields.magic, kHandleMagic, sizeof(kHandleMagic)) != 0 || fields.size <= 0)
        return fail(cudaErrorInvalidValue);
    const std::string path = "/proc/" + std::to_string(fields.pid) + "/fd/" + std::to_string(fields.fd);
    const int fd = open(path.c_str(), O_RDWR);
    if (fd < 0) return fail(cudaErrorMapBufferObjectFailed);
    void* memory = mmap(nullptr, static_cast<size_t>(fields.size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (memory == MAP_FAILED) return fail(cudaErrorMapBufferObjectFailed);
    std::lock_guard<std::mutex> lock(allocations_mutex);
    allocations[memory] = Allocation{-1, static_cast<size_t>(fields.size)};
    *ptr = memory;
    return cudaSuccess;
}

cudaError_t cudaIpcCloseMemHandle(void* ptr) { return unmap(ptr, false); }

// Fibers' shared memory has no per-kernel limit to raise.
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }

}  // extern "C"
