// One RNN step (T = 1) of the whole RWKV-4 / -5 / -6 / -7 model on the CPU, with
// fp32, int8, bf16 or fp16 weight matrices (2-byte weights are read as they
// are stored and widened to fp32 in registers: fp32 accumulation throughout).
//
// Decoding one token reads every weight matrix once and does ~2 FLOPs per
// weight, so it is bound by memory bandwidth; what costs beyond that is
// per-operator overhead (Python, dispatcher, allocation, thread fork/join).
// This file removes the overhead: one call runs all layers and the head in a
// single OpenMP region, the matrix-vector products are split by rows over the
// threads, and the element-wise work (LayerNorm, token-shift mixes, the WKV
// recurrence of spec 2.4, activations) is fused around them.  The maths is
// that of rwkvkit/model.py; only the fp32 summation order differs.  RWKV-5 and
// RWKV-6 share one step (step56, in step56.h, included after RWKV-7's).
//
// Only pybind11 and ATen/Parallel.h are included, not torch/extension.h:
// tensors arrive as raw pointers (checked on the Python side, infer_cpu.py),
// which keeps the first build at a few seconds.  The SIMD kernels are compiled
// for AVX-512, AVX2 and plain C++ and chosen at run time, so no -march flag is
// needed and a shared build cache stays valid on another CPU.

#include <ATen/Parallel.h>
#include <omp.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define RK_X86 1
#else
#define RK_X86 0
#endif

namespace {

// A linear layer as the Python side describes it: W [n, k] row-major, of kind
// K_F32 (fp32), K_I8 (int8 with one fp32 scale per output row), K_BF16 or
// K_F16 (2-byte weights; the products are accumulated in fp32).
struct Lin {
  const void* w;
  const float* scale;
  int64_t n, k, kind;
};

enum Kind { K_F32 = 0, K_I8 = 1, K_BF16 = 2, K_F16 = 3 };

template <int KIND>
constexpr int elem_size() {
  return KIND == K_F32 ? 4 : KIND == K_I8 ? 1 : 2;
}

// Epilogues of a matrix-vector job.  TANH, SIGMOID_BIAS and LOGW are RWKV-7's
// LoRA activations; LOGW is its log-decay -exp(-0.5) * sigmoid(bias + y).
// SILU (y sigmoid(y)) is RWKV-5/6's gate, DECAY RWKV-6's decay factor
// exp(-exp(bias + y)).
enum Act {
  ACT_NONE = 0, ACT_SIGMOID = 1, ACT_RELU_SQ = 2, ACT_TANH = 3, ACT_SIGMOID_BIAS = 4, ACT_LOGW = 5,
  ACT_SILU = 6, ACT_DECAY = 7,
};

// How the weights are read.  One core reaches the memory bandwidth only with
// several long linear streams in flight: reading 512 MiB here, one stream per
// thread ran at 0.83 of torch.mv's rate, four at 0.97, sixteen at 1.0.  Rows
// of a decode-sized matrix are short (3 KB for an fp32 row of 768, 768 bytes
// in int8), so KR consecutive rows per kernel call are KR short streams that
// the hardware prefetchers keep losing.  Instead run_jobs gives each thread
// one contiguous stretch of each matrix and reads it as KR streams starting
// at the stretch's KR-th points: kernel call m takes rows m, m + S, m + 2 S,
// ... (S = stretch / KR), so every stream moves forward linearly one row per
// call, with a software prefetch PF_DIST bytes ahead in each.  Against
// KR = 4 consecutive rows per call with one linear prefetch of the next four
// (the previous scheme), paired runs on the RWKV-7 0.1B shape decoded 1.22x
// (fp32), 1.33x (bf16) and 1.28x (int8) faster, RWKV-6 24x1024 1.26x, 1.34x,
// 1.32x.  The macros are build-time knobs for
// benchmarks/bench_decode_kernels.py, which measured these choices.
#ifndef RK_KR
#define RK_KR 8
#endif
#ifndef RK_CH
#define RK_CH 16
#endif
#ifndef RK_PF_DIST
#define RK_PF_DIST 512
#endif
#ifndef RK_PF_HINT
#define RK_PF_HINT _MM_HINT_T0
#endif
constexpr int KR = RK_KR;  // row streams per thread and matrix: rows per kernel call
constexpr int64_t CH = RK_CH;  // rows each stream advances per pass over the batch tiles
constexpr int64_t PF_DIST = RK_PF_DIST;  // bytes ahead in each row stream
constexpr int BT = 4;  // batch rows per kernel call (its accumulators: rows x batch rows registers)
constexpr int64_t WKV_CHUNK = 128;  // channels per task of the element-wise WKV step

// out[r * BT + b] = dot(W row (row0 + r * rs), x row b) for r < nr, b < nb.
using BlockFn = void (*)(const Lin&, int64_t row0, int64_t rs, int nr, const float* x, int64_t ldx, int nb,
                         float* out);

// ---------------------------------------------------------------- scalar
// Exact conversions of the 2-byte formats to fp32 (every bf16 and fp16 value,
// subnormals, infinities and NaNs included, is a float).
inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t ex = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (ex == 0) {
    const float f = std::ldexp(static_cast<float>(man), -24);  // zero or subnormal
    return sign ? -f : f;
  }
  if (ex == 31) bits = sign | 0x7f800000u | (man << 13);
  else bits = sign | ((ex + 112u) << 23) | (man << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <int KIND>
inline float weight_at(const void* W, int64_t j) {
  if (KIND == K_F32) return static_cast<const float*>(W)[j];
  if (KIND == K_I8) return static_cast<float>(static_cast<const int8_t*>(W)[j]);
  if (KIND == K_BF16) return bf16_to_float(static_cast<const uint16_t*>(W)[j]);
  return half_to_float(static_cast<const uint16_t*>(W)[j]);
}

template <int KIND>
void block_scalar_t(const Lin& L, int64_t row0, int64_t rs, int nr, const float* x, int64_t ldx, int nb, float* out) {
  for (int r = 0; r < nr; ++r) {
    for (int b = 0; b < nb; ++b) {
      const float* xb = x + b * ldx;
      const int64_t base = (row0 + r * rs) * L.k;
      float s = 0.f;
      for (int64_t i = 0; i < L.k; ++i) s += weight_at<KIND>(L.w, base + i) * xb[i];
      out[r * BT + b] = s;
    }
  }
}

void block_scalar(const Lin& L, int64_t row0, int64_t rs, int nr, const float* x, int64_t ldx, int nb, float* out) {
  switch (L.kind) {
    case K_I8: block_scalar_t<K_I8>(L, row0, rs, nr, x, ldx, nb, out); break;
    case K_BF16: block_scalar_t<K_BF16>(L, row0, rs, nr, x, ldx, nb, out); break;
    case K_F16: block_scalar_t<K_F16>(L, row0, rs, nr, x, ldx, nb, out); break;
    default: block_scalar_t<K_F32>(L, row0, rs, nr, x, ldx, nb, out); break;
  }
}

#if RK_X86
// ---------------------------------------------------------------- AVX-512
// 16 weights as fp32.  bf16 is the top half of an fp32, so widening is a
// zero-extension and a 16-bit shift (exact); fp16 goes through vcvtph2ps (exact).
template <int KIND>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) inline __m512 load16(const void* base, int64_t off, __mmask16 m) {
  if (KIND == K_I8) {
    const __m128i q = _mm_maskz_loadu_epi8(m, static_cast<const int8_t*>(base) + off);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
  }
  if (KIND == K_BF16) {
    const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + off);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  if (KIND == K_F16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(base) + off));
  return _mm512_maskz_loadu_ps(m, static_cast<const float*>(base) + off);
}

// Unmasked form for whole 16-element chunks: the load folds into the conversion.
template <int KIND>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) inline __m512 load16_full(const void* base, int64_t off) {
  if (KIND == K_I8) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(base) + off));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
  }
  if (KIND == K_BF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + off));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  if (KIND == K_F16)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + off)));
  return _mm512_loadu_ps(static_cast<const float*>(base) + off);
}

// GCC keeps the accumulators in registers only with a flat array, restrict
// pointers and fully unrolled inner loops (else it stores them every step).
#define RK_UNROLL _Pragma("GCC unroll 16")

template <int KIND, int NR, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void block512_t(const Lin& L, int64_t row0, int64_t rs,
                                                                         const float* __restrict x, int64_t ldx,
                                                                         float* __restrict out) {
  const int64_t K = L.k;
  const void* W = L.w;
  constexpr int ESZ = elem_size<KIND>();
  // 16 weights per vector; SUB vectors make one 64-byte line of each row.
  constexpr int SUB = 64 / (16 * ESZ) > 0 ? 64 / (16 * ESZ) : 1;
  __m512 acc[NR * NB];
  RK_UNROLL for (int j = 0; j < NR * NB; ++j) acc[j] = _mm512_setzero_ps();
  int64_t base[NR];
  RK_UNROLL for (int r = 0; r < NR; ++r) base[r] = (row0 + r * rs) * K;
  int64_t i = 0;
  // Each row continues linearly into the next row of its stream, so one
  // prefetch per line and row, PF_DIST bytes ahead, runs ahead of the stream
  // across row ends.
  for (; i + 16 * SUB <= K; i += 16 * SUB) {
    RK_UNROLL for (int r = 0; r < NR; ++r)
      _mm_prefetch(static_cast<const char*>(W) + (base[r] + i) * ESZ + PF_DIST, RK_PF_HINT);
    RK_UNROLL for (int q = 0; q < SUB; ++q) {
      __m512 w[NR];
      RK_UNROLL for (int r = 0; r < NR; ++r) w[r] = load16_full<KIND>(W, base[r] + i + 16 * q);
      RK_UNROLL for (int b = 0; b < NB; ++b) {
        const __m512 xv = _mm512_loadu_ps(x + b * ldx + i + 16 * q);
        RK_UNROLL for (int r = 0; r < NR; ++r) acc[r * NB + b] = _mm512_fmadd_ps(w[r], xv, acc[r * NB + b]);
      }
    }
  }
  for (; i + 16 <= K; i += 16) {
    __m512 w[NR];
    RK_UNROLL for (int r = 0; r < NR; ++r) w[r] = load16_full<KIND>(W, base[r] + i);
    RK_UNROLL for (int b = 0; b < NB; ++b) {
      const __m512 xv = _mm512_loadu_ps(x + b * ldx + i);
      RK_UNROLL for (int r = 0; r < NR; ++r) acc[r * NB + b] = _mm512_fmadd_ps(w[r], xv, acc[r * NB + b]);
    }
  }
  if (i < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - i)) - 1u);
    __m512 w[NR];
    RK_UNROLL for (int r = 0; r < NR; ++r) w[r] = load16<KIND>(W, base[r] + i, m);
    RK_UNROLL for (int b = 0; b < NB; ++b) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + b * ldx + i);
      RK_UNROLL for (int r = 0; r < NR; ++r) acc[r * NB + b] = _mm512_fmadd_ps(w[r], xv, acc[r * NB + b]);
    }
  }
  RK_UNROLL for (int r = 0; r < NR; ++r) {
    RK_UNROLL for (int b = 0; b < NB; ++b) out[r * BT + b] = _mm512_reduce_add_ps(acc[r * NB + b]);
  }
}

template <int KIND, int NR>
void block512_nb(const Lin& L, int64_t row0, int64_t rs, const float* x, int64_t ldx, int nb, float* out) {
  switch (nb) {
    case 1: block512_t<KIND, NR, 1>(L, row0, rs, x, ldx, out); break;
    case 2: block512_t<KIND, NR, 2>(L, row0, rs, x, ldx, out); break;
    case 3: block512_t<KIND, NR, 3>(L, row0, rs, x, ldx, out); break;
    default: block512_t<KIND, NR, 4>(L, row0, rs, x, ldx, out); break;
  }
}

template <int KIND>
void block512_rows(const Lin& L, int64_t row0, int64_t rs, int nr, const float* x, int64_t ldx, int nb, float* out) {
  int r = 0;
  // Eight rows at once while their accumulators fit in the 32 registers
  // (nb <= 2), else four; every weight is loaded once per batch tile either way.
  if (nb <= 2)
    for (; r + 8 <= nr; r += 8) block512_nb<KIND, 8>(L, row0 + r * rs, rs, x, ldx, nb, out + r * BT);
  for (; r + 4 <= nr; r += 4) block512_nb<KIND, 4>(L, row0 + r * rs, rs, x, ldx, nb, out + r * BT);
  for (; r < nr; ++r) block512_nb<KIND, 1>(L, row0 + r * rs, rs, x, ldx, nb, out + r * BT);
}

void block_avx512(const Lin& L, int64_t row0, int64_t rs, int nr, const float* x, int64_t ldx, int nb, float* out) {
  switch (L.kind) {
    case K_I8: block512_rows<K_I8>(L, row0, rs, nr, x, ldx, nb, out); break;
    case K_BF16: block512_rows<K_BF16>(L, row0, rs, nr, x, ldx, nb, out); break;
    case K_F16: block512_rows<K_F16>(L, row0, rs, nr, x, ldx, nb, out); break;
    default: block512_rows<K_F32>(L, row0, rs, nr, x, ldx, nb, out); break;
  }
}

// ------------------------------------------------- AVX-512 BF16 dot products
// bf16 weights with vdpbf16ps: 32 weights per instruction against the
// activations rounded to bf16 (vcvtne2ps2bf16, round to nearest even), fp32
// accumulation.  Faster in the core, but it rounds the activations as well as
// the weights (a relative error of up to 2^-9 per product); opt-in, see
// set_bf16_dot and infer_cpu.py.
#define RK_BF16_TARGET "avx512f,avx512bw,avx512vl,avx512bf16,fma"

template <int NR, int NB>
__attribute__((target(RK_BF16_TARGET))) void block512dp_t(const Lin& L, int64_t row0, int64_t rs, const float* __restrict x,
                                                          int64_t ldx, float* __restrict out) {
  const int64_t K = L.k;
  const uint16_t* W = static_cast<const uint16_t*>(L.w);
  __m512 acc[NR * NB];
  RK_UNROLL for (int j = 0; j < NR * NB; ++j) acc[j] = _mm512_setzero_ps();
  int64_t base[NR];
  RK_UNROLL for (int r = 0; r < NR; ++r) base[r] = (row0 + r * rs) * K;
  int64_t i = 0;
  for (; i + 32 <= K; i += 32) {  // 32 weights = one line of each row
    RK_UNROLL for (int r = 0; r < NR; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(W + base[r] + i) + PF_DIST, RK_PF_HINT);
    __m512i w[NR];
    RK_UNROLL for (int r = 0; r < NR; ++r) w[r] = _mm512_loadu_si512(W + base[r] + i);
    RK_UNROLL for (int b = 0; b < NB; ++b) {
      const float* xb = x + b * ldx + i;
      const __m512bh xv = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xb + 16), _mm512_loadu_ps(xb));
      RK_UNROLL for (int r = 0; r < NR; ++r) acc[r * NB + b] = _mm512_dpbf16_ps(acc[r * NB + b], (__m512bh)w[r], xv);
    }
  }
  if (i < K) {
    const int rem = static_cast<int>(K - i);
    const __mmask32 mw = static_cast<__mmask32>((1ull << rem) - 1ull);
    const __mmask16 mlo = static_cast<__mmask16>(rem >= 16 ? 0xffffu : (1u << rem) - 1u);
    const __mmask16 mhi = static_cast<__mmask16>(rem > 16 ? (1u << (rem - 16)) - 1u : 0u);
    __m512i w[NR];
    RK_UNROLL for (int r = 0; r < NR; ++r) w[r] = _mm512_maskz_loadu_epi16(mw, W + base[r] + i);
    RK_UNROLL for (int b = 0; b < NB; ++b) {
      const float* xb = x + b * ldx + i;
      const __m512bh xv = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(mhi, xb + 16), _mm512_maskz_loadu_ps(mlo, xb));
      RK_UNROLL for (int r = 0; r < NR; ++r) acc[r * NB + b] = _mm512_dpbf16_ps(acc[r * NB + b], (__m512bh)w[r], xv);
    }
  }
  RK_UNROLL for (int r = 0; r < NR; ++r) {
    RK_UNROLL for (int b = 0; b < NB; ++b) out[r * BT + b] = _mm512_reduce_add_ps(acc[r * NB + b]);
  }
}

template <int NR>
void block512dp_nb(const Lin& L, int64_t row0, int64_t rs, const float* x, int64_t ldx, int nb, float* out) {
  switch (nb) {
    case 1: block512dp_t<NR, 1>(L, row0, rs, x, ldx, out); break;
    case 2: block512dp_t<NR, 2>(L, row0, rs, x, ldx, out); break;
    case 3: block512dp_t<NR, 3>(L, row0, rs, x, ldx, out); break;
    default: block512dp_t<NR, 4>(L, row0, rs, x, ldx, out); break;
  }
}

void block_avx512_dp(const Lin& L, int64_t row0, int64_t rs, int nr, const float* x, int64_t ldx, int nb, float* out) {
  if (L.kind != K_BF16) return block_avx512(L, row0, rs, nr, x, ldx, nb, out);
  int r = 0;
  if (nb <= 2)
    for (; r + 8 <= nr; r += 8) block512dp_nb<8>(L, row0 + r * rs, rs, x, ldx, nb, out + r * BT);
  for (; r + 4 <= nr; r += 4) block512dp_nb<4>(L, row0 + r * rs, rs, x, ldx, nb, out + r * BT);
  for (; r < nr; ++r) block512dp_nb<1>(L, row0 + r * rs, rs, x, ldx, nb, out + r * BT);
}

// ---------------------------------------------------------------- AVX2
// (F16C comes with every AVX2 CPU; detect_isa checks it anyway.)
#define RK_AVX2_TARGET "avx2,fma,f16c"

template <int KIND>
__attribute__((target(RK_AVX2_TARGET))) inline __m256 load8(const void* base, int64_t off) {
  if (KIND == K_I8) {
    const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(base) + off));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
  }
  if (KIND == K_BF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + off));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  if (KIND == K_F16)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + off)));
  return _mm256_loadu_ps(static_cast<const float*>(base) + off);
}

__attribute__((target(RK_AVX2_TARGET))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int KIND, int NR, int NB>
__attribute__((target(RK_AVX2_TARGET))) void block256_t(const Lin& L, int64_t row0, int64_t rs, const float* __restrict x,
                                                        int64_t ldx, float* __restrict out) {
  const int64_t K = L.k;
  const void* W = L.w;
  __m256 acc[NR * NB];
  RK_UNROLL for (int j = 0; j < NR * NB; ++j) acc[j] = _mm256_setzero_ps();
  // Row streams with a prefetch per line, as in block512_t.
  constexpr int ESZ = elem_size<KIND>();
  constexpr int SUB = 64 / (8 * ESZ);  // 8-weight vectors per line: 2 (fp32), 4 (2-byte), 8 (int8)
  int64_t base[NR];
  RK_UNROLL for (int r = 0; r < NR; ++r) base[r] = (row0 + r * rs) * K;
  int64_t i = 0;
  for (; i + 8 * SUB <= K; i += 8 * SUB) {
    RK_UNROLL for (int r = 0; r < NR; ++r)
      _mm_prefetch(static_cast<const char*>(W) + (base[r] + i) * ESZ + PF_DIST, RK_PF_HINT);
    RK_UNROLL for (int q = 0; q < SUB; ++q) {
      __m256 w[NR];
      RK_UNROLL for (int r = 0; r < NR; ++r) w[r] = load8<KIND>(W, base[r] + i + 8 * q);
      RK_UNROLL for (int b = 0; b < NB; ++b) {
        const __m256 xv = _mm256_loadu_ps(x + b * ldx + i + 8 * q);
        RK_UNROLL for (int r = 0; r < NR; ++r) acc[r * NB + b] = _mm256_fmadd_ps(w[r], xv, acc[r * NB + b]);
      }
    }
  }
  for (; i + 8 <= K; i += 8) {
    __m256 w[NR];
    RK_UNROLL for (int r = 0; r < NR; ++r) w[r] = load8<KIND>(W, base[r] + i);
    RK_UNROLL for (int b = 0; b < NB; ++b) {
      const __m256 xv = _mm256_loadu_ps(x + b * ldx + i);
      RK_UNROLL for (int r = 0; r < NR; ++r) acc[r * NB + b] = _mm256_fmadd_ps(w[r], xv, acc[r * NB + b]);
    }
  }
  RK_UNROLL for (int r = 0; r < NR; ++r) {
    RK_UNROLL for (int b = 0; b < NB; ++b) {
      float s = hsum256(acc[r * NB + b]);
      const float* xb = x + b * ldx;
      for (int64_t j = i; j < K; ++j) s += weight_at<KIND>(W, base[r] + j) * xb[j];
      out[r * BT + b] = s;
    }
  }
}

template <int KIND, int NR>
void block256_nb(const Lin& L, int64_t row0, int64_t rs, const float* x, int64_t ldx, int nb, float* out) {
  switch (nb) {
    case 1: block256_t<KIND, NR, 1>(L, row0, rs, x, ldx, out); break;
    case 2: block256_t<KIND, NR, 2>(L, row0, rs, x, ldx, out); break;
    case 3: block256_t<KIND, NR, 3>(L, row0, rs, x, ldx, out); break;
    default: block256_t<KIND, NR, 4>(L, row0, rs, x, ldx, out); break;
  }
}

template <int KIND>
void block256_rows(const Lin& L, int64_t row0, int64_t rs, int nr, const float* x, int64_t ldx, int nb, float* out) {
  int r = 0;
  for (; r + 4 <= nr; r += 4) block256_nb<KIND, 4>(L, row0 + r * rs, rs, x, ldx, nb, out + r * BT);  // 16 registers
  for (; r < nr; ++r) block256_nb<KIND, 1>(L, row0 + r * rs, rs, x, ldx, nb, out + r * BT);
}

void block_avx2(const Lin& L, int64_t row0, int64_t rs, int nr, const float* x, int64_t ldx, int nb, float* out) {
  switch (L.kind) {
    case K_I8: block256_rows<K_I8>(L, row0, rs, nr, x, ldx, nb, out); break;
    case K_BF16: block256_rows<K_BF16>(L, row0, rs, nr, x, ldx, nb, out); break;
    case K_F16: block256_rows<K_F16>(L, row0, rs, nr, x, ldx, nb, out); break;
    default: block256_rows<K_F32>(L, row0, rs, nr, x, ldx, nb, out); break;
  }
}
#endif  // RK_X86

int g_isa = -1;  // -1 unset; 0 scalar, 1 AVX2, 2 AVX-512
int g_bf16_dot = 0;  // 1: bf16 matrices through vdpbf16ps (AVX-512 family, CPU with AVX512-BF16 only)

int detect_isa() {
#if RK_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return 2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return 1;
#endif
  return 0;
}

bool cpu_has_bf16_dot() {
#if RK_X86
  __builtin_cpu_init();
  return detect_isa() == 2 && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

BlockFn block_fn() {
  if (g_isa < 0) g_isa = detect_isa();
#if RK_X86
  if (g_isa == 2) return g_bf16_dot ? block_avx512_dp : block_avx512;
  if (g_isa == 1) return block_avx2;
#endif
  return block_scalar;
}

inline float sigmoidf(float x) { return 1.f / (1.f + std::exp(-x)); }

// exp(-0.5) as a float: RWKV-7's decay is w = exp(-exp(-0.5) * sigmoid(w_hat)).
constexpr float DECAY_SCALE = 0.60653065971263342f;

inline float act7(int act, float v) {
  if (act == ACT_TANH) return std::tanh(v);
  if (act == ACT_SIGMOID_BIAS) return sigmoidf(v);
  if (act == ACT_LOGW) return -DECAY_SCALE * sigmoidf(v);
  if (act == ACT_SILU) return v * sigmoidf(v);
  return std::exp(-std::exp(v));  // ACT_DECAY
}

// A matrix-vector job: y[B, n] = act(x[B, k] @ W^T) (int8: times the row scales).
struct Job {
  const Lin* L;
  const float* x;
  float* y;
  int act;
  const float* bias = nullptr;  // per output row, added before the activation (RWKV-7's w0, a0, v0)
};

// Runs inside an OpenMP parallel region.  The rows of all jobs are laid end
// to end and cut into one contiguous stretch per thread of (nearly) equal
// bytes, so a phase costs one barrier and no thread waits on another's larger
// matrices.  Within a thread's rows of a matrix, the KR row streams start at
// its quarter points: each stream is then one long linear read (the whole
// head matrix: ~50 MB per stream), the pattern that reaches the bandwidth.
// Streams advance CH rows at a time, every batch tile of BT rows reusing
// those KR * CH rows from the cache.
void run_jobs(const Job* jobs, int njobs, int64_t B, BlockFn fn) {
  constexpr int64_t ROW_COST = 64;  // bytes' worth of per-row work (reduction, epilogue)
  int64_t off[9];
  off[0] = 0;
  for (int j = 0; j < njobs; ++j) {
    const Lin& L = *jobs[j].L;
    const int64_t esz = L.kind == K_F32 ? 4 : L.kind == K_I8 ? 1 : 2;
    off[j + 1] = off[j] + L.n * (L.k * esz + ROW_COST);
  }
  const int nt = omp_get_num_threads(), t = omp_get_thread_num();
  const int64_t lo = off[njobs] * t / nt, hi = off[njobs] * (t + 1) / nt;
  for (int j = 0; j < njobs; ++j) {
    if (jobs[j].L->n == 0 || off[j + 1] <= lo || off[j] >= hi) continue;
    const Job& J = jobs[j];
    const Lin& L = *J.L;
    // Row boundaries by one rounding rule, so neighbouring threads' ranges meet.
    const int64_t cost = (off[j + 1] - off[j]) / L.n;
    auto row_at = [&](int64_t p) { return std::min(L.n, std::max<int64_t>(0, (p - off[j] + cost / 2) / cost)); };
    const int64_t a = row_at(lo), e = row_at(hi);
    if (e <= a) continue;
    const int64_t S = (e - a) / KR;  // rows per stream
    float res[KR * BT];
    auto emit = [&](int64_t b0, int nb, int64_t row, int r) {
      const float sc = L.kind == K_I8 ? L.scale[row] : 1.f;
      for (int b = 0; b < nb; ++b) {
        float v = res[r * BT + b] * sc;
        if (J.act == ACT_SIGMOID) v = sigmoidf(v);
        else if (J.act == ACT_RELU_SQ) v = v > 0.f ? v * v : 0.f;
        else if (J.act > ACT_RELU_SQ) v = act7(J.act, J.bias ? J.bias[row] + v : v);
        J.y[(b0 + b) * L.n + row] = v;
      }
    };
    for (int64_t c0 = 0; c0 < S; c0 += CH) {
      const int64_t c1 = std::min(S, c0 + CH);
      for (int64_t b0 = 0; b0 < B; b0 += BT) {
        const int nb = static_cast<int>(std::min<int64_t>(BT, B - b0));
        for (int64_t m = c0; m < c1; ++m) {
          fn(L, a + m, S, KR, J.x + b0 * L.k, L.k, nb, res);
          for (int r = 0; r < KR; ++r) emit(b0, nb, a + m + r * S, r);
        }
      }
    }
    for (int64_t row = a + KR * S; row < e; ++row) {  // fewer than KR rows left
      for (int64_t b0 = 0; b0 < B; b0 += BT) {
        const int nb = static_cast<int>(std::min<int64_t>(BT, B - b0));
        fn(L, row, 1, 1, J.x + b0 * L.k, L.k, nb, res);
        emit(b0, nb, row, 0);
      }
    }
  }
#pragma omp barrier
}

// LayerNorm of one row (mean and variance in double: the row is short).
void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t C, float eps) {
  double s = 0.0;
  for (int64_t i = 0; i < C; ++i) s += x[i];
  const double mean = s / C;
  double v = 0.0;
  for (int64_t i = 0; i < C; ++i) {
    const double d = x[i] - mean;
    v += d * d;
  }
  const float rstd = static_cast<float>(1.0 / std::sqrt(v / C + eps));
  const float m = static_cast<float>(mean);
  for (int64_t i = 0; i < C; ++i) y[i] = (x[i] - m) * rstd * w[i] + b[i];
}

// Per-layer table written by infer_cpu.py (LAYER_SLOTS int64 each).
enum Slot {
  S_LN1_W, S_LN1_B, S_LN2_W, S_LN2_B, S_W, S_U,
  S_ATT_MK, S_ATT_MV, S_ATT_MR, S_FFN_MK, S_FFN_MR,
  S_LIN0,  // 7 linears x 5 slots: att.key, att.value, att.receptance, att.output,
           // ffn.key, ffn.receptance, ffn.value
  LAYER_SLOTS = S_LIN0 + 7 * 5,
};

Lin read_lin(const int64_t* p) {
  return Lin{reinterpret_cast<const void*>(p[0]), reinterpret_cast<const float*>(p[1]), p[2], p[3], p[4]};
}

template <typename T>
T* P(int64_t v) {
  return reinterpret_cast<T*>(v);
}

// x [B, C] (embedded tokens; overwritten), states [L, B, *] in and out,
// logits [B, V] or 0.
void step(int64_t table, int64_t n_layer, int64_t B, int64_t C, int64_t A, int64_t Fd, int64_t x_p,
          int64_t ax_in, int64_t aa_in, int64_t bb_in, int64_t pp_in, int64_t fx_in, int64_t ax_out,
          int64_t aa_out, int64_t bb_out, int64_t pp_out, int64_t fx_out, int64_t lnout_w, int64_t lnout_b,
          int64_t head_tab, int64_t logits_p, int64_t rescale_every, double eps_d) {
  const int64_t* tab = P<const int64_t>(table);
  float* x = P<float>(x_p);
  const float eps = static_cast<float>(eps_d);
  std::vector<Lin> lins(static_cast<size_t>(n_layer) * 7);
  for (int64_t l = 0; l < n_layer; ++l)
    for (int j = 0; j < 7; ++j) lins[l * 7 + j] = read_lin(tab + l * LAYER_SLOTS + S_LIN0 + j * 5);
  const Lin head = head_tab ? read_lin(P<const int64_t>(head_tab)) : Lin{nullptr, nullptr, 0, 0, 0};

  // Scratch: a, xk, xv, xr [B, C]; k, v, r, ry [B, A]; kf [B, F]; rf, out [B, C].
  const int64_t CA = std::max(C, A);
  std::vector<float> buf(static_cast<size_t>(B) * (6 * C + 4 * A + Fd + CA));
  float* a = buf.data();
  float* xk = a + B * C;
  float* xv = xk + B * C;
  float* xr = xv + B * C;
  float* k = xr + B * C;
  float* v = k + B * A;
  float* r = v + B * A;
  float* ry = r + B * A;
  float* kf = ry + B * A;
  float* rf = kf + B * Fd;
  float* out = rf + B * C;
  float* h = out + B * CA;  // ln_out output [B, C]

  const BlockFn fn = block_fn();
  const int nt = std::max(1, at::get_num_threads());

#pragma omp parallel num_threads(nt)
  {
    for (int64_t l = 0; l < n_layer; ++l) {
      const int64_t* t = tab + l * LAYER_SLOTS;
      const Lin* LL = &lins[l * 7];
      // Rescale (spec 3.4): outputs of this layer divided by 2^(l / R), exact.
      const float rs = rescale_every > 0 ? std::ldexp(1.f, -static_cast<int>(l / rescale_every)) : 1.f;
#pragma omp single
      {
        const float *mk = P<const float>(t[S_ATT_MK]), *mv = P<const float>(t[S_ATT_MV]),
                    *mr = P<const float>(t[S_ATT_MR]);
        for (int64_t b = 0; b < B; ++b) {
          float* ab = a + b * C;
          layer_norm(x + b * C, P<const float>(t[S_LN1_W]), P<const float>(t[S_LN1_B]), ab, C, eps);
          const float* prev = P<const float>(ax_in) + (l * B + b) * C;
          for (int64_t i = 0; i < C; ++i) {
            const float cur = ab[i], p = prev[i];
            xk[b * C + i] = cur * mk[i] + p * (1.f - mk[i]);
            xv[b * C + i] = cur * mv[i] + p * (1.f - mv[i]);
            xr[b * C + i] = cur * mr[i] + p * (1.f - mr[i]);
          }
          std::memcpy(P<float>(ax_out) + (l * B + b) * C, ab, C * sizeof(float));
        }
      }
      {
        const Job jobs[3] = {{&LL[0], xk, k, ACT_NONE}, {&LL[1], xv, v, ACT_NONE}, {&LL[2], xr, r, ACT_SIGMOID}};
        run_jobs(jobs, 3, B, fn);
      }
      {
        // WKV, one token of the stable recurrence (spec 2.4), times sigmoid(r);
        // channels are shared out over the threads in chunks of WKV_CHUNK.
        const float *w = P<const float>(t[S_W]), *u = P<const float>(t[S_U]);
        const int64_t nchunk = (A + WKV_CHUNK - 1) / WKV_CHUNK;
#pragma omp for schedule(static)
        for (int64_t job = 0; job < B * nchunk; ++job) {
          const int64_t b = job / nchunk, i0 = (job % nchunk) * WKV_CHUNK, i1 = std::min(A, i0 + WKV_CHUNK);
          const int64_t so = (l * B + b) * A;
          const float *aa = P<const float>(aa_in) + so, *bb = P<const float>(bb_in) + so,
                      *pp = P<const float>(pp_in) + so;
          float *aa2 = P<float>(aa_out) + so, *bb2 = P<float>(bb_out) + so, *pp2 = P<float>(pp_out) + so;
          const float *kb = k + b * A, *vb = v + b * A, *rb = r + b * A;
          float* ryb = ry + b * A;
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) {
            const float kk = kb[i], vv = vb[i];
            float ww = u[i] + kk;
            float q = std::max(pp[i], ww);
            float e1 = std::exp(pp[i] - q), e2 = std::exp(ww - q);
            const float y = (e1 * aa[i] + e2 * vv) / (e1 * bb[i] + e2);
            ryb[i] = rb[i] * y;
            ww = pp[i] + w[i];
            q = std::max(ww, kk);
            e1 = std::exp(ww - q);
            e2 = std::exp(kk - q);
            aa2[i] = e1 * aa[i] + e2 * vv;
            bb2[i] = e1 * bb[i] + e2;
            pp2[i] = q;
          }
        }
      }
      {
        const Job jobs[1] = {{&LL[3], ry, out, ACT_NONE}};
        run_jobs(jobs, 1, B, fn);
      }
#pragma omp single
      {
        const float *mk = P<const float>(t[S_FFN_MK]), *mr = P<const float>(t[S_FFN_MR]);
        for (int64_t b = 0; b < B; ++b) {
          float* xb = x + b * C;
          for (int64_t i = 0; i < C; ++i) xb[i] += out[b * C + i] * rs;
          float* bn = a + b * C;
          layer_norm(xb, P<const float>(t[S_LN2_W]), P<const float>(t[S_LN2_B]), bn, C, eps);
          const float* prev = P<const float>(fx_in) + (l * B + b) * C;
          for (int64_t i = 0; i < C; ++i) {
            const float cur = bn[i], p = prev[i];
            xk[b * C + i] = cur * mk[i] + p * (1.f - mk[i]);
            xr[b * C + i] = cur * mr[i] + p * (1.f - mr[i]);
          }
          std::memcpy(P<float>(fx_out) + (l * B + b) * C, bn, C * sizeof(float));
        }
      }
      {
        const Job jobs[2] = {{&LL[4], xk, kf, ACT_RELU_SQ}, {&LL[5], xr, rf, ACT_SIGMOID}};
        run_jobs(jobs, 2, B, fn);
      }
      {
        const Job jobs[1] = {{&LL[6], kf, out, ACT_NONE}};
        run_jobs(jobs, 1, B, fn);
      }
#pragma omp single
      {
        const bool halve = rescale_every > 0 && (l + 1) % rescale_every == 0;
        for (int64_t b = 0; b < B; ++b) {
          float* xb = x + b * C;
          for (int64_t i = 0; i < C; ++i) {
            float xi = xb[i] + rf[b * C + i] * out[b * C + i] * rs;
            xb[i] = halve ? xi * 0.5f : xi;
          }
        }
      }
    }
    if (logits_p) {
#pragma omp single
      {
        for (int64_t b = 0; b < B; ++b)
          layer_norm(x + b * C, P<const float>(lnout_w), P<const float>(lnout_b), h + b * C, C, eps);
      }
      const Job jobs[1] = {{&head, h, P<float>(logits_p), ACT_NONE}};
      run_jobs(jobs, 1, B, fn);
    }
  }
}

// ===================================================================== RWKV-7
// One RNN step of the whole RWKV-7 model (rwkvkit/models/rwkv7.py, TimeMix and
// ChannelMix for T = 1; the WKV step of rwkvkit/ops/wkv7 wkv7_step), with the
// same matrix-vector kernels, schedule and ISA choice as the RWKV-4 step.  Per
// layer: LN1 and the six token-shift mixes; one parallel pass over r, k, v and
// the first halves of the four LoRAs (w, a, g and, after layer 0, v); one over
// the second halves (with their biases and activations fused); the per-head
// part (value residual, kappa, k_tilde, the WKV-7 state update, GroupNorm, the
// r_k bonus, the output gate) shared out over (batch row, head); the output
// projection; LN2, the channel mix's two products.  The LoRA matrices arrive
// transposed ([out, in], done once by infer_cpu.py), so every product is a
// row-major matrix-vector product.

// Per-layer table written by infer_cpu.py (V7_SLOTS int64 each).
enum Slot7 {
  V7_LN1_W, V7_LN1_B, V7_LN2_W, V7_LN2_B,
  V7_X_R, V7_X_W, V7_X_K, V7_X_V, V7_X_A, V7_X_G,
  V7_W0, V7_A0, V7_V0, V7_K_K, V7_K_A, V7_R_K, V7_LNX_W, V7_LNX_B, V7_FFN_XK,
  V7_LIN0,  // 14 linears x 5 slots, in the order of Lin7
  V7_SLOTS = V7_LIN0 + 14 * 5,
};
enum Lin7 { L7_R, L7_K, L7_V, L7_O, L7_W1, L7_W2, L7_A1, L7_A2, L7_V1, L7_V2, L7_G1, L7_G2, L7_FK, L7_FV, L7_COUNT };

// The per-head part of the time mix for one batch row and one head (N channels).
// v is updated in place (value residual); layer 0 (vgate == nullptr) stores
// v_first instead.  S is the head's old state [N value][N key], So the new one.
// tmp holds 5 N floats.  Written once, compiled per ISA by the wrappers below
// (always_inline into a function with a wider target vectorises for it).
struct Head7 {
  const float *r, *k, *logw, *alpha, *g, *vgate;
  float *v, *vfirst;
  const float *k_k, *k_a, *r_k, *lnx_w, *lnx_b;
  const float* S;
  float* So;
  float* zg;
};

__attribute__((always_inline)) inline void head7_body(const Head7& h, int64_t N, float eps, float* __restrict tmp) {
  const float* __restrict r = h.r;
  const float* __restrict k = h.k;
  float* __restrict v = h.v;
  float* __restrict kap = tmp;         // kappa_hat
  float* __restrict kt = tmp + N;      // k_tilde
  float* __restrict av = tmp + 2 * N;  // a = -kappa_hat
  float* __restrict bv = tmp + 3 * N;  // b = kappa_hat * alpha
  float* __restrict w = tmp + 4 * N;   // exp(logw)
  if (h.vgate) {
    for (int64_t i = 0; i < N; ++i) v[i] = v[i] + (h.vfirst[i] - v[i]) * h.vgate[i];
  } else {
    for (int64_t i = 0; i < N; ++i) h.vfirst[i] = v[i];
  }
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < N; ++j) {
    kap[j] = k[j] * h.k_k[j];
    ss += kap[j] * kap[j];
  }
  // F.normalize: x / max(||x||, 1e-12).
  const float den = std::max(std::sqrt(ss), 1e-12f);
  float bonus = 0.f;
#pragma omp simd reduction(+ : bonus)
  for (int64_t j = 0; j < N; ++j) {
    const float kh = kap[j] / den, al = h.alpha[j];
    kt[j] = k[j] * (1.f + (al - 1.f) * h.k_a[j]);
    av[j] = -kh;
    bv[j] = kh * al;
    bonus += r[j] * kt[j] * h.r_k[j];
  }
  for (int64_t j = 0; j < N; ++j) w[j] = std::exp(h.logw[j]);
  // S' = S diag(w) + (S a) b^T + v k_tilde^T;  y = S' r  (y kept in kap: done with it).
  float* __restrict y = kap;
  for (int64_t i = 0; i < N; ++i) {
    const float* __restrict Si = h.S + i * N;
    float* __restrict So = h.So + i * N;
    float sa = 0.f;
#pragma omp simd reduction(+ : sa)
    for (int64_t j = 0; j < N; ++j) sa += Si[j] * av[j];
    const float vi = v[i];
    float yi = 0.f;
#pragma omp simd reduction(+ : yi)
    for (int64_t j = 0; j < N; ++j) {
      const float s = Si[j] * w[j] + sa * bv[j] + vi * kt[j];
      So[j] = s;
      yi += s * r[j];
    }
    y[i] = yi;
  }
  // GroupNorm over the head (mean and variance in double: N is small), the
  // r_k bonus times v, the output gate.
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
    h.zg[i] = (z + bonus * v[i]) * h.g[i];
  }
}

using Head7Fn = void (*)(const Head7&, int64_t, float, float*);
void head7_scalar(const Head7& h, int64_t N, float eps, float* tmp) { head7_body(h, N, eps, tmp); }
#if RK_X86
__attribute__((target("avx2,fma"))) void head7_avx2(const Head7& h, int64_t N, float eps, float* tmp) {
  head7_body(h, N, eps, tmp);
}
__attribute__((target("avx512f,avx512bw,avx512vl,fma"))) void head7_avx512(const Head7& h, int64_t N, float eps,
                                                                          float* tmp) {
  head7_body(h, N, eps, tmp);
}
#endif

Head7Fn head7_fn() {
  if (g_isa < 0) g_isa = detect_isa();
#if RK_X86
  if (g_isa == 2) return head7_avx512;
  if (g_isa == 1) return head7_avx2;
#endif
  return head7_scalar;
}

// x [B, C] (embedded tokens; overwritten), states [L, B, C] / [L, B, H, N, N]
// in and out, logits [B, V] or 0.
void step7(int64_t table, int64_t n_layer, int64_t B, int64_t C, int64_t H, int64_t N, int64_t x_p,
           int64_t ax_in, int64_t kv_in, int64_t fx_in, int64_t ax_out, int64_t kv_out, int64_t fx_out,
           int64_t lnout_w, int64_t lnout_b, int64_t head_tab, int64_t logits_p, double eps_ln_d, double eps_gn_d) {
  if (H * N != C) throw std::invalid_argument("step7: n_head * head_size != n_embd");
  const int64_t* tab = P<const int64_t>(table);
  float* x = P<float>(x_p);
  const float eps = static_cast<float>(eps_ln_d), eps_gn = static_cast<float>(eps_gn_d);
  std::vector<Lin> lins(static_cast<size_t>(n_layer) * L7_COUNT);
  int64_t Dw = 0, Da = 0, Dv = 0, Dg = 0, Fd = 0;
  for (int64_t l = 0; l < n_layer; ++l) {
    Lin* LL = &lins[l * L7_COUNT];
    for (int j = 0; j < L7_COUNT; ++j) LL[j] = read_lin(tab + l * V7_SLOTS + V7_LIN0 + j * 5);
    Dw = std::max(Dw, LL[L7_W1].n);
    Da = std::max(Da, LL[L7_A1].n);
    Dv = std::max(Dv, LL[L7_V1].n);
    Dg = std::max(Dg, LL[L7_G1].n);
    Fd = std::max(Fd, LL[L7_FK].n);
  }
  const Lin head = head_tab ? read_lin(P<const int64_t>(head_tab)) : Lin{nullptr, nullptr, 0, 0, 0};

  // Scratch [B, *]: a, xr, xw, xk, xv, xa, xg, r, k, v, logw, alpha, vgate, g,
  // zg, v_first, out, h (18 x C); the LoRA middles; the channel mix's hidden.
  std::vector<float> buf(static_cast<size_t>(B) * (18 * C + Dw + Da + Dv + Dg + Fd));
  float* p = buf.data();
  auto take = [&](int64_t n) {
    float* q = p;
    p += B * n;
    return q;
  };
  float *a = take(C), *xr = take(C), *xw = take(C), *xk = take(C), *xv = take(C), *xa = take(C), *xg = take(C);
  float *r = take(C), *k = take(C), *v = take(C), *logw = take(C), *alpha = take(C), *vgate = take(C), *g = take(C);
  float *zg = take(C), *vfirst = take(C), *out = take(C), *hbuf = take(C);
  float *lw = take(Dw), *la = take(Da), *lv = take(Dv), *lg = take(Dg), *kf = take(Fd);

  const BlockFn fn = block_fn();
  const Head7Fn hfn = head7_fn();
  const int nt = std::max(1, at::get_num_threads());

#pragma omp parallel num_threads(nt)
  {
    std::vector<float> tmp(static_cast<size_t>(5 * N));
    for (int64_t l = 0; l < n_layer; ++l) {
      const int64_t* t = tab + l * V7_SLOTS;
      const Lin* LL = &lins[l * L7_COUNT];
      const bool vres = l > 0;  // layer 0 makes v_first; later layers mix it back in
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        float* ab = a + b * C;
        layer_norm(x + b * C, P<const float>(t[V7_LN1_W]), P<const float>(t[V7_LN1_B]), ab, C, eps);
        const float* prev = P<const float>(ax_in) + (l * B + b) * C;
        const float *mr = P<const float>(t[V7_X_R]), *mw = P<const float>(t[V7_X_W]),
                    *mk = P<const float>(t[V7_X_K]), *mv = P<const float>(t[V7_X_V]),
                    *ma = P<const float>(t[V7_X_A]), *mg = P<const float>(t[V7_X_G]);
        for (int64_t i = 0; i < C; ++i) {
          const float cur = ab[i], dx = prev[i] - cur;
          const int64_t o = b * C + i;
          xr[o] = cur + dx * mr[i];
          xw[o] = cur + dx * mw[i];
          xk[o] = cur + dx * mk[i];
          xv[o] = cur + dx * mv[i];
          xa[o] = cur + dx * ma[i];
          xg[o] = cur + dx * mg[i];
        }
        std::memcpy(P<float>(ax_out) + (l * B + b) * C, ab, C * sizeof(float));
      }
      {
        const Job jobs[7] = {
            {&LL[L7_R], xr, r, ACT_NONE},       {&LL[L7_K], xk, k, ACT_NONE},
            {&LL[L7_V], xv, v, ACT_NONE},       {&LL[L7_W1], xw, lw, ACT_TANH},
            {&LL[L7_A1], xa, la, ACT_NONE},     {&LL[L7_G1], xg, lg, ACT_SIGMOID},
            {&LL[L7_V1], xv, lv, ACT_NONE},
        };
        run_jobs(jobs, vres ? 7 : 6, B, fn);
      }
      {
        const Job jobs[4] = {
            {&LL[L7_W2], lw, logw, ACT_LOGW, P<const float>(t[V7_W0])},
            {&LL[L7_A2], la, alpha, ACT_SIGMOID_BIAS, P<const float>(t[V7_A0])},
            {&LL[L7_G2], lg, g, ACT_NONE},
            {&LL[L7_V2], lv, vgate, ACT_SIGMOID_BIAS, P<const float>(t[V7_V0])},
        };
        run_jobs(jobs, vres ? 4 : 3, B, fn);
      }
#pragma omp for schedule(static)
      for (int64_t job = 0; job < B * H; ++job) {
        const int64_t b = job / H, hh = job % H, o = b * C + hh * N;
        const int64_t so = ((l * B + b) * H + hh) * N * N;
        Head7 hd;
        hd.r = r + o;
        hd.k = k + o;
        hd.logw = logw + o;
        hd.alpha = alpha + o;
        hd.g = g + o;
        hd.vgate = vres ? vgate + o : nullptr;
        hd.v = v + o;
        hd.vfirst = vfirst + o;
        hd.k_k = P<const float>(t[V7_K_K]) + hh * N;
        hd.k_a = P<const float>(t[V7_K_A]) + hh * N;
        hd.r_k = P<const float>(t[V7_R_K]) + hh * N;
        hd.lnx_w = P<const float>(t[V7_LNX_W]) + hh * N;
        hd.lnx_b = P<const float>(t[V7_LNX_B]) + hh * N;
        hd.S = P<const float>(kv_in) + so;
        hd.So = P<float>(kv_out) + so;
        hd.zg = zg + o;
        hfn(hd, N, eps_gn, tmp.data());
      }
      {
        const Job jobs[1] = {{&LL[L7_O], zg, out, ACT_NONE}};
        run_jobs(jobs, 1, B, fn);
      }
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        float* xb = x + b * C;
        for (int64_t i = 0; i < C; ++i) xb[i] += out[b * C + i];
        float* bn = a + b * C;
        layer_norm(xb, P<const float>(t[V7_LN2_W]), P<const float>(t[V7_LN2_B]), bn, C, eps);
        const float* prev = P<const float>(fx_in) + (l * B + b) * C;
        const float* mk = P<const float>(t[V7_FFN_XK]);
        for (int64_t i = 0; i < C; ++i) {
          const float cur = bn[i];
          xk[b * C + i] = cur + (prev[i] - cur) * mk[i];
        }
        std::memcpy(P<float>(fx_out) + (l * B + b) * C, bn, C * sizeof(float));
      }
      {
        const Job jobs[1] = {{&LL[L7_FK], xk, kf, ACT_RELU_SQ}};
        run_jobs(jobs, 1, B, fn);
      }
      {
        const Job jobs[1] = {{&LL[L7_FV], kf, out, ACT_NONE}};
        run_jobs(jobs, 1, B, fn);
      }
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        float* xb = x + b * C;
        for (int64_t i = 0; i < C; ++i) xb[i] += out[b * C + i];
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

int layer_slots7() { return V7_SLOTS; }

// ============================================================ RWKV-5 / RWKV-6
#include "step56.h"

// y [B, n] = x [B, k] @ W^T (times the row scales for int8): the kernel alone,
// with the kernel family and bf16 mode now selected,
// for the int8 linear layers outside the fused step and for tests.
void linear(int64_t w, int64_t scale, int64_t n, int64_t k, int64_t kind, int64_t x, int64_t B, int64_t y) {
  if (kind < 0 || kind > 3) throw std::invalid_argument("linear: kind must be 0 (fp32), 1 (int8), 2 (bf16) or 3 (fp16)");
  const Lin L{P<const void>(w), P<const float>(scale), n, k, kind};
  const BlockFn fn = block_fn();
  const int nt = std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(nt)
  {
    const Job jobs[1] = {{&L, P<const float>(x), P<float>(y), ACT_NONE}};
    run_jobs(jobs, 1, B, fn);
  }
}

int layer_slots() { return LAYER_SLOTS; }

// Force a kernel family (0 scalar, 1 AVX2, 2 AVX-512; -1 = best available), so
// tests can check each one the CPU supports.  Returns the one in use.
int set_isa(int isa) {
  const int best = detect_isa();
  g_isa = (isa < 0 || isa > best) ? best : isa;
  return g_isa;
}

int get_isa() {
  if (g_isa < 0) g_isa = detect_isa();
  return g_isa;
}

// bf16 matrices through vdpbf16ps (1) or widened exactly to fp32 (0, the
// default); -1 asks without changing.  Returns the mode now in use: 1 only
// where the CPU has AVX512-BF16 (it applies while the AVX-512 family is).
int set_bf16_dot(int on) {
  if (on >= 0) g_bf16_dot = (on > 0 && cpu_has_bf16_dot()) ? 1 : 0;
  return g_bf16_dot;
}

bool has_bf16_dot() { return cpu_has_bf16_dot(); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rwkvkit: fused RNN step of RWKV-4, -5, -6 and -7 on the CPU (fp32 / int8 / bf16 / fp16 weights)";
  m.def("step", &step);
  m.def("linear", &linear);
  m.def("layer_slots", &layer_slots);
  m.def("step7", &step7);
  m.def("layer_slots7", &layer_slots7);
  m.def("step56", &step56);
  m.def("layer_slots56", &layer_slots56);
  m.def("set_isa", &set_isa);
  m.def("get_isa", &get_isa);
  m.def("set_bf16_dot", &set_bf16_dot);
  m.def("has_bf16_dot", &has_bf16_dot);
}
