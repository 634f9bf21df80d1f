// The RWKV-4 WKV operator on the CPU: forward and backward scans.
//
// One task per (batch row, block of CB channels); the channels of a block are
// the inner loop, contiguous in memory, so the compiler can vectorise it; time
// is the sequential middle loop.  The stable recurrence of spec 2.4 keeps every
// exponent <= 0.  The backward runs the forward again, keeping each step's
// incoming state in [B, T, C] scratch tensors (no compile-time length limit),
// then walks time backwards with scaled adjoints of the numerator and the
// denominator (derivation in ../NOTES.md, "Backward of the recurrence").

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t CB = 16;  // channels per task

// Forward scan over one block of channels [c0, c0 + n).  With SAVE, the state
// before each token goes to saa/sbb/spp and `arg` receives, per channel, the
// token whose log-weight is the final pp (-1: the carried-in state), which the
// backward needs to send the gradient of pp_out to the right input.
template <typename scalar_t, bool WRITE_Y, bool SAVE>
inline void scan_block(const scalar_t* __restrict w, const scalar_t* __restrict u,
                       const scalar_t* __restrict k, const scalar_t* __restrict v,
                       const scalar_t* __restrict aa_in, const scalar_t* __restrict bb_in,
                       const scalar_t* __restrict pp_in, scalar_t* __restrict y,
                       scalar_t* __restrict aa_out, scalar_t* __restrict bb_out,
                       scalar_t* __restrict pp_out, scalar_t* __restrict saa,
                       scalar_t* __restrict sbb, scalar_t* __restrict spp, int64_t* __restrict arg,
                       int64_t b, int64_t c0, int64_t n, int64_t T, int64_t C) {
  scalar_t aa[CB], bb[CB], pp[CB], ww_[CB], uu[CB];
  int64_t jj[CB];
  const int64_t s0 = b * C + c0;
  for (int64_t i = 0; i < n; ++i) {
    aa[i] = aa_in[s0 + i];
    bb[i] = bb_in[s0 + i];
    pp[i] = pp_in[s0 + i];
    ww_[i] = w[c0 + i];
    uu[i] = u[c0 + i];
    jj[i] = -1;
  }
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = (b * T + t) * C + c0;
    const scalar_t* kt = k + o;
    const scalar_t* vt = v + o;
_Pragma("omp simd")
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t kk = kt[i], vv = vt[i];
      if (SAVE) {
        saa[o + i] = aa[i];
        sbb[o + i] = bb[i];
        spp[o + i] = pp[i];
      }
      if (WRITE_Y) {
        const scalar_t x = uu[i] + kk;
        const scalar_t q = std::max(pp[i], x);
        const scalar_t e1 = std::exp(pp[i] - q);
        const scalar_t e2 = std::exp(x - q);
        y[o + i] = (e1 * aa[i] + e2 * vv) / (e1 * bb[i] + e2);
      }
      const scalar_t d = pp[i] + ww_[i];
      const scalar_t q = std::max(d, kk);
      const scalar_t e1 = std::exp(d - q);
      const scalar_t e2 = std::exp(kk - q);
      aa[i] = e1 * aa[i] + e2 * vv;
      bb[i] = e1 * bb[i] + e2;
      pp[i] = q;
      // A tie in floating point means the later token is (barely) the
      // larger one, since the earlier one has decayed for longer.
      if (SAVE) jj[i] = kk >= d ? t : jj[i];
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    aa_out[s0 + i] = aa[i];
    bb_out[s0 + i] = bb[i];
    pp_out[s0 + i] = pp[i];
    if (SAVE) arg[s0 + i] = jj[i];
  }
}

void check(const torch::Tensor& w, const torch::Tensor& u, const torch::Tensor& k,
           const torch::Tensor& v, const torch::Tensor& aa, const torch::Tensor& bb,
           const torch::Tensor& pp) {
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

std::vector<torch::Tensor> forward(torch::Tensor w, torch::Tensor u, torch::Tensor k,
                                   torch::Tensor v, torch::Tensor aa_in, torch::Tensor bb_in,
                                   torch::Tensor pp_in) {
  check(w, u, k, v, aa_in, bb_in, pp_in);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto y = torch::empty_like(k);
  auto aa = torch::empty_like(aa_in), bb = torch::empty_like(bb_in), pp = torch::empty_like(pp_in);
  const int64_t nb = (C + CB - 1) / CB;
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_cpu_forward", [&] {
    const scalar_t *pw = w.data_ptr<scalar_t>(), *pu = u.data_ptr<scalar_t>(),
                   *pk = k.data_ptr<scalar_t>(), *pv = v.data_ptr<scalar_t>(),
                   *pa = aa_in.data_ptr<scalar_t>(), *pb = bb_in.data_ptr<scalar_t>(),
                   *pq = pp_in.data_ptr<scalar_t>();
    scalar_t *py = y.data_ptr<scalar_t>(), *oa = aa.data_ptr<scalar_t>(),
             *ob = bb.data_ptr<scalar_t>(), *oq = pp.data_ptr<scalar_t>();
    at::parallel_for(0, B * nb, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nb, c0 = (task % nb) * CB;
        scan_block<scalar_t, true, false>(pw, pu, pk, pv, pa, pb, pq, py, oa, ob, oq, nullptr,
                                          nullptr, nullptr, nullptr, b, c0,
                                          std::min(CB, C - c0), T, C);
      }
    });
  });
  return {y, aa, bb, pp};
}

// Returns gw and gu as per-(b, c) partial sums [B, C] (the caller sums over
// b), then gk, gv [B, T, C] and the gradients of aa_in, bb_in, pp_in.
std::vector<torch::Tensor> backward(torch::Tensor w, torch::Tensor u, torch::Tensor k,
                                    torch::Tensor v, torch::Tensor aa_in, torch::Tensor bb_in,
                                    torch::Tensor pp_in, torch::Tensor gy, torch::Tensor gaa,
                                    torch::Tensor gbb, torch::Tensor gpp) {
  check(w, u, k, v, aa_in, bb_in, pp_in);
  check(w, u, gy, gy, gaa, gbb, gpp);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto saa = torch::empty_like(k), sbb = torch::empty_like(k), spp = torch::empty_like(k);
  auto gk = torch::empty_like(k), gv = torch::empty_like(k);
  auto gw = torch::empty_like(aa_in), gu = torch::empty_like(aa_in);
  auto ga_in = torch::empty_like(aa_in), gb_in = torch::empty_like(aa_in),
       gp_in = torch::empty_like(aa_in);
  auto aa_out = torch::empty_like(aa_in), bb_out = torch::empty_like(aa_in),
       pp_out = torch::empty_like(aa_in);
  auto arg = torch::empty({B, C}, k.options().dtype(torch::kInt64));
  const int64_t nb = (C + CB - 1) / CB;
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "wkv_cpu_backward", [&] {
    const scalar_t *pw = w.data_ptr<scalar_t>(), *pu = u.data_ptr<scalar_t>(),
                   *pk = k.data_ptr<scalar_t>(), *pv = v.data_ptr<scalar_t>(),
                   *pa = aa_in.data_ptr<scalar_t>(), *pb = bb_in.data_ptr<scalar_t>(),
                   *pq = pp_in.data_ptr<scalar_t>(), *pg = gy.data_ptr<scalar_t>(),
                   *pga = gaa.data_ptr<scalar_t>(), *pgb = gbb.data_ptr<scalar_t>(),
                   *pgp = gpp.data_ptr<scalar_t>();
    scalar_t *sa = saa.data_ptr<scalar_t>(), *sb = sbb.data_ptr<scalar_t>(),
             *sp = spp.data_ptr<scalar_t>(), *ok = gk.data_ptr<scalar_t>(),
             *ov = gv.data_ptr<scalar_t>(), *ow = gw.data_ptr<scalar_t>(),
             *ou = gu.data_ptr<scalar_t>(), *oa = ga_in.data_ptr<scalar_t>(),
             *ob = gb_in.data_ptr<scalar_t>(), *oq = gp_in.data_ptr<scalar_t>(),
             *fa = aa_out.data_ptr<scalar_t>(), *fb = bb_out.data_ptr<scalar_t>(),
             *fp = pp_out.data_ptr<scalar_t>();
    int64_t* parg = arg.data_ptr<int64_t>();
    at::parallel_for(0, B * nb, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nb, c0 = (task % nb) * CB;
        const int64_t n = std::min(CB, C - c0);
        scan_block<scalar_t, false, true>(pw, pu, pk, pv, pa, pb, pq, nullptr, fa, fb, fp, sa,
                                          sb, sp, parg, b, c0, n, T, C);
        // Scaled adjoints: ga = dL/da_t * exp(pp_t), likewise gb for the
        // denominator; they start as the gradients of aa_out and bb_out.
        scalar_t ga[CB], gb[CB], aw[CB], au[CB], ww_[CB], uu[CB];
        const int64_t s0 = b * C + c0;
        for (int64_t i = 0; i < n; ++i) {
          ga[i] = pga[s0 + i];
          gb[i] = pgb[s0 + i];
          aw[i] = 0;
          au[i] = 0;
          ww_[i] = pw[c0 + i];
          uu[i] = pu[c0 + i];
        }
        for (int64_t t = T - 1; t >= 0; --t) {
          const int64_t o = (b * T + t) * C + c0;
_Pragma("omp simd")
          for (int64_t i = 0; i < n; ++i) {
            const scalar_t a0 = sa[o + i], b0 = sb[o + i], p0 = sp[o + i];
            const scalar_t kk = pk[o + i], vv = pv[o + i], g = pg[o + i];
            // State update a_t = e^w a_{t-1} + e^{k_t} v_t (and b_t).
            const scalar_t d = p0 + ww_[i];
            const scalar_t q = std::max(d, kk);
            const scalar_t e1 = std::exp(d - q);
            const scalar_t e2 = std::exp(kk - q);
            aw[i] += e1 * (ga[i] * a0 + gb[i] * b0);
            scalar_t dk = e2 * (ga[i] * vv + gb[i]);
            scalar_t dv = e2 * ga[i];
            scalar_t na = e1 * ga[i], nbb = e1 * gb[i];
            // Output y_t = (a_{t-1} + e^{u+k_t} v_t) / (b_{t-1} + e^{u+k_t}).
            const scalar_t x = uu[i] + kk;
            const scalar_t q2 = std::max(p0, x);
            const scalar_t f1 = std::exp(p0 - q2);
            const scalar_t f2 = std::exp(x - q2);
            const scalar_t r = scalar_t(1) / (f1 * b0 + f2);
            const scalar_t yt = (f1 * a0 + f2 * vv) * r;
            const scalar_t gq = g * r;
            na += gq * f1;
            nbb -= gq * yt * f1;
            dv += gq * f2;
            const scalar_t du = gq * f2 * (vv - yt);
            dk += du;
            au[i] += du;
            ok[o + i] = dk;
            ov[o + i] = dv;
            ga[i] = na;
            gb[i] = nbb;
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          const int64_t s = s0 + i;
          oa[s] = ga[i];
          ob[s] = gb[i];
          oq[s] = ga[i] * pa[s] + gb[i] * pb[s];
          // pp_out is the largest decayed log-weight: aa_out and bb_out carry
          // exp(-pp_out), and pp_out itself moves with that one input.
          const scalar_t geff = pgp[s] - pga[s] * fa[s] - pgb[s] * fb[s];
          const int64_t j = parg[s];
          if (j < 0) {
            oq[s] += geff;
            aw[i] += geff * scalar_t(T);
          } else {
            ok[(b * T + j) * C + c0 + i] += geff;
            aw[i] += geff * scalar_t(T - 1 - j);
          }
          ow[s] = aw[i];
          ou[s] = au[i];
        }
      }
    });
  });
  return {gw, gu, gk, gv, ga_in, gb_in, gp_in};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "WKV forward: (w, u, k, v, aa, bb, pp) -> (y, aa, bb, pp)");
  m.def("backward", &backward,
        "WKV backward: (w, u, k, v, aa, bb, pp, gy, gaa, gbb, gpp) -> "
        "(gw[B,C], gu[B,C], gk, gv, gaa, gbb, gpp)");
}
