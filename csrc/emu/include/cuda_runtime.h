// The CPU emulator's stand-in for <cuda_runtime.h>, found first on the include path of deep_ep_py._C_emu only: the
// toolkit's runtime API declarations, defined on host memory by ../runtime_emu.cpp (only what csrc/ calls), and the
// device language of ../emu_device.hpp. No libcudart is linked.
#pragma once

#include <cuda_runtime_api.h>

#include "../emu_device.hpp"

// The typed overload <cuda_runtime.h> gives kernels.
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
    return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
