// Per-block scan kernels of wkv_cpu.cpp.  Included more than once, inside
// different namespaces and target options (baseline x86-64 and AVX2), so it
// has no include guard and includes nothing itself.

// Forward scan over the channels [c0, c0 + n) of batch row b.  With SAVE, the
// state before each token goes to a.saa/sbb/spp and a.arg receives, per
// channel, the token whose log-weight is the final pp (-1: the carried-in
// state): the backward sends the gradient of pp_out to that input.
template <typename scalar_t, bool WRITE_Y, bool SAVE>
void scan_block(const WkvArgs<scalar_t>& a, int64_t b, int64_t c0, int64_t n) {
  const int64_t T = a.T, C = a.C;
  scalar_t aa[CB], bb[CB], pp[CB], ww_[CB], uu[CB];
  int64_t jj[CB];
  const int64_t s0 = b * C + c0;
  for (int64_t i = 0; i < n; ++i) {
    aa[i] = a.aa_in[s0 + i];
    bb[i] = a.bb_in[s0 + i];
    pp[i] = a.pp_in[s0 + i];
    ww_[i] = a.w[c0 + i];
    uu[i] = a.u[c0 + i];
    jj[i] = -1;
  }
  const scalar_t* __restrict k = a.k;
  const scalar_t* __restrict v = a.v;
  scalar_t* __restrict y = a.y;
  scalar_t* __restrict saa = a.saa;
  scalar_t* __restrict sbb = a.sbb;
  scalar_t* __restrict spp = a.spp;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = (b * T + t) * C + c0;
    _Pragma("omp simd")
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t kk = k[o + i], vv = v[o + i];
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
    a.aa_out[s0 + i] = aa[i];
    a.bb_out[s0 + i] = bb[i];
    a.pp_out[s0 + i] = pp[i];
    if (SAVE) a.arg[s0 + i] = jj[i];
  }
}

template <typename scalar_t>
void forward_block(const WkvArgs<scalar_t>& a, int64_t b, int64_t c0, int64_t n) {
  scan_block<scalar_t, true, false>(a, b, c0, n);
}

// Gradients of one block: the forward again (saving each step's state), then
// time backwards with the scaled adjoints ga = dL/da_t * exp(pp_t) and gb (the
// same for the denominator), which start as the gradients of aa_out, bb_out.
template <typename scalar_t>
void backward_block(const WkvArgs<scalar_t>& a, int64_t b, int64_t c0, int64_t n) {
  scan_block<scalar_t, false, true>(a, b, c0, n);
  const int64_t T = a.T, C = a.C;
  scalar_t ga[CB], gb[CB], aw[CB], au[CB], ww_[CB], uu[CB];
  const int64_t s0 = b * C + c0;
  for (int64_t i = 0; i < n; ++i) {
    ga[i] = a.gaa[s0 + i];
    gb[i] = a.gbb[s0 + i];
    aw[i] = 0;
    au[i] = 0;
    ww_[i] = a.w[c0 + i];
    uu[i] = a.u[c0 + i];
  }
  const scalar_t* __restrict sa = a.saa;
  const scalar_t* __restrict sb = a.sbb;
  const scalar_t* __restrict sp = a.spp;
  const scalar_t* __restrict k = a.k;
  const scalar_t* __restrict v = a.v;
  const scalar_t* __restrict gy = a.gy;
  scalar_t* __restrict gk = a.gk;
  scalar_t* __restrict gv = a.gv;
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t o = (b * T + t) * C + c0;
    _Pragma("omp simd")
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t a0 = sa[o + i], b0 = sb[o + i], p0 = sp[o + i];
      const scalar_t kk = k[o + i], vv = v[o + i], g = gy[o + i];
      // State update a_t = e^w a_{t-1} + e^{k_t} v_t (and b_t).
      const scalar_t d = p0 + ww_[i];
      const scalar_t q = std::max(d, kk);
      const scalar_t e1 = std::exp(d - q);
      const scalar_t e2 = std::exp(kk - q);
      aw[i] += e1 * (ga[i] * a0 + gb[i] * b0);
      scalar_t dk = e2 * (ga[i] * vv + gb[i]);
      scalar_t dv = e2 * ga[i];
      scalar_t na = e1 * ga[i], nb = e1 * gb[i];
      // Output y_t = (a_{t-1} + e^{u+k_t} v_t) / (b_{t-1} + e^{u+k_t}).
      const scalar_t x = uu[i] + kk;
      const scalar_t q2 = std::max(p0, x);
      const scalar_t f1 = std::exp(p0 - q2);
      const scalar_t f2 = std::exp(x - q2);
      const scalar_t r = scalar_t(1) / (f1 * b0 + f2);
      const scalar_t yt = (f1 * a0 + f2 * vv) * r;
      const scalar_t gq = g * r;
      na += gq * f1;
      nb -= gq * yt * f1;
      dv += gq * f2;
      const scalar_t du = gq * f2 * (vv - yt);
      dk += du;
      au[i] += du;
      gk[o + i] = dk;
      gv[o + i] = dv;
      ga[i] = na;
      gb[i] = nb;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = s0 + i;
    a.ga_in[s] = ga[i];
    a.gb_in[s] = gb[i];
    a.gp_in[s] = ga[i] * a.aa_in[s] + gb[i] * a.bb_in[s];
    // pp_out is the largest decayed log-weight: aa_out and bb_out carry
    // exp(-pp_out), and pp_out itself moves with that one input.
    const scalar_t geff = a.gpp[s] - a.gaa[s] * a.aa_out[s] - a.gbb[s] * a.bb_out[s];
    const int64_t j = a.arg[s];
    if (j < 0) {
      a.gp_in[s] += geff;
      aw[i] += geff * scalar_t(T);
    } else {
      a.gk[(b * T + j) * C + c0 + i] += geff;
      aw[i] += geff * scalar_t(T - 1 - j);
    }
    a.gw[s] = aw[i];
    a.gu[s] = au[i];
  }
}
