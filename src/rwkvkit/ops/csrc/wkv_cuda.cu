// The RWKV-4 WKV operator on NVIDIA GPUs: forward and backward, with a carried
// state in and out, for any sequence length.
//
// One thread per (batch row b, channel c) runs the numerically stable
// recurrence of the paper (arXiv 2305.13048, appendix B; spec section 2.4)
// sequentially over time, as the official kernel does (spec 5.2).  What is new
// here, against the complaints about the official kernel:
//
// - No compile-time T limit.  The backward needs the state before every token;
//   instead of per-thread arrays of Tmax entries, the forward stores the state
//   only at chunk boundaries (every WKV_CHUNK tokens, [3, B, NC, C] floats) and
//   the backward recomputes one chunk at a time into registers (the unrolled
//   loops index the arrays with constants) and walks it in reverse.
// - The state is an input and an output, and the backward returns gradients
//   for the input state and accepts gradients of the output state.
// - The backward is reverse-mode differentiation of the stable recurrence
//   itself, so it is exactly the gradient the PyTorch reference gets from
//   autograd (including the log-scale pp), with every adjoint bounded: each
//   step multiplies the carried adjoints by factors exp(.) <= 1.
//
// Inputs k, v are float32 or bfloat16; everything is computed in float32; y,
// the states and the w/u gradient partials are float32; dk, dv have k's dtype.
//
// The library is plain CUDA C with an extern "C" interface, loaded by
// rwkvkit/ops/cuda.py through ctypes: building it needs nvcc alone, not the
// PyTorch C++ headers, which is where most extension builds fail.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <stdint.h>

#ifndef WKV_CHUNK
#define WKV_CHUNK 16
#endif

#define WKV_THREADS 64

namespace {

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ void store_f(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, float x) { *p = __float2bfloat16(x); }

// The scans use the hardware exp2 unit (__expf: a multiply and one MUFU.EX2,
// against several dependent instructions for an accurate expf) and a fast
// division: with one thread per channel the kernel is bound by the latency of
// each step, not by memory.  Every exponent here is <= 0 and, for the states
// the recurrence produces, every denominator is >= 1; there both are accurate
// to a few ulp (the official kernel builds with --use_fast_math likewise).
__device__ __forceinline__ float fexp(float x) { return __expf(x); }
__device__ __forceinline__ float fdiv(float a, float b) { return __fdividef(a, b); }

// Same value as rwkvkit.ops.types.PP_INIT: exp(pp - anything) underflows to 0.
constexpr float PP_INIT = -1e30f;

template <typename F>
__global__ void wkv_forward_kernel(
    int B, int T, int C,
    const float* __restrict__ w, const float* __restrict__ u,
    const F* __restrict__ k, const F* __restrict__ v,
    const float* __restrict__ s_aa, const float* __restrict__ s_bb, const float* __restrict__ s_pp,
    float* __restrict__ y,
    float* __restrict__ o_aa, float* __restrict__ o_bb, float* __restrict__ o_pp,
    float* __restrict__ ck)  // [3, B, NC, C] state at each chunk start, or null
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int b = blockIdx.y;
    if (c >= C) return;
    const int NC = (T + WKV_CHUNK - 1) / WKV_CHUNK;
    const size_t sc = (size_t)b * C + c;
    const float ww_ = w[c], uu = u[c];
    float aa = s_aa ? s_aa[sc] : 0.0f;
    float bb = s_bb ? s_bb[sc] : 0.0f;
    float pp = s_pp ? s_pp[sc] : PP_INIT;
    const size_t base = (size_t)b * T * C + c;
    const size_t plane = (size_t)B * NC * C;

    for (int t0 = 0, j = 0; t0 < T; t0 += WKV_CHUNK, ++j) {
        if (ck) {
            const size_t o = ((size_t)b * NC + j) * C + c;
            ck[o] = aa;
            ck[plane + o] = bb;
            ck[2 * plane + o] = pp;
        }
        // Issue the whole chunk's loads before the dependent arithmetic.
        float K[WKV_CHUNK], V[WKV_CHUNK];
#pragma unroll
        for (int i = 0; i < WKV_CHUNK; ++i) {
            const int t = t0 + i;
            if (t < T) {
                K[i] = load_f(k + base + (size_t)t * C);
                V[i] = load_f(v + base + (size_t)t * C);
            }
        }
#pragma unroll
        for (int i = 0; i < WKV_CHUNK; ++i) {
            const int t = t0 + i;
            if (t < T) {
                const float kk = K[i], vv = V[i];
                // Output: the current token with the bonus u.
                float ww = uu + kk;
                float q = fmaxf(pp, ww);
                float e1 = fexp(pp - q), e2 = fexp(ww - q);
                y[base + (size_t)t * C] = fdiv(e1 * aa + e2 * vv, e1 * bb + e2);
                // Update: decay the past by exp(w), add this token with exp(k).
                ww = pp + ww_;
                q = fmaxf(ww, kk);
                e1 = fexp(ww - q);
                e2 = fexp(kk - q);
                aa = e1 * aa + e2 * vv;
                bb = e1 * bb + e2;
                pp = q;
            }
        }
    }
    o_aa[sc] = aa;
    o_bb[sc] = bb;
    o_pp[sc] = pp;
}

template <typename F>
__global__ void wkv_backward_kernel(
    int B, int T, int C,
    const float* __restrict__ w, const float* __restrict__ u,
    const F* __restrict__ k, const F* __restrict__ v,
    const float* __restrict__ ck,   // [3, B, NC, C] from the forward
    const float* __restrict__ gy,   // [B, T, C]
    const float* __restrict__ g_aa, const float* __restrict__ g_bb, const float* __restrict__ g_pp,  // [B, C] of the output state
    F* __restrict__ gk, F* __restrict__ gv,  // [B, T, C]
    float* __restrict__ gw_part, float* __restrict__ gu_part,  // [B, C], summed over b by the caller
    float* __restrict__ gs_aa, float* __restrict__ gs_bb, float* __restrict__ gs_pp)  // [B, C] of the input state
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int b = blockIdx.y;
    if (c >= C) return;
    const int NC = (T + WKV_CHUNK - 1) / WKV_CHUNK;
    const size_t sc = (size_t)b * C + c;
    const float w_ = w[c], uu = u[c];
    const size_t base = (size_t)b * T * C + c;
    const size_t plane = (size_t)B * NC * C;

    // Adjoints of the state after the current position, walking backwards.
    float ga = g_aa[sc], gb = g_bb[sc], gp = g_pp[sc];
    float gw_acc = 0.0f, gu_acc = 0.0f;

    for (int j = NC - 1; j >= 0; --j) {
        const int t0 = j * WKV_CHUNK;
        const size_t o = ((size_t)b * NC + j) * C + c;
        float aa = ck[o], bb = ck[plane + o], pp = ck[2 * plane + o];
        // Recompute the state before each token of the chunk.
        float A[WKV_CHUNK], Bs[WKV_CHUNK], P[WKV_CHUNK], K[WKV_CHUNK], V[WKV_CHUNK], G[WKV_CHUNK];
#pragma unroll
        for (int i = 0; i < WKV_CHUNK; ++i) {
            const int t = t0 + i;
            if (t < T) {
                K[i] = load_f(k + base + (size_t)t * C);
                V[i] = load_f(v + base + (size_t)t * C);
                G[i] = gy[base + (size_t)t * C];
            }
        }
#pragma unroll
        for (int i = 0; i < WKV_CHUNK; ++i) {
            if (t0 + i < T) {
                A[i] = aa; Bs[i] = bb; P[i] = pp;
                const float ww = pp + w_;
                const float q = fmaxf(ww, K[i]);
                const float e1 = fexp(ww - q), e2 = fexp(K[i] - q);
                aa = e1 * aa + e2 * V[i];
                bb = e1 * bb + e2;
                pp = q;
            }
        }
#pragma unroll
        for (int i = WKV_CHUNK - 1; i >= 0; --i) {
            const int t = t0 + i;
            if (t < T) {
                const float a = A[i], bq = Bs[i], p = P[i], kk = K[i], vv = V[i];
                // Output step, recomputed: y = N / D.
                const float wo = uu + kk;
                const float qo = fmaxf(p, wo);
                const float e1 = fexp(p - qo), e2 = fexp(wo - qo);
                const float D = e1 * bq + e2;
                const float yv = fdiv(e1 * a + e2 * vv, D);
                const float gN = fdiv(G[i], D);
                const float gD = -gN * yv;
                // y does not depend on the shift qo (it cancels), so no
                // adjoint flows through the max of the output step.
                const float ge1 = gN * a + gD * bq;
                const float ge2 = gN * vv + gD;
                // Update step, recomputed.
                const float wu = p + w_;
                const float qu = fmaxf(wu, kk);
                const float f1 = fexp(wu - qu), f2 = fexp(kk - qu);
                const float a2 = f1 * a + f2 * vv, b2 = f1 * bq + f2;
                const float gf1 = ga * a + gb * bq;
                const float gf2 = ga * vv + gb;
                // The new log-scale pp' = qu is an output of its own; d aa'/d qu = -aa'.
                const float gq = gp - ga * a2 - gb * b2;
                float gwu = gf1 * f1;
                float gkk = gf2 * f2 + ge2 * e2;
                // Route the max's adjoint like torch.maximum: half each on a tie.
                if (wu > kk) gwu += gq;
                else if (wu < kk) gkk += gq;
                else { gwu += 0.5f * gq; gkk += 0.5f * gq; }
                const float gvv = ga * f2 + gN * e2;
                gu_acc += ge2 * e2;
                gw_acc += gwu;
                ga = ga * f1 + gN * e1;
                gb = gb * f1 + gD * e1;
                gp = gwu + ge1 * e1;
                store_f(gk + base + (size_t)t * C, gkk);
                store_f(gv + base + (size_t)t * C, gvv);
            }
        }
    }
    gw_part[sc] = gw_acc;
    gu_part[sc] = gu_acc;
    gs_aa[sc] = ga;
    gs_bb[sc] = gb;
    gs_pp[sc] = gp;
}

// One token of the recurrence for a whole batch (the RNN decode step): the
// ~15 element-wise operations of the PyTorch formulation in one launch.
template <typename F>
__global__ void wkv_step_kernel(
    int B, int C,
    const float* __restrict__ w, const float* __restrict__ u,
    const F* __restrict__ k, const F* __restrict__ v,  // [B, C]
    const float* __restrict__ s_aa, const float* __restrict__ s_bb, const float* __restrict__ s_pp,
    float* __restrict__ y, float* __restrict__ o_aa, float* __restrict__ o_bb, float* __restrict__ o_pp)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int b = blockIdx.y;
    if (c >= C) return;
    const size_t i = (size_t)b * C + c;
    const float kk = load_f(k + i), vv = load_f(v + i);
    const float aa = s_aa[i], bb = s_bb[i], pp = s_pp[i];
    float ww = u[c] + kk;
    float q = fmaxf(pp, ww);
    float e1 = expf(pp - q), e2 = expf(ww - q);
    y[i] = (e1 * aa + e2 * vv) / (e1 * bb + e2);
    ww = pp + w[c];
    q = fmaxf(ww, kk);
    e1 = expf(ww - q);
    e2 = expf(kk - q);
    o_aa[i] = e1 * aa + e2 * vv;
    o_bb[i] = e1 * bb + e2;
    o_pp[i] = q;
}

inline dim3 grid_for(int B, int C) { return dim3((C + WKV_THREADS - 1) / WKV_THREADS, B); }

}  // namespace

extern "C" {

// The chunk length the library was built with (the Python side sizes buffers with it).
int rwkvkit_wkv_chunk() { return WKV_CHUNK; }

// bf16 != 0: k, v (and gk, gv) are bfloat16, else float32.  s_* may be null
// (empty context); ck may be null (no backward needed).  Returns a cudaError_t.
int rwkvkit_wkv_forward(
    int bf16, int B, int T, int C,
    const void* w, const void* u, const void* k, const void* v,
    const void* s_aa, const void* s_bb, const void* s_pp,
    void* y, void* o_aa, void* o_bb, void* o_pp, void* ck, void* stream)
{
    if (B <= 0 || C <= 0 || T < 0) return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)stream;
    const dim3 grid = grid_for(B, C);
    if (bf16) {
        wkv_forward_kernel<__nv_bfloat16><<<grid, WKV_THREADS, 0, st>>>(
            B, T, C, (const float*)w, (const float*)u, (const __nv_bfloat16*)k, (const __nv_bfloat16*)v,
            (const float*)s_aa, (const float*)s_bb, (const float*)s_pp,
            (float*)y, (float*)o_aa, (float*)o_bb, (float*)o_pp, (float*)ck);
    } else {
        wkv_forward_kernel<float><<<grid, WKV_THREADS, 0, st>>>(
            B, T, C, (const float*)w, (const float*)u, (const float*)k, (const float*)v,
            (const float*)s_aa, (const float*)s_bb, (const float*)s_pp,
            (float*)y, (float*)o_aa, (float*)o_bb, (float*)o_pp, (float*)ck);
    }
    return (int)cudaGetLastError();
}

int rwkvkit_wkv_backward(
    int bf16, int B, int T, int C,
    const void* w, const void* u, const void* k, const void* v, const void* ck, const void* gy,
    const void* g_aa, const void* g_bb, const void* g_pp,
    void* gk, void* gv, void* gw_part, void* gu_part,
    void* gs_aa, void* gs_bb, void* gs_pp, void* stream)
{
    if (B <= 0 || C <= 0 || T < 0) return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)stream;
    const dim3 grid = grid_for(B, C);
    if (bf16) {
        wkv_backward_kernel<__nv_bfloat16><<<grid, WKV_THREADS, 0, st>>>(
            B, T, C, (const float*)w, (const float*)u, (const __nv_bfloat16*)k, (const __nv_bfloat16*)v,
            (const float*)ck, (const float*)gy, (const float*)g_aa, (const float*)g_bb, (const float*)g_pp,
            (__nv_bfloat16*)gk, (__nv_bfloat16*)gv, (float*)gw_part, (float*)gu_part,
            (float*)gs_aa, (float*)gs_bb, (float*)gs_pp);
    } else {
        wkv_backward_kernel<float><<<grid, WKV_THREADS, 0, st>>>(
            B, T, C, (const float*)w, (const float*)u, (const float*)k, (const float*)v,
            (const float*)ck, (const float*)gy, (const float*)g_aa, (const float*)g_bb, (const float*)g_pp,
            (float*)gk, (float*)gv, (float*)gw_part, (float*)gu_part,
            (float*)gs_aa, (float*)gs_bb, (float*)gs_pp);
    }
    return (int)cudaGetLastError();
}

int rwkvkit_wkv_step(
    int bf16, int B, int C,
    const void* w, const void* u, const void* k, const void* v,
    const void* s_aa, const void* s_bb, const void* s_pp,
    void* y, void* o_aa, void* o_bb, void* o_pp, void* stream)
{
    if (B <= 0 || C <= 0) return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)stream;
    const dim3 grid((C + 127) / 128, B);
    if (bf16) {
        wkv_step_kernel<__nv_bfloat16><<<grid, 128, 0, st>>>(
            B, C, (const float*)w, (const float*)u, (const __nv_bfloat16*)k, (const __nv_bfloat16*)v,
            (const float*)s_aa, (const float*)s_bb, (const float*)s_pp,
            (float*)y, (float*)o_aa, (float*)o_bb, (float*)o_pp);
    } else {
        wkv_step_kernel<float><<<grid, 128, 0, st>>>(
            B, C, (const float*)w, (const float*)u, (const float*)k, (const float*)v,
            (const float*)s_aa, (const float*)s_bb, (const float*)s_pp,
            (float*)y, (float*)o_aa, (float*)o_bb, (float*)o_pp);
    }
    return (int)cudaGetLastError();
}

const char* rwkvkit_cuda_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

}  // extern "C"
