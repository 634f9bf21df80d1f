// Shared pieces of the WKV-6 and WKV-7 CUDA kernels (wkv6_cuda.cu, wkv7_cuda.cu).
//
// Design (both operators): one thread block per (batch row, head), N threads.
// In every pass each thread owns ONE row or ONE column of an N x N matrix (the
// state S or its adjoint dS) in registers, and that row/column evolves on its
// own given the token's vectors: no reductions across threads in any inner
// loop.  The token vectors are staged through shared memory a tile of L tokens
// at a time (one coalesced load per vector and token, two __syncthreads per
// tile) and read back as broadcast float4 loads.  See ops/wkv7/NOTES.md
// ("CUDA kernels") for the passes and the maths of the backward.
//
// Compiles with nvcc, or with a host C++ compiler against cuda_emu.h when
// RWKVKIT_CUDA_EMULATION is defined (tests run the kernels on a CPU that way).
#pragma once

#ifdef RWKVKIT_CUDA_EMULATION
#include "cuda_emu.h"
#else
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#define RWKVKIT_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

#include <stddef.h>
#include <stdint.h>

namespace rwkvkit {

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void st(float* p, float x) { *p = x; }
__device__ __forceinline__ void st(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }

// Tokens per shared-memory tile: the largest pass stages 11 [L][N] float
// arrays, which must fit the 48 KiB of static shared memory.
template <int N>
struct Tile {
    static constexpr int L = N <= 64 ? 16 : 8;
};

// x . v for a register row x[N] and a shared-memory vector v (16-byte aligned),
// with four partial sums to shorten the dependency chain.
template <int N>
__device__ __forceinline__ float dot(const float (&x)[N], const float* v) {
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma unroll
    for (int j = 0; j < N; j += 4) {
        const float4 q = *reinterpret_cast<const float4*>(v + j);
        a0 = fmaf(x[j], q.x, a0);
        a1 = fmaf(x[j + 1], q.y, a1);
        a2 = fmaf(x[j + 2], q.z, a2);
        a3 = fmaf(x[j + 3], q.w, a3);
    }
    return (a0 + a1) + (a2 + a3);
}

// Kahan summation: the running sums of the dlogw identity run over all T tokens.
struct Kahan {
    float sum = 0.f, comp = 0.f;
    __device__ __forceinline__ void add(float x) {
        const float y = x - comp;
        const float t = sum + y;
        comp = (t - sum) - y;
        sum = t;
    }
    __device__ __forceinline__ float value() const { return sum - comp; }
};

// Offset of element n of token t, head h, batch row b in a [B, T, H, N] tensor.
__device__ __forceinline__ size_t tok(int b, int t, int T, int h, int H, int N, int n) {
    return (((size_t)b * T + t) * H + h) * N + n;
}

}  // namespace rwkvkit

// Instantiate a launcher for each supported head size.
#define RWKVKIT_HEAD_SIZES(X) X(16) X(32) X(64) X(128)
