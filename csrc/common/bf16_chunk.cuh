// 16-byte chunks of bf16 values summed in float32: what the combine kernels (intranode, internode) add up.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace ep {

constexpr int kBf16PerChunk = 8;  // bf16 values in one 16-byte chunk

__device__ __forceinline__ void add_bf16_chunk(float (&acc)[kBf16PerChunk], const int4& chunk) {
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&chunk);
#pragma unroll
    for (int i = 0; i < kBf16PerChunk / 2; ++i) {
        const float2 values = __bfloat1622float2(pairs[i]);
        acc[2 * i] += values.x;
        acc[2 * i + 1] += values.y;
    }
}

// Rounds to nearest even, as torch's float32 -> bf16 conversion does.
__device__ __forceinline__ int4 to_bf16_chunk(const float (&acc)[kBf16PerChunk]) {
    int4 chunk;
    __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&chunk);
#pragma unroll
    for (int i = 0; i < kBf16PerChunk / 2; ++i) pairs[i] = __floats2bfloat162_rn(acc[2 * i], acc[2 * i + 1]);
    return chunk;
}

// The float32 accumulator of one chunk (acc_x rows are 16-byte aligned: hidden is a multiple of 8).
__device__ __forceinline__ void load_float_chunk(float (&acc)[kBf16PerChunk], const float* src) {
    const float4 low = reinterpret_cast<const float4*>(src)[0];
    const float4 high = reinterpret_cast<const float4*>(src)[1];
    const float values[kBf16PerChunk] = {low.x, low.y, low.z, low.w, high.x, high.y, high.z, high.w};
#pragma unroll
    for (int i = 0; i < kBf16PerChunk; ++i) acc[i] = values[i];
}

__device__ __forceinline__ void store_float_chunk(float* dst, const float (&acc)[kBf16PerChunk]) {
    reinterpret_cast<float4*>(dst)[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
}

}  // namespace ep
