// The RWKV-5/6 WKV operator on the CPU: sequential scans, forward and backward.
//
// Per (batch row b, head h), with S[i][j] (i key channel, j value channel):
//
//   y_t = S_{t-1}^T r_t + (r_t . (u * k_t)) v_t,   S_t = diag(w_t) S_{t-1} + k_t v_t^T.
//
// One task per (b, h), run by at::parallel_for; the N x N state stays in a
// private buffer (16 KiB for N = 64: L1), time is the sequential outer loop,
// and the N channels are SIMD lanes.  Nothing is ever exponentiated here: w
// comes in as exp(logw) <= 1 (computed by the caller with torch.exp), so
// decays near 0 and near 1 are just multiplications.  fp32 throughout.
//
// The backward needs S_{t-1} at every token while its adjoint runs backwards.
// The forward (when a gradient is wanted) saves the state before every K-th
// token; the backward re-runs each K-token segment from its checkpoint into a
// K-state scratch and walks it backwards (wkv6_cpu_kernels.h; the maths and
// the memory cost in ../wkv6/NOTES.md).
//
// SIMD families, picked at run time: AVX-512 (16 lanes), AVX2+FMA (8) and a
// portable scalar one; the kernels (wkv6_cpu_kernels.h) are compiled once per
// family under its target options, so one cached build runs on any x86-64
// machine without -march=native.  A family is used only where its width
// divides N (else the next narrower one).  set_isa() forces a family so the
// tests run every one the CPU has.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <optional>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define RK6_X86 1
#include <immintrin.h>
#else
#define RK6_X86 0
#endif

namespace {

struct Args {
  const float *r, *k, *v, *w, *u, *s0;  // r, k, v [B, T, H, N]; w strided (last dim 1); u [H, N]; s0 [B, H, N, N] or null
  int64_t wsB, wsT, wsH;                // strides of w, in elements (0 where logw is broadcast)
  float *y, *sT, *ckpt;                 // forward outputs; ckpt [B, H, ceil(T / K), N, N] or null
  const float *gy, *gsT;                // upstream gradients
  float *dr, *dk, *dv, *dlw, *du, *ds0;  // du [B, H, N] partial sums; ds0 may be null
  int64_t B, T, H, N, K;
};

// (args, b, h, scratch N*N, scratch K*N*N, scratch N)
using HeadFn = void (*)(const Args&, int64_t, int64_t, float*, float*, float*);

namespace base {
typedef float V;
constexpr int VW = 1;
inline V bc(float s) { return s; }
inline float hsum(V x) { return x; }
#include "wkv6_cpu_kernels.h"
}  // namespace base

#if RK6_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
typedef float V __attribute__((vector_size(32)));
constexpr int VW = 8;
inline V bc(float s) { return (V)_mm256_set1_ps(s); }
inline float hsum(V x) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128((__m256)x), _mm256_extractf128_ps((__m256)x, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
#include "wkv6_cpu_kernels.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
namespace avx512 {
typedef float V __attribute__((vector_size(64)));
constexpr int VW = 16;
inline V bc(float s) { return (V)_mm512_set1_ps(s); }
inline float hsum(V x) { return _mm512_reduce_add_ps((__m512)x); }
#include "wkv6_cpu_kernels.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

// 0 scalar, 1 AVX2, 2 AVX-512; -1 until first asked.
int g_isa = -1;

int detect_isa() {
#if RK6_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

int get_isa() {
  if (g_isa < 0) g_isa = detect_isa();
  return g_isa;
}

// Force a family (-1 or one the CPU lacks: the best it has); returns the one in use.
int set_isa(int isa) {
  const int best = detect_isa();
  g_isa = (isa < 0 || isa > best) ? best : isa;
  return g_isa;
}

constexpr int kWidth[3] = {1, 8, 16};

// The family used for head size N: the forced/best one, stepped down until
// its width divides N; and the chunk (vectors per pass) for the kernels.
std::pair<int, int> choose(int64_t N) {
  int isa = get_isa();
  while (isa > 0 && N % kWidth[isa] != 0) --isa;
  const int64_t nv = N / kWidth[isa];
  int ch = isa == 0 ? 8 : 4;
  while (nv % ch != 0) ch /= 2;
  return {isa, ch};
}

HeadFn pick(bool fwd, int64_t N) {
  const auto [isa, ch] = choose(N);
#if RK6_X86
  if (isa == 2) return fwd ? avx512::pick_forward(ch) : avx512::pick_backward(ch);
  if (isa == 1) return fwd ? avx2::pick_forward(ch) : avx2::pick_backward(ch);
#endif
  return fwd ? base::pick_forward(ch) : base::pick_backward(ch);
}

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

std::unique_ptr<float, FreeDeleter> scratch(int64_t n) {
  const size_t bytes = ((size_t)std::max<int64_t>(n, 1) * sizeof(float) + 63) / 64 * 64;
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  TORCH_CHECK(p != nullptr, "wkv6_cpu: could not allocate ", bytes, " bytes of scratch");
  return std::unique_ptr<float, FreeDeleter>(p);
}

void run(const Args& a, HeadFn fn, int64_t scratch_p) {
  at::parallel_for(0, a.B * a.H, 1, [&](int64_t begin, int64_t end) {
    auto s1 = scratch(a.N * a.N), s2 = scratch(scratch_p), s3 = scratch(a.N);
    for (int64_t task = begin; task < end; ++task) fn(a, task / a.H, task % a.H, s1.get(), s2.get(), s3.get());
  });
}

void check_f32(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "wkv6_cpu: ", name, " must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "wkv6_cpu: ", name, " must be float32, got ", x.scalar_type());
}

// Shared checks; fills the input pointers and sizes of an Args.
Args inputs(const at::Tensor& r, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
            const at::Tensor& u) {
  TORCH_CHECK(r.dim() == 4, "wkv6_cpu: r must be [B, T, H, N], got ", r.sizes());
  for (auto [x, name] : {std::pair{&r, "r"}, {&k, "k"}, {&v, "v"}, {&w, "w"}, {&u, "u"}}) check_f32(*x, name);
  for (auto [x, name] : {std::pair{&r, "r"}, {&k, "k"}, {&v, "v"}}) {
    TORCH_CHECK(x->sizes() == r.sizes(), "wkv6_cpu: ", name, " must have r's shape ", r.sizes(), ", got ", x->sizes());
    TORCH_CHECK(x->is_contiguous(), "wkv6_cpu: ", name, " must be contiguous");
  }
  TORCH_CHECK(w.sizes() == r.sizes(), "wkv6_cpu: w must have r's shape ", r.sizes(), " (a broadcast view is fine), got ",
              w.sizes());
  TORCH_CHECK(w.stride(3) == 1 || w.size(3) == 1, "wkv6_cpu: w must be contiguous along N");
  Args a{};
  a.B = r.size(0);
  a.T = r.size(1);
  a.H = r.size(2);
  a.N = r.size(3);
  TORCH_CHECK(u.is_contiguous() && u.dim() == 2 && u.size(0) == a.H && u.size(1) == a.N,
              "wkv6_cpu: u must be a contiguous [H, N] = [", a.H, ", ", a.N, "], got ", u.sizes());
  a.r = r.data_ptr<float>();
  a.k = k.data_ptr<float>();
  a.v = v.data_ptr<float>();
  a.w = w.data_ptr<float>();
  a.u = u.data_ptr<float>();
  a.wsB = w.stride(0);
  a.wsT = w.stride(1);
  a.wsH = w.stride(2);
  return a;
}

void check_state(const at::Tensor& s, const Args& a, const char* name) {
  check_f32(s, name);
  TORCH_CHECK(s.is_contiguous() && s.dim() == 4 && s.size(0) == a.B && s.size(1) == a.H && s.size(2) == a.N &&
                  s.size(3) == a.N,
              "wkv6_cpu: ", name, " must be a contiguous [B, H, N, N] = [", a.B, ", ", a.H, ", ", a.N, ", ", a.N,
              "], got ", s.sizes());
}

// (y [B, T, H, N], final state [B, H, N, N], checkpoints [B, H, ceil(T / K), N, N]; empty if K == 0).
std::vector<at::Tensor> forward(at::Tensor r, at::Tensor k, at::Tensor v, at::Tensor w, at::Tensor u,
                                std::optional<at::Tensor> s0, int64_t K) {
  Args a = inputs(r, k, v, w, u);
  TORCH_CHECK(K >= 0, "wkv6_cpu: the checkpoint interval K must be >= 0, got ", K);
  if (s0) {
    check_state(*s0, a, "state");
    a.s0 = s0->data_ptr<float>();
  }
  a.K = K;
  auto y = at::empty({a.B, a.T, a.H, a.N}, r.options());
  auto sT = at::empty({a.B, a.H, a.N, a.N}, r.options());
  const int64_t nseg = K > 0 ? (a.T + K - 1) / K : 0;
  auto ckpt = at::empty({a.B, a.H, nseg, a.N, a.N}, r.options());
  a.y = y.data_ptr<float>();
  a.sT = sT.data_ptr<float>();
  a.ckpt = K > 0 ? ckpt.data_ptr<float>() : nullptr;
  if (a.B * a.H > 0) run(a, pick(true, a.N), 1);
  return {y, sT, ckpt};
}

// (dr, dk, dv, dlogw [B, T, H, N], du [B, H, N] (to be summed over B), dstate [B, H, N, N] or empty).
std::vector<at::Tensor> backward(at::Tensor r, at::Tensor k, at::Tensor v, at::Tensor w, at::Tensor u,
                                 at::Tensor ckpt, at::Tensor gy, at::Tensor gsT, int64_t K, bool want_ds0) {
  Args a = inputs(r, k, v, w, u);
  TORCH_CHECK(K > 0, "wkv6_cpu: the checkpoint interval K must be > 0, got ", K);
  TORCH_CHECK(a.T > 0, "wkv6_cpu: backward needs T > 0");
  a.K = K;
  const int64_t nseg = (a.T + K - 1) / K;
  check_f32(ckpt, "checkpoints");
  TORCH_CHECK(ckpt.is_contiguous() && ckpt.dim() == 5 && ckpt.size(0) == a.B && ckpt.size(1) == a.H &&
                  ckpt.size(2) == nseg && ckpt.size(3) == a.N && ckpt.size(4) == a.N,
              "wkv6_cpu: checkpoints must be [B, H, ceil(T / K), N, N], got ", ckpt.sizes());
  check_f32(gy, "grad of y");
  TORCH_CHECK(gy.sizes() == r.sizes() && gy.is_contiguous(), "wkv6_cpu: grad of y must be contiguous like r");
  check_state(gsT, a, "grad of the final state");
  a.ckpt = ckpt.data_ptr<float>();
  a.gy = gy.data_ptr<float>();
  a.gsT = gsT.data_ptr<float>();
  auto dr = at::empty_like(r), dk = at::empty_like(r), dv = at::empty_like(r), dlw = at::empty_like(r);
  auto du = at::empty({a.B, a.H, a.N}, r.options());
  auto ds0 = at::empty({want_ds0 ? a.B : 0, a.H, a.N, a.N}, r.options());
  a.dr = dr.data_ptr<float>();
  a.dk = dk.data_ptr<float>();
  a.dv = dv.data_ptr<float>();
  a.dlw = dlw.data_ptr<float>();
  a.du = du.data_ptr<float>();
  a.ds0 = want_ds0 ? ds0.data_ptr<float>() : nullptr;
  if (a.B * a.H > 0) run(a, pick(false, a.N), K * a.N * a.N);
  return {dr, dk, dv, dlw, du, ds0};
}

// The family and chunk that head size N would use now: (isa, vectors per pass).
std::pair<int, int> plan(int64_t N) { return choose(N); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rwkvkit: RWKV-5/6 WKV scans on the CPU (forward, backward)";
  m.def("forward", &forward, "(r, k, v, w, u, state or None, K) -> (y, final state, checkpoints every K tokens)");
  m.def("backward", &backward,
        "(r, k, v, w, u, checkpoints, gy, g_state, K, want_dstate) -> (dr, dk, dv, dlogw, du[B,H,N], dstate)");
  m.def("set_isa", &set_isa, "force a SIMD family: 0 scalar, 1 AVX2, 2 AVX-512, -1 the best; returns the one in use");
  m.def("get_isa", &get_isa, "the SIMD family in use: 0 scalar, 1 AVX2, 2 AVX-512");
  m.def("plan", &plan, "(family, vectors per pass) used for head size N (the family steps down until its width divides N)");
}
