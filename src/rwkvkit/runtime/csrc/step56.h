// One RNN step of the whole RWKV-5 (5.0, 5.1, 5.2) or RWKV-6 model on the CPU.
//
// Not a standalone header: infer_cpu.cpp includes it once, inside its
// anonymous namespace, after the RWKV-7 step, and this file uses what is
// defined there (Lin, Job, run_jobs, the BlockFn kernels, layer_norm, the ISA
// choice).  It is a .h so that rwkvkit/_cbuild.py hashes it into the build
// folder's name with the .cpp (a change here means a fresh build).
//
// The maths is rwkvkit/models/rwkv5.py and rwkv6.py for T = 1 (spec 3.2, 3.3;
// the WKV step of rwkvkit/ops/wkv6 wkv6_step), with the same matrix-vector
// kernels, schedule and ISA choice as the RWKV-4 and RWKV-7 steps.  Per layer:
//
//   RWKV-5   LN1 and the token-shift mixes x*mu + x_prev*(1-mu) (k, v, r, and
//            g for 5.1/5.2); one pass over r, k, v and (5.1/5.2) the gate with
//            SiLU fused;
//   RWKV-6   LN1, delta = x_prev - x and x + delta*maa_x; the token-shift LoRA
//            tanh(. W1) as five jobs of D rows (one per block w, k, v, r, g,
//            each written to its own [B, D] buffer), its five W2 blocks, the
//            five ddlerp mixes x + delta*(maa_c + o_c); one pass over r, k, v,
//            the gate (SiLU) and the decay LoRA's first half (tanh); its second
//            half with w = exp(-exp(time_decay + y)) fused;
//   both     the per-head WKV update and GroupNorm (and gate) shared out over
//            (batch row, head); the output projection; LN2 and the channel
//            mix (RWKV-4's: relu^2 key, sigmoid receptance; RWKV-5 mixes as
//            x*mu + x_prev*(1-mu), RWKV-6 as x + delta*maa).
//
// The WKV state is S[key][value] per head (the transpose of RWKV-7's):
//   y[j] = sum_i r[i] S[i][j] + (sum_i r[i] u[i] k[i]) v[j],
//   S'[i][j] = w[i] S[i][j] + k[i] v[j].
// The decay w arrives as a factor: RWKV-5's exp(-exp(time_decay)) per channel
// is precomputed by infer_cpu.py (DecodePlan56), RWKV-6's is the epilogue of
// the decay LoRA.  The LoRA matrices arrive transposed ([out, in], made once by
// infer_cpu.py), so every product is a row-major matrix-vector product.

// Linears of the per-layer table, 5 slots each (the Python V56_LINEARS).
// MW1 is time_maa_w1^T [5D, C] (block c is rows c*D..(c+1)*D); MW2 is
// time_maa_w2 with each block transposed, [5, C, D] as one [5C, D] matrix.
// RWKV-5 has no MW1..DW2 (zero slots), 5.0 no G.
enum Lin56 { L56_R, L56_K, L56_V, L56_G, L56_O, L56_MW1, L56_MW2, L56_DW1, L56_DW2, L56_FK, L56_FR, L56_FV, L56_COUNT };

// Per-layer table written by infer_cpu.py (V56_SLOTS int64 each): fp32 vectors, then the linears.
enum Slot56 {
  V56_LN1_W, V56_LN1_B, V56_LN2_W, V56_LN2_B,
  V56_MIX_K, V56_MIX_V, V56_MIX_R, V56_MIX_G,  // RWKV-5 time_mix_*, RWKV-6 time_maa_* (G: 0 for 5.0)
  V56_MAA_X, V56_MAA_W,                        // RWKV-6 only
  V56_DECAY,  // RWKV-5: the decay factor w [A]; RWKV-6: time_decay [A] (the decay LoRA's bias)
  V56_U, V56_LNX_W, V56_LNX_B, V56_FFN_MK, V56_FFN_MR,
  V56_LIN0,
  V56_SLOTS = V56_LIN0 + L56_COUNT * 5,
};

// Rows [row0, row0 + n) of a linear (fp32 or 2-byte kinds: the LoRA copies).
inline Lin lin_rows(const Lin& L, int64_t row0, int64_t n) {
  const int64_t esz = L.kind == K_F32 ? 4 : L.kind == K_I8 ? 1 : 2;
  return Lin{static_cast<const char*>(L.w) + row0 * L.k * esz, L.scale ? L.scale + row0 : nullptr, n, L.k, L.kind};
}

// The per-head part for one batch row and one head (N channels): the WKV-5/6
// step, GroupNorm over the head, times the gate (g == nullptr: RWKV-5.0).
// S is the head's old state [N key][N value], So the new one; tmp holds N floats.
struct Head56 {
  const float *r, *k, *v, *w, *u, *g, *lnx_w, *lnx_b;
  const float* S;
  float* So;
  float* zg;
};

__attribute__((always_inline)) inline void head56_body(const Head56& h, int64_t N, float eps, float* __restrict tmp) {
  const float* __restrict r = h.r;
  const float* __restrict k = h.k;
  const float* __restrict v = h.v;
  float* __restrict y = tmp;
  float bonus = 0.f;
#pragma omp simd reduction(+ : bonus)
  for (int64_t i = 0; i < N; ++i) bonus += r[i] * h.u[i] * k[i];
  for (int64_t j = 0; j < N; ++j) y[j] = 0.f;
  // Row i of S is key channel i: y += r[i] S[i], S'[i] = w[i] S[i] + k[i] v.
  for (int64_t i = 0; i < N; ++i) {
    const float* __restrict Si = h.S + i * N;
    float* __restrict So = h.So + i * N;
    const float ri = r[i], ki = k[i], wi = h.w[i];
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
      const float s = Si[j];
      y[j] += ri * s;
      So[j] = s * wi + ki * v[j];
    }
  }
  for (int64_t j = 0; j < N; ++j) y[j] += bonus * v[j];
  // GroupNorm over the head (mean and variance in double: N is small).
  double m = 0.0;
  for (int64_t i = 0; i < N; ++i) m += y[i];
  m /= N;
  double var = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    const double d = y[i] - m;
    var += d * d;
  }
  const float rstd = static_cast<float>(1.0 / std::sqrt(var / N + eps));
  const float mf = static_cast<float>(m);
  for (int64_t i = 0; i < N; ++i) {
    const float z = (y[i] - mf) * rstd * h.lnx_w[i] + h.lnx_b[i];
    h.zg[i] = h.g ? z * h.g[i] : z;
  }
}

using Head56Fn = void (*)(const Head56&, int64_t, float, float*);
void head56_scalar(const Head56& h, int64_t N, float eps, float* tmp) { head56_body(h, N, eps, tmp); }
#if RK_X86
__attribute__((target("avx2,fma"))) void head56_avx2(const Head56& h, int64_t N, float eps, float* tmp) {
  head56_body(h, N, eps, tmp);
}
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void head56_avx512(const Head56& h, int64_t N, float eps,
                                                                            float* tmp) {
  head56_body(h, N, eps, tmp);
}
#endif

Head56Fn head56_fn() {
  if (g_isa < 0) g_isa = detect_isa();
#if RK_X86
  if (g_isa == 2) return head56_avx512;
  if (g_isa == 1) return head56_avx2;
#endif
  return head56_scalar;
}

// v6: 0 for RWKV-5.x, 1 for RWKV-6.  x [B, C] (embedded tokens; overwritten),
// states [L, B, C] / [L, B, H, N, N] in and out, logits [B, V] or 0.
void step56(int64_t table, int64_t v6, int64_t n_layer, int64_t B, int64_t C, int64_t A, int64_t H, int64_t N,
            int64_t x_p, int64_t ax_in, int64_t kv_in, int64_t fx_in, int64_t ax_out, int64_t kv_out, int64_t fx_out,
            int64_t lnout_w, int64_t lnout_b, int64_t head_tab, int64_t logits_p, double eps_ln_d, double eps_gn_d) {
  if (H * N != A) throw std::invalid_argument("step56: n_head * head_size != dim_att");
  const int64_t* tab = P<const int64_t>(table);
  float* x = P<float>(x_p);
  const float eps = static_cast<float>(eps_ln_d), eps_gn = static_cast<float>(eps_gn_d);
  std::vector<Lin> lins(static_cast<size_t>(n_layer) * L56_COUNT);
  int64_t Dm = 0, Dd = 0, Fd = 0;
  for (int64_t l = 0; l < n_layer; ++l) {
    Lin* LL = &lins[l * L56_COUNT];
    for (int j = 0; j < L56_COUNT; ++j) LL[j] = read_lin(tab + l * V56_SLOTS + V56_LIN0 + j * 5);
    if (v6) {
      if (LL[L56_MW1].n % 5 || LL[L56_MW2].n != 5 * C || LL[L56_MW2].k * 5 != LL[L56_MW1].n)
        throw std::invalid_argument("step56: time_maa_w1 / time_maa_w2 shapes do not agree");
      Dm = std::max(Dm, LL[L56_MW1].n / 5);
      Dd = std::max(Dd, LL[L56_DW1].n);
    }
    Fd = std::max(Fd, LL[L56_FK].n);
  }
  const Lin head = head_tab ? read_lin(P<const int64_t>(head_tab)) : Lin{nullptr, nullptr, 0, 0, 0};

  // Scratch [B, *]: a, dx, xx (maa_x mix), xw, xk, xv, xr, xg, out, rf, h (11 C);
  // the five token-shift LoRA middles [5][B][Dm] and outputs [5][B][C]; r, k,
  // v, g, w, zg (6 A); the decay LoRA's middle; the channel mix's hidden.
  std::vector<float> buf(static_cast<size_t>(B) * (11 * C + 5 * Dm + 5 * C + 6 * A + Dd + Fd));
  float* p = buf.data();
  auto take = [&](int64_t n) {
    float* q = p;
    p += B * n;
    return q;
  };
  float *a = take(C), *dx = take(C), *xx = take(C), *xw = take(C), *xk = take(C), *xv = take(C), *xr = take(C);
  float *xg = take(C), *out = take(C), *rf = take(C), *hbuf = take(C);
  float *mm = take(5 * Dm), *oo = take(5 * C);
  float *r = take(A), *k = take(A), *v = take(A), *g = take(A), *w = take(A), *zg = take(A);
  float *ld = take(Dd), *kf = take(Fd);

  const BlockFn fn = block_fn();
  const Head56Fn hfn = head56_fn();
  const int nt = std::max(1, at::get_num_threads());

#pragma omp parallel num_threads(nt)
  {
    std::vector<float> tmp(static_cast<size_t>(N));
    for (int64_t l = 0; l < n_layer; ++l) {
      const int64_t* t = tab + l * V56_SLOTS;
      const Lin* LL = &lins[l * L56_COUNT];
      const bool gated = LL[L56_G].w != nullptr;
      const float *mk = P<const float>(t[V56_MIX_K]), *mv = P<const float>(t[V56_MIX_V]),
                  *mr = P<const float>(t[V56_MIX_R]), *mg = P<const float>(t[V56_MIX_G]);
      const float* wdec = P<const float>(t[V56_DECAY]);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        float* ab = a + b * C;
        layer_norm(x + b * C, P<const float>(t[V56_LN1_W]), P<const float>(t[V56_LN1_B]), ab, C, eps);
        const float* prev = P<const float>(ax_in) + (l * B + b) * C;
        if (v6) {
          const float* mx = P<const float>(t[V56_MAA_X]);
          for (int64_t i = 0; i < C; ++i) {
            const float cur = ab[i], d = prev[i] - cur;
            dx[b * C + i] = d;
            xx[b * C + i] = cur + d * mx[i];
          }
        } else {
          for (int64_t i = 0; i < C; ++i) {
            const float cur = ab[i], pv = prev[i];
            const int64_t o = b * C + i;
            xk[o] = cur * mk[i] + pv * (1.f - mk[i]);
            xv[o] = cur * mv[i] + pv * (1.f - mv[i]);
            xr[o] = cur * mr[i] + pv * (1.f - mr[i]);
            if (gated) xg[o] = cur * mg[i] + pv * (1.f - mg[i]);
          }
        }
        std::memcpy(P<float>(ax_out) + (l * B + b) * C, ab, C * sizeof(float));
      }
      if (v6) {
        const int64_t D = LL[L56_MW1].n / 5;
        Lin w1[5], w2[5];
        for (int c = 0; c < 5; ++c) {
          w1[c] = lin_rows(LL[L56_MW1], c * D, D);
          w2[c] = lin_rows(LL[L56_MW2], c * C, C);
        }
        {
          const Job jobs[5] = {
              {&w1[0], xx, mm, ACT_TANH},             {&w1[1], xx, mm + B * D, ACT_TANH},
              {&w1[2], xx, mm + 2 * B * D, ACT_TANH}, {&w1[3], xx, mm + 3 * B * D, ACT_TANH},
              {&w1[4], xx, mm + 4 * B * D, ACT_TANH},
          };
          run_jobs(jobs, 5, B, fn);
        }
        {
          const Job jobs[5] = {
              {&w2[0], mm, oo, ACT_NONE},
              {&w2[1], mm + B * D, oo + B * C, ACT_NONE},
              {&w2[2], mm + 2 * B * D, oo + 2 * B * C, ACT_NONE},
              {&w2[3], mm + 3 * B * D, oo + 3 * B * C, ACT_NONE},
              {&w2[4], mm + 4 * B * D, oo + 4 * B * C, ACT_NONE},
          };
          run_jobs(jobs, 5, B, fn);
        }
        // ddlerp: x_c = x + delta * (maa_c + o_c), blocks in the order w, k, v, r, g.
        const float* mw = P<const float>(t[V56_MAA_W]);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; ++b) {
          const float *ab = a + b * C, *db = dx + b * C;
          const float *ow = oo + b * C, *ok = ow + B * C, *ov = ok + B * C, *orr = ov + B * C, *og = orr + B * C;
          for (int64_t i = 0; i < C; ++i) {
            const float cur = ab[i], d = db[i];
            const int64_t o = b * C + i;
            xw[o] = cur + d * (mw[i] + ow[i]);
            xk[o] = cur + d * (mk[i] + ok[i]);
            xv[o] = cur + d * (mv[i] + ov[i]);
            xr[o] = cur + d * (mr[i] + orr[i]);
            xg[o] = cur + d * (mg[i] + og[i]);
          }
        }
        {
          const Job jobs[5] = {
              {&LL[L56_R], xr, r, ACT_NONE},  {&LL[L56_K], xk, k, ACT_NONE},      {&LL[L56_V], xv, v, ACT_NONE},
              {&LL[L56_G], xg, g, ACT_SILU},  {&LL[L56_DW1], xw, ld, ACT_TANH},
          };
          run_jobs(jobs, 5, B, fn);
        }
        {
          const Job jobs[1] = {{&LL[L56_DW2], ld, w, ACT_DECAY, wdec}};
          run_jobs(jobs, 1, B, fn);
        }
      } else {
        const Job jobs[4] = {
            {&LL[L56_R], xr, r, ACT_NONE}, {&LL[L56_K], xk, k, ACT_NONE},
            {&LL[L56_V], xv, v, ACT_NONE}, {&LL[L56_G], xg, g, ACT_SILU},
        };
        run_jobs(jobs, gated ? 4 : 3, B, fn);
      }
#pragma omp for schedule(static)
      for (int64_t job = 0; job < B * H; ++job) {
        const int64_t b = job / H, hh = job % H, o = b * A + hh * N;
        const int64_t so = ((l * B + b) * H + hh) * N * N;
        Head56 hd;
        hd.r = r + o;
        hd.k = k + o;
        hd.v = v + o;
        hd.w = v6 ? w + o : wdec + hh * N;
        hd.u = P<const float>(t[V56_U]) + hh * N;
        hd.g = gated ? g + o : nullptr;
        hd.lnx_w = P<const float>(t[V56_LNX_W]) + hh * N;
        hd.lnx_b = P<const float>(t[V56_LNX_B]) + hh * N;
        hd.S = P<const float>(kv_in) + so;
        hd.So = P<float>(kv_out) + so;
        hd.zg = zg + o;
        hfn(hd, N, eps_gn, tmp.data());
      }
      {
        const Job jobs[1] = {{&LL[L56_O], zg, out, ACT_NONE}};
        run_jobs(jobs, 1, B, fn);
      }
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        float* xb = x + b * C;
        for (int64_t i = 0; i < C; ++i) xb[i] += out[b * C + i];
        float* bn = a + b * C;
        layer_norm(xb, P<const float>(t[V56_LN2_W]), P<const float>(t[V56_LN2_B]), bn, C, eps);
        const float* prev = P<const float>(fx_in) + (l * B + b) * C;
        const float *fk = P<const float>(t[V56_FFN_MK]), *fr = P<const float>(t[V56_FFN_MR]);
        for (int64_t i = 0; i < C; ++i) {
          const float cur = bn[i], pv = prev[i];
          const int64_t o = b * C + i;
          if (v6) {
            const float d = pv - cur;
            xk[o] = cur + d * fk[i];
            xr[o] = cur + d * fr[i];
          } else {
            xk[o] = cur * fk[i] + pv * (1.f - fk[i]);
            xr[o] = cur * fr[i] + pv * (1.f - fr[i]);
          }
        }
        std::memcpy(P<float>(fx_out) + (l * B + b) * C, bn, C * sizeof(float));
      }
      {
        const Job jobs[2] = {{&LL[L56_FK], xk, kf, ACT_RELU_SQ}, {&LL[L56_FR], xr, rf, ACT_SIGMOID}};
        run_jobs(jobs, 2, B, fn);
      }
      {
        const Job jobs[1] = {{&LL[L56_FV], kf, out, ACT_NONE}};
        run_jobs(jobs, 1, B, fn);
      }
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        float* xb = x + b * C;
        for (int64_t i = 0; i < C; ++i) xb[i] += rf[b * C + i] * out[b * C + i];
      }
    }
    if (logits_p) {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b)
        layer_norm(x + b * C, P<const float>(lnout_w), P<const float>(lnout_b), hbuf + b * C, C, eps);
      const Job jobs[1] = {{&head, hbuf, P<float>(logits_p), ACT_NONE}};
      run_jobs(jobs, 1, B, fn);
    }
  }
}

int layer_slots56() { return V56_SLOTS; }
