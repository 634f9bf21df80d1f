// Per-(batch row, head) scan kernels of wkv6_cpu.cpp.  Included once per SIMD
// family, inside a namespace that first defines
//
//   V        the vector type (float itself for the scalar family),
//   VW       its number of lanes,
//   bc(s)    a V with every lane s,
//   hsum(x)  the sum of x's lanes,
//
// and under that family's target options, so this file has no include guard
// and includes nothing itself.  The caller picks a family whose VW divides N
// and a chunk CH (vectors handled per pass) with CH * VW dividing N, so there
// are no tails.  All arithmetic is fp32; a * b + c contracts to an FMA
// (-ffp-contract=fast).

inline V ld(const float* p) {
  V x;
  __builtin_memcpy(&x, p, sizeof(V));
  return x;
}

inline void st(float* p, V x) { __builtin_memcpy(p, &x, sizeof(V)); }

// sum_i a[i] b[i] c[i] (c may be null: sum_i a[i] b[i]), VW lanes then across them.
inline float dot(const float* __restrict a, const float* __restrict b, const float* __restrict c, int64_t N) {
  V acc = bc(0.f);
  for (int64_t i = 0; i < N; i += VW) acc += c ? ld(a + i) * ld(b + i) * ld(c + i) : ld(a + i) * ld(b + i);
  return hsum(acc);
}

// dst[j * N + i] = src[i * N + j].
inline void transpose(const float* __restrict src, float* __restrict dst, int64_t N) {
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < N; ++j) dst[j * N + i] = src[i * N + j];
}

// Forward of one (b, h): S[i][j] (i key, j value) in `S` (N * N scratch),
// vectors over the value channel j, so y needs no reduction across lanes:
//
//   y_t[j] = (r_t . (u * k_t)) v_t[j] + sum_i r_t[i] S[i][j],
//   S[i][j] <- S[i][j] w_t[i] + k_t[i] v_t[j]      (the old S feeds y_t)
//
// With a.K > 0 the state before tokens 0, K, 2K, ... goes to a.ckpt.
template <int CH>
void forward_head(const Args& a, int64_t b, int64_t h, float* __restrict S, float*, float*) {
  const int64_t N = a.N, T = a.T, H = a.H, NN = N * N, bh = b * H + h;
  if (a.s0)
    __builtin_memcpy(S, a.s0 + bh * NN, NN * sizeof(float));
  else
    for (int64_t x = 0; x < NN; ++x) S[x] = 0.f;
  const float* __restrict u = a.u + h * N;
  const int64_t nseg = a.K > 0 ? (T + a.K - 1) / a.K : 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = ((b * T + t) * H + h) * N;
    const float* __restrict r = a.r + o;
    const float* __restrict k = a.k + o;
    const float* __restrict v = a.v + o;
    const float* __restrict w = a.w + b * a.wsB + t * a.wsT + h * a.wsH;
    if (nseg && t % a.K == 0) __builtin_memcpy(a.ckpt + (bh * nseg + t / a.K) * NN, S, NN * sizeof(float));
    const float bonus = dot(r, u, k, N);
    float* __restrict y = a.y + o;
    for (int64_t j0 = 0; j0 < N; j0 += CH * VW) {
      V acc[CH], vv[CH];
      const V bo = bc(bonus);
#pragma GCC unroll 8
      for (int c = 0; c < CH; ++c) {
        vv[c] = ld(v + j0 + c * VW);
        acc[c] = bo * vv[c];
      }
      float* __restrict row = S + j0;
      for (int64_t i = 0; i < N; ++i, row += N) {
        const V ri = bc(r[i]), wi = bc(w[i]), ki = bc(k[i]);
#pragma GCC unroll 8
        for (int c = 0; c < CH; ++c) {
          const V s = ld(row + c * VW);
          acc[c] += ri * s;
          st(row + c * VW, s * wi + ki * vv[c]);
        }
      }
#pragma GCC unroll 8
      for (int c = 0; c < CH; ++c) st(y + j0 + c * VW, acc[c]);
    }
  }
  __builtin_memcpy(a.sT + bh * NN, S, NN * sizeof(float));
}

// Backward of one (b, h), in the transposed layout X[j * N + i] = X[i][j]
// (vectors over the key channel i), where of the five contractions only dv
// needs a sum across lanes.  G (in D) is dL/dS_t, the final state's gradient
// at the start; walking t down:
//
//   dr_t[i] = sum_j S_{t-1}[i][j] gy_t[j] + u[i] k_t[i] (v_t . gy_t)
//   dk_t[i] = sum_j G[i][j] v_t[j]        + r_t[i] u[i] (v_t . gy_t)
//   dv_t[j] = sum_i k_t[i] G[i][j]        + (r_t . (u * k_t)) gy_t[j]
//   dlogw_t[i] = w_t[i] sum_j G[i][j] S_{t-1}[i][j]
//   du[i]  += r_t[i] k_t[i] (v_t . gy_t)
//   G[i][j] <- w_t[i] G[i][j] + r_t[i] gy_t[j]       (now dL/dS_{t-1})
//
// S_{t-1} comes from the checkpoint before each K-token segment, run forward
// again into P (K states, K * N * N scratch), then read backwards.  G ends as
// the gradient of the initial state.  dvs: N floats of scratch.
template <int CH>
void backward_head(const Args& a, int64_t b, int64_t h, float* __restrict D, float* __restrict P,
                   float* __restrict dvs) {
  const int64_t N = a.N, T = a.T, H = a.H, NN = N * N, K = a.K, bh = b * H + h;
  const int64_t nseg = (T + K - 1) / K;
  const float* __restrict u = a.u + h * N;
  transpose(a.gsT + bh * NN, D, N);
  float* __restrict du = a.du + bh * N;
  for (int64_t i = 0; i < N; ++i) du[i] = 0.f;
  for (int64_t seg = nseg - 1; seg >= 0; --seg) {
    const int64_t t0 = seg * K, len = std::min(K, T - t0);
    // P[tl] = the state before token t0 + tl.
    transpose(a.ckpt + (bh * nseg + seg) * NN, P, N);
    for (int64_t tl = 1; tl < len; ++tl) {
      const int64_t o = ((b * T + t0 + tl - 1) * H + h) * N;
      const float* __restrict k = a.k + o;
      const float* __restrict v = a.v + o;
      const float* __restrict w = a.w + b * a.wsB + (t0 + tl - 1) * a.wsT + h * a.wsH;
      const float* __restrict prev = P + (tl - 1) * NN;
      float* __restrict cur = P + tl * NN;
      for (int64_t i0 = 0; i0 < N; i0 += CH * VW) {
        V wi[CH], ki[CH];
#pragma GCC unroll 8
        for (int c = 0; c < CH; ++c) {
          wi[c] = ld(w + i0 + c * VW);
          ki[c] = ld(k + i0 + c * VW);
        }
        for (int64_t j = 0; j < N; ++j) {
          const V vj = bc(v[j]);
          const int64_t x = j * N + i0;
#pragma GCC unroll 8
          for (int c = 0; c < CH; ++c) st(cur + x + c * VW, ld(prev + x + c * VW) * wi[c] + vj * ki[c]);
        }
      }
    }
    for (int64_t tl = len - 1; tl >= 0; --tl) {
      const int64_t t = t0 + tl, o = ((b * T + t) * H + h) * N;
      const float* __restrict r = a.r + o;
      const float* __restrict k = a.k + o;
      const float* __restrict v = a.v + o;
      const float* __restrict gy = a.gy + o;
      const float* __restrict w = a.w + b * a.wsB + t * a.wsT + h * a.wsH;
      const float* __restrict Sp = P + tl * NN;
      const float vg = dot(v, gy, nullptr, N), bonus = dot(r, u, k, N);
      const V vgv = bc(vg);
      for (int64_t i0 = 0; i0 < N; i0 += CH * VW) {
        V rr[CH], ww[CH], kk[CH], adr[CH], adw[CH], adk[CH];
#pragma GCC unroll 8
        for (int c = 0; c < CH; ++c) {
          rr[c] = ld(r + i0 + c * VW);
          ww[c] = ld(w + i0 + c * VW);
          kk[c] = ld(k + i0 + c * VW);
          adr[c] = adw[c] = adk[c] = bc(0.f);
        }
        for (int64_t j = 0; j < N; ++j) {
          const V g = bc(gy[j]), vj = bc(v[j]);
          const int64_t x = j * N + i0;
          V pv = bc(0.f);
#pragma GCC unroll 8
          for (int c = 0; c < CH; ++c) {
            const V s = ld(Sp + x + c * VW), d = ld(D + x + c * VW);
            adr[c] += s * g;
            adw[c] += d * s;
            adk[c] += d * vj;
            pv += kk[c] * d;
            st(D + x + c * VW, d * ww[c] + rr[c] * g);
          }
          const float p = hsum(pv);
          dvs[j] = i0 == 0 ? p : dvs[j] + p;
        }
#pragma GCC unroll 8
        for (int c = 0; c < CH; ++c) {
          const int64_t i = i0 + c * VW;
          const V uu = ld(u + i), rb = rr[c] * vgv;
          st(a.dr + o + i, adr[c] + uu * kk[c] * vgv);
          st(a.dk + o + i, adk[c] + rb * uu);
          st(a.dlw + o + i, ww[c] * adw[c]);
          st(du + i, ld(du + i) + rb * kk[c]);
        }
      }
      for (int64_t j = 0; j < N; ++j) a.dv[o + j] = dvs[j] + bonus * gy[j];
    }
  }
  if (a.ds0) transpose(D, a.ds0 + bh * NN, N);
}

inline HeadFn pick_forward(int ch) {
  switch (ch) {
    case 8: return &forward_head<8>;
    case 4: return &forward_head<4>;
    case 2: return &forward_head<2>;
    default: return &forward_head<1>;
  }
}

inline HeadFn pick_backward(int ch) {
  switch (ch) {
    case 8: return &backward_head<8>;
    case 4: return &backward_head<4>;
    case 2: return &backward_head<2>;
    default: return &backward_head<1>;
  }
}
