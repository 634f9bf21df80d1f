// The RWKV-4 WKV operator on the CPU: forward and backward scans.
//
// One task per (batch row, block of CB channels); the channels of a block are
// the inner loop, contiguous in memory, so the compiler vectorises it (exp
// included, through glibc's vector math library); time is the sequential
// middle loop.  The stable recurrence of spec 2.4 keeps every exponent <= 0.
// The backward runs the forward again, keeping each step's incoming state in
// [B, T, C] scratch tensors (no compile-time length limit), then walks time
// backwards with scaled adjoints of the numerator and the denominator
// (derivation in ../NOTES.md, "Backward of the recurrence").
//
// The kernels (wkv_cpu_kernels.h) are compiled twice on x86-64: for the
// baseline ISA and for AVX2+FMA, picked at run time, so the cached build works
// on any x86-64 machine without -march=native.

// Narrow ATen headers instead of <torch/extension.h>: parsing the latter is
// most of the first build's time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t CB = 16;  // channels per task

template <typename scalar_t>
struct WkvArgs {
  const scalar_t *w, *u, *k, *v, *aa_in, *bb_in, *pp_in;  // inputs
  scalar_t *y, *aa_out, *bb_out, *pp_out;                  // forward outputs
  scalar_t *saa, *sbb, *spp;                               // backward scratch [B, T, C]
  int64_t* arg;                                            // backward scratch [B, C]
  const scalar_t *gy, *gaa, *gbb, *gpp;                    // upstream gradients
  scalar_t *gw, *gu, *gk, *gv, *ga_in, *gb_in, *gp_in;     // gradients
  int64_t B, T, C;
};

namespace base {
#include "wkv_cpu_kernels.h"
}  // namespace base

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "wkv_cpu_kernels.h"
}  // namespace avx2
#pragma GCC pop_options

bool has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
#else
bool has_avx2() { return false; }
#endif

template <typename scalar_t>
using BlockFn = void (*)(const WkvArgs<scalar_t>&, int64_t, int64_t, int64_t);

template <typename scalar_t>
void run_blocks(const WkvArgs<scalar_t>& a, BlockFn<scalar_t> fn) {
  const int64_t nb = (a.C + CB - 1) / CB;
  at::parallel_for(0, a.B * nb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / nb, c0 = (task % nb) * CB;
      fn(a, b, c0, std::min(CB, a.C - c0));
    }
  });
}

void check(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k,
           const at::Tensor& v, const at::Tensor& aa, const at::Tensor& bb,
           const at::Tensor& pp) {
  TORCH_CHECK(k.dim() == 3, "wkv_cpu: k must be [B, T, C]");
  const auto dt = k.scalar_type();
  for (const auto* x : {&w, &u, &k, &v, &aa, &bb, &pp}) {
    TORCH_CHECK(x->device().is_cpu(), "wkv_cpu: tensors must be on the CPU");
    TORCH_CHECK(x->is_contiguous(), "wkv_cpu: tensors must be contiguous");
    TORCH_CHECK(x->scalar_type() == dt, "wkv_cpu: all tensors must share one dtype");
  }
  TORCH_CHECK(v.sizes() == k.sizes(), "wkv_cpu: v must have k's shape");
  TORCH_CHECK(w.numel() == k.size(2) && u.numel() == k.size(2), "wkv_cpu: w, u must be [C]");
  for (const auto* x : {&aa, &bb, &pp})
    TORCH_CHECK(x->dim() == 2 && x->size(0) == k.size(0) && x->size(1) == k.size(2),
                "wkv_cpu: state tensors must be [B, C]");
}

template <typename scalar_t>
WkvArgs<scalar_t> inputs(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& aa,
                         const at::Tensor& bb, const at::Tensor& pp) {
  WkvArgs<scalar_t> a{};
  a.w = w.data_ptr<scalar_t>();
  a.u = u.data_ptr<scalar_t>();
  a.k = k.data_ptr<scalar_t>();
  a.v = v.data_ptr<scalar_t>();
  a.aa_in = aa.data_ptr<scalar_t>();
  a.bb_in = bb.data_ptr<scalar_t>();
  a.pp_in = pp.data_ptr<scalar_t>();
  a.B = k.size(0);
  a.T = k.size(1);
  a.C = k.size(2);
  return a;
}

std::vector<at::Tensor> forward(at::Tensor w, at::Tensor u, at::Tensor k,
                                   at::Tensor v, at::Tensor aa_in, at::Tensor bb_in,
                                   at::Tensor pp_in) {
  check(w, u, k, v, aa_in, bb_in, pp_in);
  auto y = at::empty_like(k);
  auto aa = at::empty_like(aa_in), bb = at::empty_like(bb_in), pp = at::empty_like(pp_in);
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_cpu_forward", [&] {
    auto a = inputs<scalar_t>(w, u, k, v, aa_in, bb_in, pp_in);
    a.y = y.data_ptr<scalar_t>();
    a.aa_out = aa.data_ptr<scalar_t>();
    a.bb_out = bb.data_ptr<scalar_t>();
    a.pp_out = pp.data_ptr<scalar_t>();
#if defined(__x86_64__) && defined(__GNUC__)
    if (has_avx2()) return run_blocks<scalar_t>(a, &avx2::forward_block<scalar_t>);
#endif
    run_blocks<scalar_t>(a, &base::forward_block<scalar_t>);
  });
  return {y, aa, bb, pp};
}

// Returns gw and gu as per-(b, c) partial sums [B, C] (the caller sums over
// b), then gk, gv [B, T, C] and the gradients of aa_in, bb_in, pp_in.
std::vector<at::Tensor> backward(at::Tensor w, at::Tensor u, at::Tensor k,
                                    at::Tensor v, at::Tensor aa_in, at::Tensor bb_in,
                                    at::Tensor pp_in, at::Tensor gy, at::Tensor gaa,
                                    at::Tensor gbb, at::Tensor gpp) {
  check(w, u, k, v, aa_in, bb_in, pp_in);
  check(w, u, gy, gy, gaa, gbb, gpp);
  const int64_t B = k.size(0), C = k.size(2);
  auto saa = at::empty_like(k), sbb = at::empty_like(k), spp = at::empty_like(k);
  auto gk = at::empty_like(k), gv = at::empty_like(k);
  auto gw = at::empty_like(aa_in), gu = at::empty_like(aa_in);
  auto ga_in = at::empty_like(aa_in), gb_in = at::empty_like(aa_in),
       gp_in = at::empty_like(aa_in);
  auto aa_out = at::empty_like(aa_in), bb_out = at::empty_like(aa_in),
       pp_out = at::empty_like(aa_in);
  auto arg = at::empty({B, C}, k.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_cpu_backward", [&] {
    auto a = inputs<scalar_t>(w, u, k, v, aa_in, bb_in, pp_in);
    a.aa_out = aa_out.data_ptr<scalar_t>();
    a.bb_out = bb_out.data_ptr<scalar_t>();
    a.pp_out = pp_out.data_ptr<scalar_t>();
    a.saa = saa.data_ptr<scalar_t>();
    a.sbb = sbb.data_ptr<scalar_t>();
    a.spp = spp.data_ptr<scalar_t>();
    a.arg = arg.data_ptr<int64_t>();
    a.gy = gy.data_ptr<scalar_t>();
    a.gaa = gaa.data_ptr<scalar_t>();
    a.gbb = gbb.data_ptr<scalar_t>();
    a.gpp = gpp.data_ptr<scalar_t>();
    a.gw = gw.data_ptr<scalar_t>();
    a.gu = gu.data_ptr<scalar_t>();
    a.gk = gk.data_ptr<scalar_t>();
    a.gv = gv.data_ptr<scalar_t>();
    a.ga_in = ga_in.data_ptr<scalar_t>();
    a.gb_in = gb_in.data_ptr<scalar_t>();
    a.gp_in = gp_in.data_ptr<scalar_t>();
#if defined(__x86_64__) && defined(__GNUC__)
    if (has_avx2()) return run_blocks<scalar_t>(a, &avx2::backward_block<scalar_t>);
#endif
    run_blocks<scalar_t>(a, &base::backward_block<scalar_t>);
  });
  return {gw, gu, gk, gv, ga_in, gb_in, gp_in};
}

bool uses_avx2() { return has_avx2(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "WKV forward: (w, u, k, v, aa, bb, pp) -> (y, aa, bb, pp)");
  m.def("backward", &backward,
        "WKV backward: (w, u, k, v, aa, bb, pp, gy, gaa, gbb, gpp) -> "
        "(gw[B,C], gu[B,C], gk, gv, gaa, gbb, gpp)");
  m.def("uses_avx2", &uses_avx2, "whether the AVX2 build of the kernels runs on this CPU");
}
