#include <cuda_runtime_api.h>

#include "../common/exception.hpp"
#include "device.hpp"

namespace ep {

namespace {

std::string describe_error(const char* call, cudaError_t status) {
    return detail::concat(call, " returned ", cudaGetErrorName(status), " (", static_cast<int>(status),
                          "): ", cudaGetErrorString(status));
}

}  // namespace

unsigned long long stream_capture_id(uintptr_t stream) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    unsigned long long id = 0;
    CUDA_CHECK(cudaStreamGetCaptureInfo(reinterpret_cast<cudaStream_t>(stream), &status, &id));
    return status == cudaStreamCaptureStatusActive ? id : 0;
}

int device_count() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky-free error so later calls do not report it
        return 0;
    }
    return count;
}

std::string gpu_status() {
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess) {
        cudaGetLastError();
        return "no GPU: " + describe_error("cudaGetDeviceCount", status);
    }
    if (count == 0) return "no GPU: cudaGetDeviceCount found 0 devices";
    int driver_version = 0, runtime_version = 0;
    cudaDriverGetVersion(&driver_version);
    cudaRuntimeGetVersion(&runtime_version);
    std::string text = detail::concat(count, " GPU(s), driver API ", driver_version / 1000, ".",
                                      (driver_version % 1000) / 10, ", runtime ", runtime_version / 1000, ".",
                                      (runtime_version % 1000) / 10);
    for (int device = 0; device < count; ++device) {
        cudaDeviceProp prop;
        const cudaError_t prop_status = cudaGetDeviceProperties(&prop, device);
        if (prop_status != cudaSuccess) {
            cudaGetLastError();
            text += detail::concat("; device ", device, ": ", describe_error("cudaGetDeviceProperties", prop_status));
            continue;
        }
        text += detail::concat("; device ", device, ": ", prop.name, " (sm_", prop.major, prop.minor, ", ",
                               prop.multiProcessorCount, " SMs, ", prop.totalGlobalMem >> 20, " MiB)");
    }
    return text;
}

}  // namespace ep
