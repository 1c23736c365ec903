// Typed kernel launches.
#pragma once

#include <cuda_runtime.h>

#include <tuple>
#include <type_traits>
#include <utility>

#include "exception.hpp"

// Dynamic shared memory (LaunchConfig::smem_bytes) as a `type*` named `name`; the emulator defines its own.
#ifndef DEEP_EP_PY_EMULATE
#define EP_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

namespace ep {

struct LaunchConfig {
    dim3 grid;
    dim3 block;
    size_t smem_bytes = 0;
    cudaStream_t stream = nullptr;
    // All blocks must be resident at once (grid-wide sync, or blocks that spin-wait on each other).
    bool cooperative = false;
};

// Launches `kernel` with arguments checked against its signature by the compiler (the C++ overload of
// cudaLaunchKernelEx), not a `void* args[]` matched by position.
template <typename... KernelParams, typename... Args>
void launch_kernel(const LaunchConfig& config, void (*kernel)(KernelParams...), Args&&... args) {
    static_assert(sizeof...(KernelParams) == sizeof...(Args), "launch_kernel: argument count differs from kernel");
#ifdef DEEP_EP_PY_EMULATE
    // Every emulated thread gets its own copy of the parameters, as every GPU thread reads them from constant bank.
    const std::tuple<std::decay_t<KernelParams>...> params(static_cast<KernelParams>(std::forward<Args>(args))...);
    ep_emu::launch(config.grid, config.block, config.smem_bytes, [&] { std::apply(kernel, params); });
#else
    if (config.smem_bytes > 48 * 1024) {
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(config.smem_bytes)));
    }
    cudaLaunchAttribute attributes[1];
    cudaLaunchConfig_t launch_config = {};
    launch_config.gridDim = config.grid;
    launch_config.blockDim = config.block;
    launch_config.dynamicSmemBytes = config.smem_bytes;
    launch_config.stream = config.stream;
    launch_config.attrs = attributes;
    launch_config.numAttrs = 0;
    if (config.cooperative) {
        attributes[0].id = cudaLaunchAttributeCooperative;
        attributes[0].val.cooperative = 1;
        launch_config.numAttrs = 1;
    }
    CUDA_CHECK(cudaLaunchKernelEx(&launch_config, kernel, static_cast<KernelParams>(std::forward<Args>(args))...));
#endif
}

}  // namespace ep
