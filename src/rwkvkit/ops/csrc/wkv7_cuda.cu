// The RWKV-7 WKV operator on NVIDIA GPUs: forward, backward and the decode step.
//
// Per batch row and head, state S (N x N, S[i][j]: i = value channel, j = key
// channel) and per token
//     sa  = S_{t-1} a_t,   S_t = S_{t-1} diag(w_t) + sa b_t^T + v_t k_t^T,   y_t = S_t r_t,
// with w_t = exp(logw_t).  Inputs r, logw, k, v, a, b are [B, T, H, N] float32
// or bfloat16 (all six the same); the state, y and all the arithmetic are
// float32.  Any T (no compile-time limit), a carried state in and out, and
// gradients for every input, the carried-in state included.
//
// Passes (one block of N threads per (b, h); see wkv_common.cuh, and
// ops/wkv7/NOTES.md "CUDA kernels" for the derivation):
//   forward      thread i owns row i of S;   saves sa_t (fp32) for the backward.
//   backward 1   thread i owns row i of the adjoint G = dL/dS, reverse in time:
//                dv, dsa (= G^ b, the adjoint of sa), the carried-in state's gradient.
//   backward 2   thread j owns column j of G, reverse in time: dk, db.
//   backward 3   thread j owns column j of S, forward in time from S_0 with the
//                saved sa: dr, da, and dlogw from the scaling identity
//                dlogw_t = P_0 + sum_{s<t} (k dk + b db - r dr)_s - sum_{s<=t} (a da)_s,
//                P_0[j] = sum_i dS_0[i][j] S_0[i][j],
//                so no pass needs S and G at the same token, and nothing but
//                sa (one fp32 [B, T, H, N] tensor) is kept from the forward.
// The decode step is the forward with T = 1 and nothing saved.

#include "wkv_common.cuh"

namespace {
using namespace rwkvkit;

template <typename F, int N>
__global__ void __launch_bounds__(N) wkv7_forward_kernel(
    int T, int H,
    const F* __restrict__ r, const F* __restrict__ logw, const F* __restrict__ k,
    const F* __restrict__ v, const F* __restrict__ a, const F* __restrict__ b,
    const float* __restrict__ s0,  // [B, H, N, N] or null (zeros)
    float* __restrict__ y,         // [B, T, H, N]
    float* __restrict__ sT,        // [B, H, N, N]
    float* __restrict__ sa_out)    // [B, T, H, N] or null
{
    constexpr int L = Tile<N>::L;
    __shared__ __align__(16) float s_r[L][N];
    __shared__ __align__(16) float s_w[L][N];
    __shared__ __align__(16) float s_k[L][N];
    __shared__ __align__(16) float s_a[L][N];
    __shared__ __align__(16) float s_b[L][N];
    __shared__ __align__(16) float s_v[L][N];
    const int bh = blockIdx.x, bi = bh / H, h = bh % H, i = threadIdx.x;
    const size_t row = ((size_t)bh * N + i) * N;

    float s[N];
#pragma unroll
    for (int j = 0; j < N; ++j) s[j] = s0 ? s0[row + j] : 0.f;

    for (int t0 = 0; t0 < T; t0 += L) {
        const int n = T - t0 < L ? T - t0 : L;
        for (int tt = 0; tt < n; ++tt) {
            const size_t o = tok(bi, t0 + tt, T, h, H, N, i);
            s_r[tt][i] = ld(r + o);
            s_w[tt][i] = expf(ld(logw + o));
            s_k[tt][i] = ld(k + o);
            s_a[tt][i] = ld(a + o);
            s_b[tt][i] = ld(b + o);
            s_v[tt][i] = ld(v + o);
        }
        __syncthreads();
        for (int tt = 0; tt < n; ++tt) {
            const float sa = dot<N>(s, s_a[tt]);
            const float vi = s_v[tt][i];
#pragma unroll
            for (int j = 0; j < N; ++j) s[j] = fmaf(s[j], s_w[tt][j], fmaf(sa, s_b[tt][j], vi * s_k[tt][j]));
            const size_t o = tok(bi, t0 + tt, T, h, H, N, i);
            y[o] = dot<N>(s, s_r[tt]);
            if (sa_out) sa_out[o] = sa;
        }
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < N; ++j) sT[row + j] = s[j];
}

// Backward 1: rows of the adjoint.  G (the adjoint of S_t, all later tokens
// accounted for) becomes G^ = G + dy_t r_t^T (y_t = S_t r_t); then
//   dv_t = G^ k_t,  dsa_t = G^ b_t,  G_{t-1} = G^ diag(w_t) + dsa_t a_t^T,
// all row-local for thread i.
template <typename F, int N>
__global__ void __launch_bounds__(N) wkv7_backward_rows_kernel(
    int T, int H,
    const F* __restrict__ r, const F* __restrict__ logw, const F* __restrict__ k,
    const F* __restrict__ a, const F* __restrict__ b,
    const float* __restrict__ gy,   // [B, T, H, N]
    const float* __restrict__ gsT,  // [B, H, N, N] or null
    F* __restrict__ dv, float* __restrict__ dsa,
    float* __restrict__ ds0)        // [B, H, N, N] or null
{
    constexpr int L = Tile<N>::L;
    __shared__ __align__(16) float s_r[L][N];
    __shared__ __align__(16) float s_w[L][N];
    __shared__ __align__(16) float s_k[L][N];
    __shared__ __align__(16) float s_a[L][N];
    __shared__ __align__(16) float s_b[L][N];
    __shared__ __align__(16) float s_dy[L][N];
    const int bh = blockIdx.x, bi = bh / H, h = bh % H, i = threadIdx.x;
    const size_t row = ((size_t)bh * N + i) * N;

    float g[N];
#pragma unroll
    for (int j = 0; j < N; ++j) g[j] = gsT ? gsT[row + j] : 0.f;

    for (int t0 = ((T - 1) / L) * L; t0 >= 0; t0 -= L) {
        const int n = T - t0 < L ? T - t0 : L;
        for (int tt = 0; tt < n; ++tt) {
            const size_t o = tok(bi, t0 + tt, T, h, H, N, i);
            s_r[tt][i] = ld(r + o);
            s_w[tt][i] = expf(ld(logw + o));
            s_k[tt][i] = ld(k + o);
            s_a[tt][i] = ld(a + o);
            s_b[tt][i] = ld(b + o);
            s_dy[tt][i] = gy[o];
        }
        __syncthreads();
        for (int tt = n - 1; tt >= 0; --tt) {
            const float dyi = s_dy[tt][i];
#pragma unroll
            for (int j = 0; j < N; ++j) g[j] = fmaf(dyi, s_r[tt][j], g[j]);
            const float dvi = dot<N>(g, s_k[tt]);
            const float dsai = dot<N>(g, s_b[tt]);
#pragma unroll
            for (int j = 0; j < N; ++j) g[j] = fmaf(g[j], s_w[tt][j], dsai * s_a[tt][j]);
            const size_t o = tok(bi, t0 + tt, T, h, H, N, i);
            st(dv + o, dvi);
            dsa[o] = dsai;
        }
        __syncthreads();
    }
    if (ds0) {
#pragma unroll
        for (int j = 0; j < N; ++j) ds0[row + j] = g[j];
    }
}

// Backward 2: columns of the adjoint, thread j owns G[:, j]:
//   G^[:, j] = G[:, j] + dy_t r_t[j],  dk_t[j] = G^[:, j] . v_t,  db_t[j] = G^[:, j] . sa_t,
//   G_{t-1}[:, j] = G^[:, j] w_t[j] + dsa_t a_t[j].
template <typename F, int N>
__global__ void __launch_bounds__(N) wkv7_backward_cols_kernel(
    int T, int H,
    const F* __restrict__ r, const F* __restrict__ logw, const F* __restrict__ v, const F* __restrict__ a,
    const float* __restrict__ sa, const float* __restrict__ gy, const float* __restrict__ gsT,
    const float* __restrict__ dsa,
    float* __restrict__ dk32, float* __restrict__ db32)
{
    constexpr int L = Tile<N>::L;
    __shared__ __align__(16) float s_dy[L][N];
    __shared__ __align__(16) float s_v[L][N];
    __shared__ __align__(16) float s_sa[L][N];
    __shared__ __align__(16) float s_dsa[L][N];
    __shared__ __align__(16) float s_r[L][N];
    __shared__ __align__(16) float s_w[L][N];
    __shared__ __align__(16) float s_a[L][N];
    const int bh = blockIdx.x, bi = bh / H, h = bh % H, j = threadIdx.x;
    const size_t mat = (size_t)bh * N * N;

    float g[N];
#pragma unroll
    for (int i = 0; i < N; ++i) g[i] = gsT ? gsT[mat + (size_t)i * N + j] : 0.f;

    for (int t0 = ((T - 1) / L) * L; t0 >= 0; t0 -= L) {
        const int n = T - t0 < L ? T - t0 : L;
        for (int tt = 0; tt < n; ++tt) {
            const size_t o = tok(bi, t0 + tt, T, h, H, N, j);
            s_dy[tt][j] = gy[o];
            s_v[tt][j] = ld(v + o);
            s_sa[tt][j] = sa[o];
            s_dsa[tt][j] = dsa[o];
            s_r[tt][j] = ld(r + o);
            s_w[tt][j] = expf(ld(logw + o));
            s_a[tt][j] = ld(a + o);
        }
        __syncthreads();
        for (int tt = n - 1; tt >= 0; --tt) {
            const float rj = s_r[tt][j], wj = s_w[tt][j], aj = s_a[tt][j];
#pragma unroll
            for (int i = 0; i < N; ++i) g[i] = fmaf(s_dy[tt][i], rj, g[i]);
            const float dkj = dot<N>(g, s_v[tt]);
            const float dbj = dot<N>(g, s_sa[tt]);
#pragma unroll
            for (int i = 0; i < N; ++i) g[i] = fmaf(g[i], wj, s_dsa[tt][i] * aj);
            const size_t o = tok(bi, t0 + tt, T, h, H, N, j);
            dk32[o] = dkj;
            db32[o] = dbj;
        }
        __syncthreads();
    }
}

// Backward 3: columns of S forward in time from S_0 (with the saved sa):
//   da_t[j] = S_{t-1}[:, j] . dsa_t,   S_t[:, j] = S_{t-1}[:, j] w_t[j] + sa_t b_t[j] + v_t k_t[j],
//   dr_t[j] = S_t[:, j] . dy_t,        dlogw_t[j] by the scaling identity (file header).
// dk, db are copied from their fp32 scratch into the output dtype when it is not fp32.
template <typename F, int N>
__global__ void __launch_bounds__(N) wkv7_backward_state_kernel(
    int T, int H,
    const F* __restrict__ r, const F* __restrict__ logw, const F* __restrict__ k,
    const F* __restrict__ v, const F* __restrict__ a, const F* __restrict__ b,
    const float* __restrict__ s0, const float* __restrict__ ds0,
    const float* __restrict__ sa, const float* __restrict__ gy, const float* __restrict__ dsa,
    const float* __restrict__ dk32, const float* __restrict__ db32,
    F* __restrict__ dr, F* __restrict__ dlogw, F* __restrict__ da,
    F* __restrict__ dk, F* __restrict__ db)  // null when F is float (dk32, db32 are the outputs)
{
    constexpr int L = Tile<N>::L;
    __shared__ __align__(16) float s_sa[L][N];
    __shared__ __align__(16) float s_v[L][N];
    __shared__ __align__(16) float s_dy[L][N];
    __shared__ __align__(16) float s_dsa[L][N];
    __shared__ __align__(16) float s_w[L][N];
    __shared__ __align__(16) float s_b[L][N];
    __shared__ __align__(16) float s_k[L][N];
    __shared__ __align__(16) float s_r[L][N];
    __shared__ __align__(16) float s_a[L][N];
    __shared__ __align__(16) float s_dk[L][N];
    __shared__ __align__(16) float s_db[L][N];
    const int bh = blockIdx.x, bi = bh / H, h = bh % H, j = threadIdx.x;
    const size_t mat = (size_t)bh * N * N;

    float s[N];
    Kahan c;
#pragma unroll
    for (int i = 0; i < N; ++i) s[i] = s0 ? s0[mat + (size_t)i * N + j] : 0.f;
    if (s0 && ds0) {
        float p = 0.f;
#pragma unroll
        for (int i = 0; i < N; ++i) p = fmaf(ds0[mat + (size_t)i * N + j], s[i], p);
        c.add(p);
    }

    for (int t0 = 0; t0 < T; t0 += L) {
        const int n = T - t0 < L ? T - t0 : L;
        for (int tt = 0; tt < n; ++tt) {
            const size_t o = tok(bi, t0 + tt, T, h, H, N, j);
            s_sa[tt][j] = sa[o];
            s_v[tt][j] = ld(v + o);
            s_dy[tt][j] = gy[o];
            s_dsa[tt][j] = dsa[o];
            s_w[tt][j] = expf(ld(logw + o));
            s_b[tt][j] = ld(b + o);
            s_k[tt][j] = ld(k + o);
            s_r[tt][j] = ld(r + o);
            s_a[tt][j] = ld(a + o);
            s_dk[tt][j] = dk32[o];
            s_db[tt][j] = db32[o];
        }
        __syncthreads();
        for (int tt = 0; tt < n; ++tt) {
            const float wj = s_w[tt][j], bj = s_b[tt][j], kj = s_k[tt][j];
            const float daj = dot<N>(s, s_dsa[tt]);
#pragma unroll
            for (int i = 0; i < N; ++i) s[i] = fmaf(s[i], wj, fmaf(s_sa[tt][i], bj, s_v[tt][i] * kj));
            const float drj = dot<N>(s, s_dy[tt]);
            c.add(-s_a[tt][j] * daj);
            const size_t o = tok(bi, t0 + tt, T, h, H, N, j);
            st(dlogw + o, c.value());
            c.add(kj * s_dk[tt][j] + bj * s_db[tt][j] - s_r[tt][j] * drj);
            st(dr + o, drj);
            st(da + o, daj);
            if (dk) st(dk + o, s_dk[tt][j]);
            if (db) st(db + o, s_db[tt][j]);
        }
        __syncthreads();
    }
}

template <typename F, int N>
int forward_n(int B, int T, int H, const void* r, const void* logw, const void* k, const void* v, const void* a,
              const void* b, const void* s0, void* y, void* sT, void* sa, cudaStream_t st) {
    auto kern = wkv7_forward_kernel<F, N>;
    RWKVKIT_LAUNCH(kern, dim3(B * H), dim3(N), st, T, H, (const F*)r, (const F*)logw, (const F*)k, (const F*)v,
                   (const F*)a, (const F*)b, (const float*)s0, (float*)y, (float*)sT, (float*)sa);
    return (int)cudaGetLastError();
}

template <typename F, int N>
int backward_n(int B, int T, int H, const void* r, const void* logw, const void* k, const void* v, const void* a,
               const void* b, const void* s0, const void* sa, const void* gy, const void* gsT, void* dr, void* dlogw,
               void* dk, void* dv, void* da, void* db, void* ds0, void* dsa, void* dk32, void* db32, cudaStream_t st) {
    const dim3 grid(B * H), block(N);
    auto k1 = wkv7_backward_rows_kernel<F, N>;
    RWKVKIT_LAUNCH(k1, grid, block, st, T, H, (const F*)r, (const F*)logw, (const F*)k, (const F*)a, (const F*)b,
                   (const float*)gy, (const float*)gsT, (F*)dv, (float*)dsa, (float*)ds0);
    int e = (int)cudaGetLastError();
    if (e) return e;
    auto k2 = wkv7_backward_cols_kernel<F, N>;
    RWKVKIT_LAUNCH(k2, grid, block, st, T, H, (const F*)r, (const F*)logw, (const F*)v, (const F*)a,
                   (const float*)sa, (const float*)gy, (const float*)gsT, (const float*)dsa, (float*)dk32, (float*)db32);
    e = (int)cudaGetLastError();
    if (e) return e;
    auto k3 = wkv7_backward_state_kernel<F, N>;
    const bool copy = (void*)dk != dk32;  // output dtype differs from the fp32 scratch
    RWKVKIT_LAUNCH(k3, grid, block, st, T, H, (const F*)r, (const F*)logw, (const F*)k, (const F*)v, (const F*)a,
                   (const F*)b, (const float*)s0, (const float*)ds0, (const float*)sa, (const float*)gy,
                   (const float*)dsa, (const float*)dk32, (const float*)db32, (F*)dr, (F*)dlogw, (F*)da,
                   copy ? (F*)dk : (F*)nullptr, copy ? (F*)db : (F*)nullptr);
    return (int)cudaGetLastError();
}

}  // namespace

extern "C" {

// Head sizes this library was built for: 1 if N is supported.
int rwkvkit_wkv7_supports(int N) {
#define RWKVKIT_CASE(n) if (N == n) return 1;
    RWKVKIT_HEAD_SIZES(RWKVKIT_CASE)
#undef RWKVKIT_CASE
    return 0;
}

// bf16 != 0: r, logw, k, v, a, b (and their gradients) are bfloat16, else float32.
// s0 may be null (zero state); sa may be null (no backward wanted).  T = 1 is the
// decode step.  Returns a cudaError_t (0 = success).
int rwkvkit_wkv7_forward(int bf16, int B, int T, int H, int N, const void* r, const void* logw, const void* k,
                         const void* v, const void* a, const void* b, const void* s0, void* y, void* sT, void* sa,
                         void* stream) {
    if (B <= 0 || H <= 0 || T < 0) return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)stream;
#define RWKVKIT_CASE(n)                                                                                    \
    if (N == n)                                                                                            \
        return bf16 ? forward_n<__nv_bfloat16, n>(B, T, H, r, logw, k, v, a, b, s0, y, sT, sa, st)          \
                    : forward_n<float, n>(B, T, H, r, logw, k, v, a, b, s0, y, sT, sa, st);
    RWKVKIT_HEAD_SIZES(RWKVKIT_CASE)
#undef RWKVKIT_CASE
    return (int)cudaErrorInvalidValue;
}

// The backward of rwkvkit_wkv7_forward (T >= 1).  gsT (the gradient of the final
// state) may be null (zero); s0 null means a zero initial state, and then ds0 may
// be null.  dsa, dk32, db32 are fp32 [B, T, H, N] scratch; for float32 inputs
// pass dk32 == dk and db32 == db (the kernel then writes the outputs directly).
int rwkvkit_wkv7_backward(int bf16, int B, int T, int H, int N, const void* r, const void* logw, const void* k,
                          const void* v, const void* a, const void* b, const void* s0, const void* sa, const void* gy,
                          const void* gsT, void* dr, void* dlogw, void* dk, void* dv, void* da, void* db, void* ds0,
                          void* dsa, void* dk32, void* db32, void* stream) {
    if (B <= 0 || H <= 0 || T <= 0) return (int)cudaErrorInvalidValue;
    cudaStream_t st = (cudaStream_t)stream;
#define RWKVKIT_CASE(n)                                                                                          \
    if (N == n)                                                                                                  \
        return bf16 ? backward_n<__nv_bfloat16, n>(B, T, H, r, logw, k, v, a, b, s0, sa, gy, gsT, dr, dlogw, dk, \
                                                   dv, da, db, ds0, dsa, dk32, db32, st)                         \
                    : backward_n<float, n>(B, T, H, r, logw, k, v, a, b, s0, sa, gy, gsT, dr, dlogw, dk, dv, da, \
                                           db, ds0, dsa, dk32, db32, st);
    RWKVKIT_HEAD_SIZES(RWKVKIT_CASE)
#undef RWKVKIT_CASE
    return (int)cudaErrorInvalidValue;
}

const char* rwkvkit_cuda_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }

}  // extern "C"
