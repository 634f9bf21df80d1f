// A host-C++ stand-in for the few CUDA features rwkvkit's WKV-6/7 kernels use,
// so that the kernel sources compile with g++ and run on a CPU (tests only).
//
// Each launch runs the grid's blocks one after another; each block runs its
// threads as real host threads (std::thread), so __syncthreads() is a real
// barrier and __shared__ (a function-local static) is shared by the threads of
// the block being run.  Numerics are those of the host: float arithmetic and
// fmaf/expf from <cmath>, bfloat16 rounding to nearest even like
// __float2bfloat16.  Nothing here is used by the real (nvcc) build.
#pragma once

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float4 {
    float x, y, z, w;
};

static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

typedef int cudaError_t;
typedef void* cudaStream_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
static inline cudaError_t cudaGetLastError() { return cudaSuccess; }
static inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid argument (emulation)"; }

struct __nv_bfloat16 {
    uint16_t x;
};
static inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = (uint32_t)h.x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
static inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    __nv_bfloat16 h;
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
        h.x = (uint16_t)((u >> 16) | 0x40u);
        return h;
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    h.x = (uint16_t)(u >> 16);
    return h;
}

namespace emu {

class Barrier {
  public:
    explicit Barrier(unsigned n) : n_(n) {}
    void wait() {
        std::unique_lock<std::mutex> lk(m_);
        const unsigned gen = gen_;
        if (++count_ == n_) {
            count_ = 0;
            ++gen_;
            cv_.notify_all();
        } else {
            cv_.wait(lk, [&] { return gen != gen_; });
        }
    }

  private:
    std::mutex m_;
    std::condition_variable cv_;
    unsigned n_, count_ = 0, gen_ = 0;
};

inline Barrier*& current_barrier() {
    static Barrier* b = nullptr;
    return b;
}

// Run body() once per CUDA thread of a (grid, block) launch; blocks in sequence.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
    gridDim = grid;
    blockDim = block;
    const unsigned nthreads = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                Barrier barrier(nthreads);
                current_barrier() = &barrier;
                std::vector<std::thread> threads;
                threads.reserve(nthreads);
                for (unsigned t = 0; t < nthreads; ++t) {
                    threads.emplace_back([&, t, bx, by, bz] {
                        blockIdx = dim3(bx, by, bz);
                        threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
                        body();
                    });
                }
                for (auto& th : threads) th.join();
                current_barrier() = nullptr;
            }
}

}  // namespace emu

static inline void __syncthreads() { emu::current_barrier()->wait(); }

#define RWKVKIT_LAUNCH(kernel, grid, block, stream, ...) ::emu::launch((grid), (block), [&]() { kernel(__VA_ARGS__); })
