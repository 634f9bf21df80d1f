// The RWKV-5/6 WKV operator on NVIDIA GPUs: forward, backward and the decode step.
//
// Per batch row and head, state S (N x N, S[i][j]: i = key channel, j = value
// channel) and per token
//     y_t[j] = sum_i r_t[i] (S_{t-1}[i][j] + u[i] k_t[i] v_t[j]),   S_t = diag(w_t) S_{t-1} + k_t v_t^T,
// with w_t = exp(logw_t) (RWKV-5 passes its constant decay broadcast over T).
// Inputs r, k, v, logw are [B, T, H, N] float32 or bfloat16 (all four the
// same), u [H, N] float32; the state, y and all the arithmetic are float32.
// Any T, a carried state in and out, gradients for every input and the state.
//
// Passes (one block of N threads per (b, h); see wkv_common.cuh and
// ops/wkv7/NOTES.md "CUDA kernels"):
//   forward      thread j owns column j of S (a value channel); nothing saved.
//   backward 1   thread i owns row i of the adjoint G = dL/dS_t, reverse in time:
//                dk, du, the carried-in state's gradient, and X_t = k_t * (G_t v_t).
//   backward 2   thread j owns column j of G, reverse in time: dv.
//   backward 3   thread i owns row i of S, forward in time from S_0: dr, and
//                dlogw_t = P_0 + sum_{s<t} X_s - sum_{s<=t} r_s (S_{s-1} dy_s),
//                P_0[i] = sum_j dS_0[i][j] S_0[i][j]  (the scaling identity).
// The decode step is the forward with T = 1.

#include "wkv_common.cuh"

namespace {
using namespace rwkvkit;

// The per-token scalar sum_m x_t[m] over a staged tile: threads tt < n each sum
// one token's row of prod[tt][:] (called between two __syncthreads).
template <int N, int L>
__device__ __forceinline__ void tile_sums(const float (&prod)[L][N], float (&out)[L], int n, int tid) {
    if (tid < n) {
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int m = 0; m < N; m += 2) {
            s0 += prod[tid][m];
            s1 += prod[tid][m + 1];
        }
        out[tid] = s0 + s1;
    }
}

template <typename F, int N>
__global__ void __launch_bounds__(N) wkv6_forward_kernel(
    int T, int H,
    const F* __restrict__ r, const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ logw,
    const float* __restrict__ u,   // [H, N]
    const float* __restrict__ s0,  // [B, H, N, N] or null (zeros)
    float* __restrict__ y, float* __restrict__ sT)
{
    constexpr int L = Tile<N>::L;
    __shared__ __align__(16) float s_r[L][N];
    __shared__ __align__(16) float s_w[L][N];
    __shared__ __align__(16) float s_k[L][N];
    __shared__ __align__(16) float s_v[L][N];
    __shared__ __align__(16) float s_p[L][N];
    __shared__ float s_bonus[L];
    const int bh = blockIdx.x, bi = bh / H, h = bh % H, j = threadIdx.x;
    const size_t mat = (size_t)bh * N * N;
    const float uj = u[h * N + j];  // thread j also stages element j of every vector

    float s[N];  // column j of S
#pragma unroll
    for (int i = 0; i < N; ++i) s[i] = s0 ? s0[mat + (size_t)i * N + j] : 0.f;

    for (int t0 = 0; t0 < T; t0 += L) {
        const int n = T - t0 < L ? T - t0 : L;
        for (int tt = 0; tt < n; ++tt) {
            const size_t o = tok(bi, t0 + tt, T, h, H, N, j);
            const float rr = ld(r + o), kk = ld(k + o);
            s_r[tt][j] = rr;
            s_k[tt][j] = kk;
            s_w[tt][j] = expf(ld(logw + o));
            s_v[tt][j] = ld(v + o);
            s_p[tt][j] = rr * uj * kk;
        }
        __syncthreads();
        tile_sums<N, L>(s_p, s_bonus, n, j);  // bonus_t = sum_i r u k
        __syncthreads();
        for (int tt = 0; tt < n; ++tt) {
            const float vj = s_v[tt][j];
            const size_t o = tok(bi, t0 + tt, T, h, H, N, j);
            y[o] = fmaf(s_bonus[tt], vj, dot<N>(s, s_r[tt]));
#pragma unroll
            for (int i = 0; i < N; ++i) s[i] = fmaf(s[i], s_w[tt][i], s_k[tt][i] * vj);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < N; ++i) sT[mat + (size_t)i * N + j] = s[i];
}

// Backward 1: rows of the adjoint G (of S_t), thread i, reverse in time:
//   dk_t[i] = G_t[i] . v_t + r_t[i] u[i] (dy_t . v_t),   du[i] += r_t[i] k_t[i] (dy_t . v_t),
//   X_t[i] = k_t[i] (G_t[i] . v_t),                      G_{t-1}[i] = w_t[i] G_t[i] + r_t[i] dy_t.
template <typename F, int N>
__global__ void __launch_bounds__(N) wkv6_backward_rows_kernel(
    int T, int H,
    const F* __restrict__ r, const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ logw,
    const float* __restrict__ u, const float* __restrict__ gy, const float* __restrict__ gsT,
    F* __restrict__ dk, float* __restrict__ xs, float* __restrict__ du_part, float* __restrict__ ds0)
{
    constexpr int L = Tile<N>::L;
    __shared__ __align__(16) float s_v[L][N];
    __shared__ __align__(16) float s_dy[L][N];
    __shared__ __align__(16) float s_r[L][N];
    __shared__ __align__(16) float s_w[L][N];
    __shared__ __align__(16) float s_k[L][N];
    __shared__ __align__(16) float s_p[L][N];
    __shared__ float s_dyv[L];
    const int bh = blockIdx.x, bi = bh / H, h = bh % H, i = threadIdx.x;
    const size_t row = ((size_t)bh * N + i) * N;
    const float ui = u[h * N + i];

    float g[N];
#pragma unroll
    for (int j = 0; j < N; ++j) g[j] = gsT ? gsT[row + j] : 0.f;
    float du = 0.f;

    for (int t0 = ((T - 1) / L) * L; t0 >= 0; t0 -= L) {
        const int n = T - t0 < L ? T - t0 : L;
        for (int tt = 0; tt < n; ++tt) {
            const size_t o = tok(bi, t0 + tt, T, h, H, N, i);
            const float vv = ld(v + o), dy = gy[o];
            s_v[tt][i] = vv;
            s_dy[tt][i] = dy;
            s_r[tt][i] = ld(r + o);
            s_w[tt][i] = expf(ld(logw + o));
            s_k[tt][i] = ld(k + o);
            s_p[tt][i] = dy * vv;
        }
        __syncthreads();
        tile_sums<N, L>(s_p, s_dyv, n, i);  // dy_t . v_t
        __syncthreads();
        for (int tt = n - 1; tt >= 0; --tt) {
            const float ri = s_r[tt][i], ki = s_k[tt][i], wi = s_w[tt][i], dyv = s_dyv[tt];
            const float gv = dot<N>(g, s_v[tt]);
            const size_t o = tok(bi, t0 + tt, T, h, H, N, i);
            st(dk + o, fmaf(ri * ui, dyv, gv));
            xs[o] = ki * gv;
            du = fmaf(ri * ki, dyv, du);
#pragma unroll
            for (int j = 0; j < N; ++j) g[j] = fmaf(wi, g[j], ri * s_dy[tt][j]);
        }
        __syncthreads();
    }
    du_part[(size_t)bh * N + i] = du;
    if (ds0) {
#pragma unroll
        for (int j = 0; j < N; ++j) ds0[row + j] = g[j];
    }
}

// Backward 2: columns of the adjoint, thread j, reverse in time:
//   dv_t[j] = G_t[:, j] . k_t + (sum_i r u k) dy_t[j],   G_{t-1}[:, j] = w_t G_t[:, j] + r_t dy_t[j].
template <typename F, int N>
__global__ void __launch_bounds__(N) wkv6_backward_cols_kernel(
    int T, int H,
    const F* __restrict__ r, const F* __restrict__ k, const F* __restrict__ logw,
    const float* __restrict__ u, const float* __restrict__ gy, const float* __restrict__ gsT,
    F* __restrict__ dv)
{
    constexpr int L = Tile<N>::L;
    __shared__ __align__(16) float s_k[L][N];
    __shared__ __align__(16) float s_w[L][N];
    __shared__ __align__(16) float s_r[L][N];
    __shared__ __align__(16) float s_dy[L][N];
    __shared__ __align__(16) float s_p[L][N];
    __shared__ float s_bonus[L];
    const int bh = blockIdx.x, bi = bh / H, h = bh % H, j = threadIdx.x;
    const size_t mat = (size_t)bh * N * N;
    const float uj = u[h * N + j];

    float g[N];
#pragma unroll
    for (int i = 0; i < N; ++i) g[i] = gsT ? gsT[mat + (size_t)i * N + j] : 0.f;

    for (int t0 = ((T - 1) / L) * L; t0 >= 0; t0 -= L) {
        const int n = T - t0 < L ? T - t0 : L;
        for (int tt = 0; tt < n; ++tt) {
            const size_t o = tok(bi, t0 + tt, T, h, H, N, j);
            const float rr = ld(r + o), kk = ld(k + o);
            s_k[tt][j] = kk;
            s_r[tt][j] = rr;
            s_w[tt][j] = expf(ld(logw + o));
            s_dy[tt][j] = gy[o];
            s_p[tt][j] = rr * uj * kk;
        }
        __syncthreads();
        tile_sums<N, L>(s_p, s_bonus, n, j);
        __syncthreads();
        for (int tt = n - 1; tt >= 0; --tt) {
            const float dyj = s_dy[tt][j];
            const size_t o = tok(bi, t0 + tt, T, h, H, N, j);
            st(dv + o, fmaf(s_bonus[tt], dyj, dot<N>(g, s_k[tt])));
#pragma unroll
            for (int i = 0; i < N; ++i) g[i] = fmaf(s_w[tt][i], g[i], s_r[tt][i] * dyj);
        }
        __syncthreads();
    }
}

// Backward 3: rows of S forward in time from S_0, thread i:
//   dr_t[i] = S_{t-1}[i] . dy_t + u[i] k_t[i] (dy_t . v_t),   dlogw_t[i] by the identity (file header),
//   S_t[i] = w_t[i] S_{t-1}[i] + k_t[i] v_t.
template <typename F, int N>
__global__ void __launch_bounds__(N) wkv6_backward_state_kernel(
    int T, int H,
    const F* __restrict__ r, const F* __restrict__ k, const F* __restrict__ v, const F* __restrict__ logw,
    const float* __restrict__ u, const float* __restrict__ s0, const float* __restrict__ ds0,
    const float* __restrict__ gy, const float* __restrict__ xs,
    F* __restrict__ dr, F* __restrict__ dlogw)
{
    constexpr int L = Tile<N>::L;
    __shared__ __align__(16) float s_v[L][N];
    __shared__ __align__(16) float s_dy[L][N];
    __shared__ __align__(16) float s_r[L][N];
    __shared__ __align__(16) float s_w[L][N];
    __shared__ __align__(16) float s_k[L][N];
    __shared__ __align__(16) float s_x[L][N];
    __shared__ __align__(16) float s_p[L][N];
    __shared__ float s_dyv[L];
    const int bh = blockIdx.x, bi = bh / H, h = bh % H, i = threadIdx.x;
    const size_t row = ((size_t)bh * N + i) * N;
    const float ui = u[h * N + i];

    float s[N];
    Kahan c;
#pragma unroll
    for (int j = 0; j < N; ++j) s[j] = s0 ? s0[row + j] : 0.f;
    if (s0 && ds0) {
        float p = 0.f;
#pragma unroll
        for (int j = 0; j < N; ++j) p = fmaf(ds0[row + j], s[j], p);
        c.add(p);
    }

    for (int t0 = 0; t0 < T; t0 += L) {
        const int n = T - t0 < L ? T - t0 : L;
        for (int tt = 0; tt < n; ++tt) {
            const size_t o = tok(bi, t0 + tt, T, h, H, N, i);
            const float vv = ld(v + o), dy = gy[o];
            s_v[tt][i] = vv;
            s_dy[tt][i] = dy;
            s_r[tt][i] = ld(r + o);
            s_w[tt][i] = expf(ld(logw + o));
            s_k[tt][i] = ld(k + o);
            s_x[tt][i] = xs[o];
            s_p[tt][i] = dy * vv;
        }
        __syncthreads();
        tile_sums<N, L>(s_p, s_dyv, n, i);
        __syncthreads();
        for (int tt = 0; tt < n; ++tt) {
            const float ri = s_r[tt][i], ki = s_k[tt][i], wi = s_w[tt][i];
            const float drs = dot<N>(s, s_dy[tt]);  // S_{t-1}[i] . dy_t
            const size_t o = tok(bi, t0 + tt, T, h, H, N, i);
            st(dr + o, fmaf(ui * ki, s_dyv[tt], drs));
            c.add(-ri * drs);
            st(dlogw + o, c.value());
            c.add(s_x[tt][i]);
#pragma unroll
            for (int j = 0; j < N; ++j) s[j] = fmaf(wi, s[j], ki * s_v[tt][j]);
        }
        __syncthreads();
    }
}

template <typename F, int N>
int forward_n(int B, int T, int H, const void* r, const void* k, const void* v, const void* logw, const void* u,
              const void* s0, void* y, void* sT, cudaStream_t st) {
    auto kern = wkv6_forward_kernel<F, N>;
    RWKVKIT_LAUNCH(kern, dim3(B * H), dim3(N), st, T, H, (const F*)r, (const F*)k, (const F*)v, (const F*)logw,
                   (const float*)u, (const float*)s0, (float*)y, (float*)sT);
    return (int)cudaGetLastError();
}

template <typename F, int N>
int backward_n(int B, int T, int H, const void* r, const void* k, const void* v, const void* logw, const void* u,
               const void* s0, const void* gy, const void* gsT, void* dr, void* dk, void* dv, void* dlogw,
               void* du_part, void* ds0, void* xs, cudaStream_t st) {
    const dim3 grid(B * H), block(N);
    auto k1 = wkv6_backward_rows_kernel<F, N>;
    RWKVKIT_LAUNCH(k1, grid, block, st, T, H, (const F*)r, (const F*)k, (const F*)v, (const F*)logw, (const float*)u,
                   (const float*)gy, (const float*)gsT, (F*)dk, (float*)xs, (float*)du_part, (float*)ds0);
    int e = (int)cudaGetLastError();
    if (e) return e;
    auto k2 = wkv6_backward_cols_kernel<F, N>;
    RWKVKIT_LAUNCH(k2, grid, block, st, T, H, (const F*)r, (const F*)k, (const F*)logw, (const float*)u,
                   (const float*)gy, (const float*)gsT, (F*)dv);
    e = (int)cudaGetLastError();
    if (e) return e;
    auto k3 = wkv6_backward_state_kernel<F, N>;
    RWKVKIT_LAUNCH(k3, grid, block, st, T, H, (const F*)r, (const F*)k, (const F*)v, (const F*)logw, (const float*)u,
                   (const float*)s0, (const float*)ds0, (const float*)gy, (const float*)xs, (F*)dr, (F*)dlogw);
    return (int)cudaGetLastError();
}

}  // namespace

extern "C" {

int rwkvkit_wkv6_supports(int N) {
#define RWKVKIT_CASE(n) if (N == n) return 1;
    RWKVKIT_HEAD_SIZES(RWKVKIT_CASE)
#undef RWKVKIT_CASE
    return 0;
}

// bf16 != 0: r, k, v, logw (and their gradients) are bfloat16, else float32; u is
// float32 [H, N].  s0 may be null (zero state).  T = 1 is the decode step.
// Returns a cudaError_t (0 = success).
int rwkvkit_wkv6_forward(int bf16, int B, int T, int H, int N, const void* r, const void* k, const void* v,
                         const void* logw, const void* u, const void* s0, void* y, void* sT, void* stream) {
    if (B <= 0 || H <= 0 || T < 0) return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)stream;
#define RWKVKIT_CASE(n)                                                                          \
    if (N == n)                                                                                  \
        return bf16 ? forward_n<__nv_bfloat16, n>(B, T, H, r, k, v, logw, u, s0, y, sT, st)      \
                    : forward_n<float, n>(B, T, H, r, k, v, logw, u, s0, y, sT, st);
    RWKVKIT_HEAD_SIZES(RWKVKIT_CASE)
#undef RWKVKIT_CASE
    return (int)cudaErrorInvalidValue;
}

// The backward (T >= 1).  gsT may be null (zero); ds0 may be null only when s0 is.
// du_part is fp32 [B, H, N] (the caller sums over B); xs is fp32 [B, T, H, N] scratch.
int rwkvkit_wkv6_backward(int bf16, int B, int T, int H, int N, const void* r, const void* k, const void* v,
                          const void* logw, const void* u, const void* s0, const void* gy, const void* gsT, void* dr,
                          void* dk, void* dv, void* dlogw, void* du_part, void* ds0, void* xs, void* stream) {
    if (B <= 0 || H <= 0 || T <= 0) return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)stream;
#define RWKVKIT_CASE(n)                                                                                              \
    if (N == n)                                                                                                      \
        return bf16 ? backward_n<__nv_bfloat16, n>(B, T, H, r, k, v, logw, u, s0, gy, gsT, dr, dk, dv, dlogw,        \
                                                   du_part, ds0, xs, st)                                             \
                    : backward_n<float, n>(B, T, H, r, k, v, logw, u, s0, gy, gsT, dr, dk, dv, dlogw, du_part, ds0,  \
                                           xs, st);
    RWKVKIT_HEAD_SIZES(RWKVKIT_CASE)
#undef RWKVKIT_CASE
    return (int)cudaErrorInvalidValue;
}

const char* rwkvkit_cuda_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

}  // extern "C"
