// What GPU this process sees (never throws: on a machine without a driver these report "no GPU"), and whether a
// stream is being captured into a CUDA graph.
#pragma once

#include <cstdint>
#include <string>

namespace ep {

int device_count();
std::string gpu_status();
// The id of the CUDA-graph capture `stream` takes part in, 0 where it is not capturing (cudaStreamGetCaptureInfo).
unsigned long long stream_capture_id(uintptr_t stream);

}  // namespace ep
