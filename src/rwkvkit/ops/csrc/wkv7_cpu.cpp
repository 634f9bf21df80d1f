// The RWKV-7 WKV operator on the CPU ("cpu" backend of rwkvkit.ops.wkv7):
// forward and backward sequential scans, written from the maths in
// ops/wkv7/NOTES.md ("CPU kernel" and "CUDA kernels").
//
// One task per (batch row, head); the tasks are shared out with
// at::parallel_for, and each keeps its N x N state (fp32) in a private buffer
// that stays in the L1/L2 cache for the whole sequence.  The state is held in
// whichever orientation makes the per-token work a sequence of
// broadcast-times-vector multiply-adds over the contiguous axis:
//
//   forward   key-major    ST[j][i] = S[i][j]: sa = sum_j a_j ST[j],
//                          ST[j] = ST[j] w_j + b_j sa + k_j v, y += r_j ST[j]
//                          (no horizontal sums at all);
//   backward  value-major  pass A walks time backwards with the adjoint G
//                          (rows: dv_i = Ghat[i].k and dsa_i = Ghat[i].b are
//                          the only horizontal sums), pass B walks forwards
//                          with S rebuilt from S_0 and the saved sa
//                          (da += dsa_i S_{t-1}[i], dr += dy_i S_t[i]);
//                          dlogw comes from the scaling identity as a running
//                          sum (in double) over the per-token vectors.
//
// The forward saves sa_t = S_{t-1} a_t ([B, T, H, N] fp32) for the backward
// and nothing else.  Inputs are fp32 or bf16 (all six alike), widened to fp32
// one token at a time; y, the states and sa are fp32; the gradients are
// written in the inputs' dtype (the state's in fp32).
//
// The contiguous axis is padded to NP = NV * W floats (W the SIMD width, NV a
// power of two, a template parameter so the vectors of one row live in
// registers); the padding lanes hold zeros and stay zero.  Supported: N <= 128
// (the Python side sends larger heads to the chunked form).
//
// Vectors are GCC/Clang vector extensions; the kernels are written once and
// compiled three times -- AVX-512 (W = 16), AVX2+FMA (W = 8) and the
// baseline ISA (W = 4: SSE2 on x86-64, NEON on ARM) -- by always_inline
// bodies inside functions with a target attribute, picked at run time
// (set_isa forces one: the tests run every family the CPU has).  No
// -march flag, so a shared build cache stays valid on another CPU.
//
// Tensors arrive as raw pointers (checked and allocated by ops/wkv7/cpu.py);
// only pybind11 and ATen/Parallel.h are included, which keeps the build short.

#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#define RK7_X86 1
#else
#define RK7_X86 0
#endif

#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments of always_inline helpers never cross an ABI

#define AI __attribute__((always_inline)) inline

namespace {

// ------------------------------------------------------------ vectors
template <int W>
struct Vec;
template <>
struct Vec<4> {
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
};
template <>
struct Vec<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
};
template <>
struct Vec<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
};

template <class V>
AI V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <class V>
AI void vstore(float* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

template <class V>
AI V splat(float x) {
  return V{} + x;
}

// Two-source lane shuffles with constant indices (0 .. 2W-1 over the
// concatenation of a and b): GCC's __builtin_shuffle (any GCC since 4.7),
// Clang's __builtin_shufflevector.
#if defined(__clang__)
#define RK7_SHUF(W, a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define RK7_SHUF(W, a, b, ...) __builtin_shuffle(a, b, Vec<W>::I{__VA_ARGS__})
#endif

AI float hsum(Vec<4>::F v) {
  const Vec<4>::F x = v + RK7_SHUF(4, v, v, 2, 3, 0, 1);
  return x[0] + x[1];
}

AI float hsum(Vec<8>::F v) {
  const Vec<8>::F x = v + RK7_SHUF(8, v, v, 4, 5, 6, 7, 0, 1, 2, 3);
  const Vec<8>::F y = x + RK7_SHUF(8, x, x, 2, 3, 0, 1, 6, 7, 4, 5);
  return y[0] + y[1];
}

AI float hsum(Vec<16>::F v) {
  const Vec<16>::F x = v + RK7_SHUF(16, v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  const Vec<16>::F y = x + RK7_SHUF(16, x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  const Vec<16>::F z = y + RK7_SHUF(16, y, y, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return z[0] + z[1];
}

// The four sums of p0..p3 at once (out[m] = sum of the lanes of p_m): a
// transposing tree of two-source shuffles, ~3 operations per sum instead of
// ~8 for four separate horizontal sums.
AI void reduce4(Vec<4>::F p0, Vec<4>::F p1, Vec<4>::F p2, Vec<4>::F p3, float* out) {
  typedef Vec<4>::F V;
  const V x = RK7_SHUF(4, p0, p1, 0, 1, 4, 5) + RK7_SHUF(4, p0, p1, 2, 3, 6, 7);  // p0 p0 p1 p1
  const V y = RK7_SHUF(4, p2, p3, 0, 1, 4, 5) + RK7_SHUF(4, p2, p3, 2, 3, 6, 7);  // p2 p2 p3 p3
  const V z = RK7_SHUF(4, x, y, 0, 2, 4, 6) + RK7_SHUF(4, x, y, 1, 3, 5, 7);      // p0 p1 p2 p3
  out[0] = z[0], out[1] = z[1], out[2] = z[2], out[3] = z[3];
}

AI void reduce4(Vec<8>::F p0, Vec<8>::F p1, Vec<8>::F p2, Vec<8>::F p3, float* out) {
  typedef Vec<8>::F V;
  const V x = RK7_SHUF(8, p0, p1, 0, 1, 2, 3, 8, 9, 10, 11) + RK7_SHUF(8, p0, p1, 4, 5, 6, 7, 12, 13, 14, 15);
  const V y = RK7_SHUF(8, p2, p3, 0, 1, 2, 3, 8, 9, 10, 11) + RK7_SHUF(8, p2, p3, 4, 5, 6, 7, 12, 13, 14, 15);
  // x = p0 x4, p1 x4; y = p2 x4, p3 x4 -> z = p0 p0 p2 p2 p1 p1 p3 p3
  const V z = RK7_SHUF(8, x, y, 0, 1, 8, 9, 4, 5, 12, 13) + RK7_SHUF(8, x, y, 2, 3, 10, 11, 6, 7, 14, 15);
  const V u = z + RK7_SHUF(8, z, z, 1, 0, 3, 2, 5, 4, 7, 6);
  out[0] = u[0], out[1] = u[4], out[2] = u[2], out[3] = u[6];
}

AI void reduce4(Vec<16>::F p0, Vec<16>::F p1, Vec<16>::F p2, Vec<16>::F p3, float* out) {
  typedef Vec<16>::F V;
  const V x = RK7_SHUF(16, p0, p1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
              RK7_SHUF(16, p0, p1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const V y = RK7_SHUF(16, p2, p3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
              RK7_SHUF(16, p2, p3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  // x = p0 x8, p1 x8; y = p2 x8, p3 x8 -> z = p0 x4, p1 x4, p2 x4, p3 x4
  const V z = RK7_SHUF(16, x, y, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
              RK7_SHUF(16, x, y, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  const V u = z + RK7_SHUF(16, z, z, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  const V e = u + RK7_SHUF(16, u, u, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  out[0] = e[0], out[1] = e[4], out[2] = e[8], out[3] = e[12];
}

// exp(x) for x <= 0 (the log-decays), to ~1 ulp: x = n ln2 + f with |f| <=
// ln2 / 2 (Cody-Waite, ln2 split in two), e^f = 1 + f + f^2 p(f) with p a
// degree-5 polynomial (Cephes' expf coefficients), times 2^n built in the
// exponent bits.  Below
// ln(FLT_MIN) = -87.3365 (where 2^n would leave the normal range) the result
// is 0 instead of a denormal; the decays of a real model are far above that
// (the model's logw >= -0.61).
template <class V, class I>
AI V vexp_nonpos(V x) {
  const V lo = splat<V>(-87.33654f);
  const I under = x < lo;  // -1 where the result flushes to 0
  x = x < lo ? lo : x;
  V t = x * 1.44269504088896341f + 12582912.f;  // round(x / ln2) in the low mantissa bits
  const V n = t - 12582912.f;
  V f = x - n * 0.693359375f;
  f = f - n * -2.12194440e-4f;
  V p = splat<V>(1.9875691500e-4f);
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = (p * f) * f + f + 1.f;
  const I e = (__builtin_convertvector(n, I) + 127) << 23;
  V scale;
  std::memcpy(&scale, &e, sizeof scale);
  V r = p * scale;
  I bits;
  std::memcpy(&bits, &r, sizeof bits);
  bits &= ~under;
  std::memcpy(&r, &bits, sizeof r);
  return r;
}

// ------------------------------------------------------------ dtypes
AI float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even (NaN kept a quiet NaN), as torch's .to(bfloat16).
AI uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// n floats, W at a time (inline: a libc memcpy call per token vector costs
// as much as the arithmetic at these sizes).  The build passes
// -fno-tree-loop-distribute-patterns so the tail loop stays a loop.
template <int W>
AI void copy_f32(float* __restrict dst, const float* __restrict src, int64_t n) {
  typedef typename Vec<W>::F V;
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(dst + i, vload<V>(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

// n values of one token from an fp32 or bf16 [.., N] tensor into dst (fp32).
template <int W>
AI void load_row(const void* base, bool bf16, int64_t off, int64_t n, float* __restrict dst) {
  if (bf16) {
    const uint16_t* s = static_cast<const uint16_t*>(base) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
  } else {
    copy_f32<W>(dst, static_cast<const float*>(base) + off, n);
  }
}

template <int W>
AI void store_row(void* base, bool bf16, int64_t off, int64_t n, const float* __restrict src) {
  if (bf16) {
    uint16_t* d = static_cast<uint16_t*>(base) + off;
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
  } else {
    copy_f32<W>(static_cast<float*>(base) + off, src, n);
  }
}

// Prefetch n values (of esz bytes) at byte offset off of base into the
// cache.  A token's vectors are H * N values apart in [B, T, H, N], too far
// for the hardware prefetchers (which stop at 4 KiB pages), and each pass
// walks a dozen such streams: without this the scans wait on memory.
AI void prefetch_row(const void* base, int64_t off, int64_t n, int esz, int write) {
  const char* p = static_cast<const char*>(base) + off * esz;
  for (int64_t c = 0; c < n * esz; c += 64) {
    if (write) __builtin_prefetch(p + c, 1, 3);
    else __builtin_prefetch(p + c, 0, 3);
  }
}

constexpr int PREFETCH_TOKENS = 2;  // how far ahead (one token is ~1 us of work)

// ------------------------------------------------------------ arguments
struct Args {
  // inputs [B, T, H, N], fp32 or bf16 (bf16 != 0)
  const void *r, *logw, *k, *v, *a, *b;
  const float* s0;  // [B, H, N, N] (value x key) or null: zeros
  // forward outputs
  float* y;   // [B, T, H, N]
  float* sT;  // [B, H, N, N]
  float* sa;  // [B, T, H, N]: saved by the forward when non-null, read by the backward
  // backward
  const float *gy, *gsT;                 // [B, T, H, N], [B, H, N, N]
  void *dr, *dlogw, *dk, *dv, *da, *db;  // [B, T, H, N], the inputs' dtype
  float* ds0;                            // [B, H, N, N] or null (no initial state)
  int64_t B, T, H, N, NP;
  int bf16;
};

// Per-task fp32 buffer: a state [N][NP] and a dozen padded token vectors.
struct Buffer {
  std::unique_ptr<float[]> mem;
  float* p = nullptr;
  explicit Buffer(int64_t floats) : mem(new float[floats + 16]) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(mem.get());
    p = mem.get() + ((64 - a % 64) % 64) / sizeof(float);  // 64-byte aligned
  }
};

// Floats of one thread's buffer: the state and 16 token vectors, plus for the
// backward dsa and the X terms of every token, [T][NP] each (reused from one
// task to the next, so they stay in the L2 cache).
int64_t buffer_floats(const Args& p, bool backward) { return (p.N + 16 + (backward ? 2 * p.T : 0)) * p.NP; }

// ------------------------------------------------------------ forward
// Task (b, h).  ST [N][NP] holds S transposed (key-major); padded value lanes
// i >= N stay zero (v and the initial state are zero there).
template <int W, int NV>
AI void forward_task(const Args& p, int64_t task, float* __restrict buf) {
  typedef typename Vec<W>::F V;
  typedef typename Vec<W>::I I;
  constexpr int NP = NV * W;
  const int64_t N = p.N, T = p.T, H = p.H;
  const int64_t b = task / H, h = task % H;
  const bool bf = p.bf16 != 0;
  float* __restrict ST = buf;
  float* __restrict tr = ST + N * NP;
  float* __restrict tw = tr + NP;
  float* __restrict tk = tw + NP;
  float* __restrict tv = tk + NP;
  float* __restrict ta = tv + NP;
  float* __restrict tb = ta + NP;
  float* __restrict out = tb + NP;
  for (int64_t j = 0; j < N; ++j) {
    float* row = ST + j * NP;
    for (int i = 0; i < NP; ++i) row[i] = 0.f;
    if (p.s0)
      for (int64_t i = 0; i < N; ++i) row[i] = p.s0[((b * H + h) * N + i) * N + j];
  }
  for (int i = 0; i < NP; ++i) tv[i] = tw[i] = 0.f;
  const int esz = bf ? 2 : 4;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = ((b * T + t) * H + h) * N;
    if (t + PREFETCH_TOKENS < T) {
      const int64_t f = o + PREFETCH_TOKENS * H * N;
      for (const void* x : {p.r, p.logw, p.k, p.v, p.a, p.b}) prefetch_row(x, f, N, esz, 0);
      prefetch_row(p.y, f, N, 4, 1);
      if (p.sa) prefetch_row(p.sa, f, N, 4, 1);
    }
    load_row<W>(p.r, bf, o, N, tr);
    load_row<W>(p.logw, bf, o, N, tw);
    load_row<W>(p.k, bf, o, N, tk);
    load_row<W>(p.v, bf, o, N, tv);
    load_row<W>(p.a, bf, o, N, ta);
    load_row<W>(p.b, bf, o, N, tb);
#pragma GCC unroll 32
    for (int q = 0; q < NV; ++q) vstore(tw + q * W, vexp_nonpos<V, I>(vload<V>(tw + q * W)));
    // sa = S_{t-1} a: two sets of accumulators (even and odd keys) to hide
    // the multiply-add latency.
    V s0[NV], s1[NV];
#pragma GCC unroll 32
    for (int q = 0; q < NV; ++q) s0[q] = s1[q] = V{};
    int64_t j = 0;
    for (; j + 1 < N; j += 2) {
      const float a0 = ta[j], a1 = ta[j + 1];
      const float* r0 = ST + j * NP;
      const float* r1 = r0 + NP;
#pragma GCC unroll 32
      for (int q = 0; q < NV; ++q) {
        s0[q] += a0 * vload<V>(r0 + q * W);
        s1[q] += a1 * vload<V>(r1 + q * W);
      }
    }
    if (j < N) {
      const float a0 = ta[j];
      const float* r0 = ST + j * NP;
#pragma GCC unroll 32
      for (int q = 0; q < NV; ++q) s0[q] += a0 * vload<V>(r0 + q * W);
    }
    V sa[NV], vv[NV], y[NV];
#pragma GCC unroll 32
    for (int q = 0; q < NV; ++q) {
      sa[q] = s0[q] + s1[q];
      vv[q] = vload<V>(tv + q * W);
      y[q] = V{};
    }
    if (p.sa) {
#pragma GCC unroll 32
      for (int q = 0; q < NV; ++q) vstore(out + q * W, sa[q]);
      copy_f32<W>(p.sa + o, out, N);
    }
    // S_t = S_{t-1} diag(w) + sa b^T + v k^T (a key row at a time), y = S_t r.
    for (j = 0; j < N; ++j) {
      const float wj = tw[j], bj = tb[j], kj = tk[j], rj = tr[j];
      float* row = ST + j * NP;
#pragma GCC unroll 32
      for (int q = 0; q < NV; ++q) {
        const V s = vload<V>(row + q * W) * wj + bj * sa[q] + kj * vv[q];
        vstore(row + q * W, s);
        y[q] += rj * s;
      }
    }
#pragma GCC unroll 32
    for (int q = 0; q < NV; ++q) vstore(out + q * W, y[q]);
    copy_f32<W>(p.y + o, out, N);
  }
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j2 = 0; j2 < N; ++j2) p.sT[((b * H + h) * N + i) * N + j2] = ST[j2 * NP + i];
}

// ------------------------------------------------------------ backward
// Task (b, h).  Value-major buffers [N][NP] (padded key lanes j >= N: r, k, a,
// b are zero there, so the padding of G and S stays zero).
//
// Pass A, t = T-1 .. 0, G = dL/dS_t from the later tokens (dS_T at the start):
//   Ghat = G + dy r^T;  dv_i = Ghat[i].k;  dsa_i = Ghat[i].b;
//   dk = Ghat^T v;  db = Ghat^T sa;  G <- Ghat diag(w) + dsa a^T.
// At the end G = dS_0.
// Pass B, t = 0 .. T-1, S rebuilt from S_0 with the saved sa:
//   da = S_{t-1}^T dsa;  S_t = S_{t-1} diag(w) + sa b^T + v k^T;  dr = S_t^T dy.
// dlogw by the scaling identity (NOTES.md): with X = k dk + b db - r dr and
// Y = a da (element-wise), P_0[j] = sum_i dS_0[i,j] S_0[i,j],
//   dlogw_t = P_0 + sum_{s<t} X_s - sum_{s<=t} Y_s,
// summed in double.
template <int W, int NV>
AI void backward_task(const Args& p, int64_t task, float* __restrict buf) {
  typedef typename Vec<W>::F V;
  typedef typename Vec<W>::I I;
  constexpr int NP = NV * W;
  const int64_t N = p.N, T = p.T, H = p.H;
  const int64_t b = task / H, h = task % H;
  const bool bf = p.bf16 != 0;
  float* __restrict M = buf;  // G in pass A, S in pass B
  float* __restrict tr = M + N * NP;
  float* __restrict tw = tr + NP;
  float* __restrict tk = tw + NP;
  float* __restrict tv = tk + NP;
  float* __restrict ta = tv + NP;
  float* __restrict tb = ta + NP;
  float* __restrict tsa = tb + NP;
  float* __restrict tdy = tsa + NP;
  float* __restrict o1 = tdy + NP;
  float* __restrict o2 = o1 + NP;
  float* __restrict o3 = o2 + NP;
  double* __restrict run = reinterpret_cast<double*>(o3 + NP);  // 2 NP floats
  float* __restrict dsa_all = buf + (N + 16) * NP;               // [T][NP]
  float* __restrict x_all = dsa_all + T * NP;                    // [T][NP]
  const int64_t so = (b * H + h) * N * N;
  for (int i = 0; i < NP; ++i) tr[i] = tw[i] = tk[i] = ta[i] = tb[i] = 0.f;
  for (int64_t i = 0; i < N; ++i) {
    float* row = M + i * NP;
    std::memcpy(row, p.gsT + so + i * N, N * sizeof(float));
    for (int64_t j = N; j < NP; ++j) row[j] = 0.f;
  }
  // ---- pass A
  const int esz = bf ? 2 : 4;
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t o = ((b * T + t) * H + h) * N;
    if (t - PREFETCH_TOKENS >= 0) {
      const int64_t f = o - PREFETCH_TOKENS * H * N;
      for (const void* x : {p.r, p.logw, p.k, p.v, p.a, p.b}) prefetch_row(x, f, N, esz, 0);
      prefetch_row(p.sa, f, N, 4, 0);
      prefetch_row(p.gy, f, N, 4, 0);
      for (void* x : {p.dv, p.dk, p.db}) prefetch_row(x, f, N, esz, 1);
    }
    load_row<W>(p.r, bf, o, N, tr);
    load_row<W>(p.logw, bf, o, N, tw);
    load_row<W>(p.k, bf, o, N, tk);
    load_row<W>(p.v, bf, o, N, tv);
    load_row<W>(p.a, bf, o, N, ta);
    load_row<W>(p.b, bf, o, N, tb);
    copy_f32<W>(tsa, p.sa + o, N);
    copy_f32<W>(tdy, p.gy + o, N);
    V r[NV], w[NV], k[NV], a[NV], bb[NV], dk[NV], db[NV];
#pragma GCC unroll 32
    for (int q = 0; q < NV; ++q) {
      r[q] = vload<V>(tr + q * W);
      w[q] = vexp_nonpos<V, I>(vload<V>(tw + q * W));
      k[q] = vload<V>(tk + q * W);
      a[q] = vload<V>(ta + q * W);
      bb[q] = vload<V>(tb + q * W);
      dk[q] = db[q] = V{};
    }
    float* __restrict dsa_t = dsa_all + t * NP;
    // Two rows at a time, so that their four dot products (dv_i, dsa_i for
    // both) share one transposing reduction.
    int64_t i = 0;
    for (; i + 1 < N; i += 2) {
      float* row0 = M + i * NP;
      float* row1 = row0 + NP;
      const float dy0 = tdy[i], dy1 = tdy[i + 1];
      V g0[NV], g1[NV], pk0 = V{}, pb0 = V{}, pk1 = V{}, pb1 = V{};
#pragma GCC unroll 32
      for (int q = 0; q < NV; ++q) {
        g0[q] = vload<V>(row0 + q * W) + dy0 * r[q];
        g1[q] = vload<V>(row1 + q * W) + dy1 * r[q];
        pk0 += g0[q] * k[q];
        pb0 += g0[q] * bb[q];
        pk1 += g1[q] * k[q];
        pb1 += g1[q] * bb[q];
      }
      float d[4];
      reduce4(pk0, pb0, pk1, pb1, d);  // dv_i, dsa_i, dv_i+1, dsa_i+1
      const float v0 = tv[i], v1 = tv[i + 1], sa0 = tsa[i], sa1 = tsa[i + 1];
#pragma GCC unroll 32
      for (int q = 0; q < NV; ++q) {
        dk[q] += v0 * g0[q] + v1 * g1[q];
        db[q] += sa0 * g0[q] + sa1 * g1[q];
        vstore(row0 + q * W, g0[q] * w[q] + d[1] * a[q]);
        vstore(row1 + q * W, g1[q] * w[q] + d[3] * a[q]);
      }
      o1[i] = d[0], o1[i + 1] = d[2];
      dsa_t[i] = d[1], dsa_t[i + 1] = d[3];
    }
    if (i < N) {  // odd N: the last row alone
      float* row = M + i * NP;
      const float dyi = tdy[i];
      V g[NV], pk = V{}, pb = V{};
#pragma GCC unroll 32
      for (int q = 0; q < NV; ++q) {
        g[q] = vload<V>(row + q * W) + dyi * r[q];
        pk += g[q] * k[q];
        pb += g[q] * bb[q];
      }
      const float dvi = hsum(pk), dsai = hsum(pb);
#pragma GCC unroll 32
      for (int q = 0; q < NV; ++q) {
        dk[q] += tv[i] * g[q];
        db[q] += tsa[i] * g[q];
        vstore(row + q * W, g[q] * w[q] + dsai * a[q]);
      }
      o1[i] = dvi;
      dsa_t[i] = dsai;
    }
    store_row<W>(p.dv, bf, o, N, o1);
    float* __restrict x_t = x_all + t * NP;
#pragma GCC unroll 32
    for (int q = 0; q < NV; ++q) {
      vstore(o1 + q * W, dk[q]);
      vstore(o2 + q * W, db[q]);
      vstore(x_t + q * W, k[q] * dk[q] + bb[q] * db[q]);  // X without its r dr part (pass B)
    }
    store_row<W>(p.dk, bf, o, N, o1);
    store_row<W>(p.db, bf, o, N, o2);
  }
  // ---- dS_0 and P_0; M becomes S_0
  for (int i = 0; i < NP; ++i) run[i] = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    float* row = M + i * NP;
    if (p.ds0) std::memcpy(p.ds0 + so + i * N, row, N * sizeof(float));
    if (p.s0) {
      const float* s = p.s0 + so + i * N;
      for (int64_t j = 0; j < N; ++j) run[j] += static_cast<double>(row[j]) * s[j];
      std::memcpy(row, s, N * sizeof(float));
    } else {
      for (int64_t j = 0; j < N; ++j) row[j] = 0.f;
    }
  }
  // ---- pass B
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = ((b * T + t) * H + h) * N;
    if (t + PREFETCH_TOKENS < T) {
      const int64_t f = o + PREFETCH_TOKENS * H * N;
      for (const void* x : {p.r, p.logw, p.k, p.v, p.a, p.b}) prefetch_row(x, f, N, esz, 0);
      prefetch_row(p.sa, f, N, 4, 0);
      prefetch_row(p.gy, f, N, 4, 0);
      for (void* x : {p.dr, p.da, p.dlogw}) prefetch_row(x, f, N, esz, 1);
    }
    load_row<W>(p.r, bf, o, N, tr);
    load_row<W>(p.logw, bf, o, N, tw);
    load_row<W>(p.k, bf, o, N, tk);
    load_row<W>(p.v, bf, o, N, tv);
    load_row<W>(p.a, bf, o, N, ta);
    load_row<W>(p.b, bf, o, N, tb);
    copy_f32<W>(tsa, p.sa + o, N);
    copy_f32<W>(tdy, p.gy + o, N);
    const float* __restrict dsa_t = dsa_all + t * NP;
    V w[NV], k[NV], bb[NV], da[NV], dr[NV];
#pragma GCC unroll 32
    for (int q = 0; q < NV; ++q) {
      w[q] = vexp_nonpos<V, I>(vload<V>(tw + q * W));
      k[q] = vload<V>(tk + q * W);
      bb[q] = vload<V>(tb + q * W);
      da[q] = dr[q] = V{};
    }
    for (int64_t i = 0; i < N; ++i) {
      float* row = M + i * NP;
      const float dsai = dsa_t[i], sai = tsa[i], vi = tv[i], dyi = tdy[i];
#pragma GCC unroll 32
      for (int q = 0; q < NV; ++q) {
        V s = vload<V>(row + q * W);
        da[q] += dsai * s;
        s = s * w[q] + sai * bb[q] + vi * k[q];
        vstore(row + q * W, s);
        dr[q] += dyi * s;
      }
    }
#pragma GCC unroll 32
    for (int q = 0; q < NV; ++q) {
      vstore(o1 + q * W, dr[q]);
      vstore(o2 + q * W, da[q]);
    }
    store_row<W>(p.dr, bf, o, N, o1);
    store_row<W>(p.da, bf, o, N, o2);
    const float* __restrict x_t = x_all + t * NP;
    for (int64_t j = 0; j < N; ++j) {
      const double c = run[j] - static_cast<double>(ta[j] * o2[j]);  // - Y_t
      o3[j] = static_cast<float>(c);
      run[j] = c + static_cast<double>(x_t[j] - tr[j] * o1[j]);  // + X_t, for the tokens after t
    }
    store_row<W>(p.dlogw, bf, o, N, o3);
  }
}

}  // namespace

namespace {

// ------------------------------------------------------------ dispatch
using TaskFn = void (*)(const Args&, int64_t, float*);

template <int NV>
void forward_base(const Args& p, int64_t task, float* buf) { forward_task<4, NV>(p, task, buf); }
template <int NV>
void backward_base(const Args& p, int64_t task, float* buf) { backward_task<4, NV>(p, task, buf); }
#if RK7_X86
template <int NV>
__attribute__((target("avx2,fma"))) void forward_avx2(const Args& p, int64_t task, float* buf) {
  forward_task<8, NV>(p, task, buf);
}
template <int NV>
__attribute__((target("avx2,fma"))) void backward_avx2(const Args& p, int64_t task, float* buf) {
  backward_task<8, NV>(p, task, buf);
}
template <int NV>
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))) void forward_avx512(const Args& p, int64_t task, float* buf) {
  forward_task<16, NV>(p, task, buf);
}
template <int NV>
__attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))) void backward_avx512(const Args& p, int64_t task, float* buf) {
  backward_task<16, NV>(p, task, buf);
}
#endif

constexpr int64_t MAX_N = 128;

int g_isa = -1;  // -1 unset; 0 baseline ("scalar"), 1 AVX2, 2 AVX-512

int detect_isa() {
#if RK7_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

int isa() {
  if (g_isa < 0) g_isa = detect_isa();
  return g_isa;
}

int width() { return isa() == 2 ? 16 : isa() == 1 ? 8 : 4; }

// Vectors per padded row: the smallest power of two covering N.
int vectors_for(int64_t N) {
  int nv = 1;
  while (nv * width() < N) nv *= 2;
  return nv;
}

// The kernel for the chosen family and N (forward or backward).
TaskFn pick(int64_t N, bool fwd) {
  const int nv = vectors_for(N);
#define RK7_CASE(NV, F, B) \
  case NV: return fwd ? &F<NV> : &B<NV>;
#if RK7_X86
  if (isa() == 2) {
    switch (nv) { RK7_CASE(1, forward_avx512, backward_avx512) RK7_CASE(2, forward_avx512, backward_avx512)
                  RK7_CASE(4, forward_avx512, backward_avx512) RK7_CASE(8, forward_avx512, backward_avx512) }
  } else if (isa() == 1) {
    switch (nv) { RK7_CASE(1, forward_avx2, backward_avx2) RK7_CASE(2, forward_avx2, backward_avx2)
                  RK7_CASE(4, forward_avx2, backward_avx2) RK7_CASE(8, forward_avx2, backward_avx2)
                  RK7_CASE(16, forward_avx2, backward_avx2) }
  } else
#endif
  {
    switch (nv) { RK7_CASE(1, forward_base, backward_base) RK7_CASE(2, forward_base, backward_base)
                  RK7_CASE(4, forward_base, backward_base) RK7_CASE(8, forward_base, backward_base)
                  RK7_CASE(16, forward_base, backward_base) RK7_CASE(32, forward_base, backward_base) }
  }
#undef RK7_CASE
  throw std::invalid_argument("wkv7_cpu: head size " + std::to_string(N) + " is outside 1.." + std::to_string(MAX_N));
}

void run_tasks(const Args& p, TaskFn fn, bool backward) {
  at::parallel_for(0, p.B * p.H, 1, [&](int64_t begin, int64_t end) {
    Buffer buf(buffer_floats(p, backward));
    for (int64_t task = begin; task < end; ++task) fn(p, task, buf.p);
  });
}

template <class T>
T* P(int64_t x) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(x));
}

void check_sizes(int64_t B, int64_t T, int64_t H, int64_t N) {
  if (B < 0 || T < 0 || H < 0 || N < 1 || N > MAX_N)
    throw std::invalid_argument("wkv7_cpu: bad sizes B=" + std::to_string(B) + " T=" + std::to_string(T) +
                                " H=" + std::to_string(H) + " N=" + std::to_string(N) + " (N must be 1.." +
                                std::to_string(MAX_N) + ")");
}

// All tensors contiguous, checked by ops/wkv7/cpu.py; s0 and sa may be 0.
void forward(int bf16, int64_t B, int64_t T, int64_t H, int64_t N, int64_t r, int64_t logw, int64_t k, int64_t v,
             int64_t a, int64_t b, int64_t s0, int64_t y, int64_t sT, int64_t sa) {
  check_sizes(B, T, H, N);
  Args p{};
  p.r = P<const void>(r);
  p.logw = P<const void>(logw);
  p.k = P<const void>(k);
  p.v = P<const void>(v);
  p.a = P<const void>(a);
  p.b = P<const void>(b);
  p.s0 = P<const float>(s0);
  p.y = P<float>(y);
  p.sT = P<float>(sT);
  p.sa = P<float>(sa);
  p.B = B, p.T = T, p.H = H, p.N = N, p.bf16 = bf16;
  p.NP = vectors_for(N) * width();
  run_tasks(p, pick(N, true), false);
}

// sa from the forward; gy, gsT fp32; the six gradients in the inputs' dtype; ds0 fp32 or 0.
void backward(int bf16, int64_t B, int64_t T, int64_t H, int64_t N, int64_t r, int64_t logw, int64_t k, int64_t v,
              int64_t a, int64_t b, int64_t s0, int64_t sa, int64_t gy, int64_t gsT, int64_t dr, int64_t dlogw,
              int64_t dk, int64_t dv, int64_t da, int64_t db, int64_t ds0) {
  check_sizes(B, T, H, N);
  Args p{};
  p.r = P<const void>(r);
  p.logw = P<const void>(logw);
  p.k = P<const void>(k);
  p.v = P<const void>(v);
  p.a = P<const void>(a);
  p.b = P<const void>(b);
  p.s0 = P<const float>(s0);
  p.sa = P<float>(sa);
  p.gy = P<const float>(gy);
  p.gsT = P<const float>(gsT);
  p.dr = P<void>(dr);
  p.dlogw = P<void>(dlogw);
  p.dk = P<void>(dk);
  p.dv = P<void>(dv);
  p.da = P<void>(da);
  p.db = P<void>(db);
  p.ds0 = P<float>(ds0);
  p.B = B, p.T = T, p.H = H, p.N = N, p.bf16 = bf16;
  p.NP = vectors_for(N) * width();
  const TaskFn fn = pick(N, false);
  run_tasks(p, fn, true);
}

int set_isa(int want) {
  const int best = detect_isa();
  g_isa = (want < 0 || want > best) ? best : want;
  return g_isa;
}

int get_isa() { return isa(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "rwkvkit: the RWKV-7 WKV operator on the CPU (forward and backward scans)";
  m.def("forward", &forward, py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, py::call_guard<py::gil_scoped_release>());
  m.def("set_isa", &set_isa, "force a kernel family (0 baseline, 1 AVX2, 2 AVX-512; -1 the best); returns the one in use");
  m.def("get_isa", &get_isa);
  m.def("max_head_size", []() { return MAX_N; });
}
