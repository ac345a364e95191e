// gptoss CPU kernels: dense products (GEMV kernels, the many-token tile product) and linear.
// Part of one translation unit: included by kernels.cpp, in order, inside namespace gptoss.
#pragma once

// ---------------------------------------------------------------------------------------------
// Dense products: out[m][n] = sum_k x[m][k] * w[n][k] in fp32.
//
// Layout: w [N, K] row-major (nn.Linear), x [M, K]. A micro-kernel takes RB <= 4 weight rows and
// MB <= 4 rows of x and walks K once, keeping RB*MB accumulators in registers; the driver
// visits every x chunk while a block of 4 weight rows is hot in L1, so each weight byte comes from
// memory once. For decode (M <= 8) this is a GEMV that streams the weights at memory speed.

struct DenseArgs {
  const void* w;
  int64_t ldw;
  const void* x;
  int64_t ldx;
  int64_t M, K;
  float* out;  // out[m * ldo + n]
  int64_t ldo;
};
using DenseFn = void (*)(const DenseArgs&, int64_t n, int64_t m);

// The GEMV kernels prefetch the rows of the next block (the same thread reads them next): the
// hardware prefetchers stop at 4 KB pages, and without this one core reaches half its bandwidth.
static constexpr int64_t kDensePrefetchRows = 4;

// With one row of x (a decode step), each weight row is instead read start to end as one forward
// stream, prefetched this many bytes ahead into L2, like a plain read. On the 20b's attention
// projections (2 threads, AMD EPYC Zen 4, benchmarks/kernels_ab.py) four rows side by side read
// 30.0 GB/s while a plain read made 35, one stream at a time 33.5; 32.6 -> 41.2 GB/s while the
// machine's reads made ~58. Four accumulators hide the FMA latency. 3 KB ahead rather than 1:
// on a 2-core Intel Xeon (AMX, 2 MB L2) decode 5.96 -> 6.28 tokens/s (1.054x, 10 rounds), the
// projections 21.8 -> 23.3 GB/s; 6 and 12 KB measured 1.042x and 1.035x, a T0 hint 1.021x.
static constexpr int kStreamAheadBytes = 3072;

template <class T>
static INLINE void prefetch_stream(const T* p, int bytes) {
  for (int c = 0; c < bytes; c += 64) _mm_prefetch((const char*)p + kStreamAheadBytes + c, _MM_HINT_T1);
}
struct DenseKernel {
  DenseFn fn[4][4];  // [RB - 1][MB - 1]
};

static void dense_rows(const DenseKernel& k, const DenseArgs& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t rb = std::min<int64_t>(4, n1 - n);
    for (int64_t m = 0; m < a.M; m += 4) k.fn[rb - 1][std::min<int64_t>(4, a.M - m) - 1](a, n, m);
  }
}

#define KERNEL_TABLE(fn, ...)                                                                         \
  {                                                                                                   \
    {                                                                                                 \
      {fn<1, 1, ##__VA_ARGS__>, fn<1, 2, ##__VA_ARGS__>, fn<1, 3, ##__VA_ARGS__>, fn<1, 4, ##__VA_ARGS__>}, \
      {fn<2, 1, ##__VA_ARGS__>, fn<2, 2, ##__VA_ARGS__>, fn<2, 3, ##__VA_ARGS__>, fn<2, 4, ##__VA_ARGS__>}, \
      {fn<3, 1, ##__VA_ARGS__>, fn<3, 2, ##__VA_ARGS__>, fn<3, 3, ##__VA_ARGS__>, fn<3, 4, ##__VA_ARGS__>}, \
      {fn<4, 1, ##__VA_ARGS__>, fn<4, 2, ##__VA_ARGS__>, fn<4, 3, ##__VA_ARGS__>, fn<4, 4, ##__VA_ARGS__>}, \
    }                                                                                                 \
  }

// scalar: W float or bf16, X float
template <int RB, int MB, class WT>
static void dense_mk_scalar(const DenseArgs& a, int64_t n, int64_t m) {
  const WT* w = static_cast<const WT*>(a.w) + n * a.ldw;
  const float* x = static_cast<const float*>(a.x) + m * a.ldx;
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < MB; ++j) {
      float acc = 0.f;
      for (int64_t k = 0; k < a.K; ++k) acc += to_f32(w[r * a.ldw + k]) * x[j * a.ldx + k];
      a.out[(m + j) * a.ldo + n + r] = acc;
    }
}

// AVX2: 8 lanes, W converted to fp32 in registers (bf16 -> fp32 is a 16-bit shift).
T_AVX2 static INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
T_AVX2 static INLINE __m256 load8(const bf16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

template <class WT>
T_AVX2 static float dot_stream_avx2(const WT* w, const float* x, int64_t K) {
  __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    prefetch_stream(w + k, 32 * sizeof(WT));
    for (int i = 0; i < 4; ++i) s[i] = _mm256_fmadd_ps(load8(w + k + 8 * i), _mm256_loadu_ps(x + k + 8 * i), s[i]);
  }
  for (; k + 8 <= K; k += 8) s[0] = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), s[0]);
  float sum = hsum256(_mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3])));
  for (; k < K; ++k) sum += to_f32(w[k]) * x[k];
  return sum;
}

template <int RB, int MB, class WT>
T_AVX2 static void dense_mk_avx2(const DenseArgs& a, int64_t n, int64_t m) {
  const WT* w = static_cast<const WT*>(a.w) + n * a.ldw;
  const float* x = static_cast<const float*>(a.x) + m * a.ldx;
  if constexpr (MB == 1) {
    for (int r = 0; r < RB; ++r) a.out[m * a.ldo + n + r] = dot_stream_avx2(w + r * a.ldw, x, a.K);
    return;
  }
  __m256 acc[RB][MB];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= a.K; k += 8) {
    __m256 xv[MB];
    for (int j = 0; j < MB; ++j) xv[j] = _mm256_loadu_ps(x + j * a.ldx + k);
    for (int r = 0; r < RB; ++r) {
      _mm_prefetch((const char*)(w + (r + kDensePrefetchRows) * a.ldw + k), _MM_HINT_T0);
      __m256 wv = load8(w + r * a.ldw + k);
      for (int j = 0; j < MB; ++j) acc[r][j] = _mm256_fmadd_ps(wv, xv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < MB; ++j) {
      float s = hsum256(acc[r][j]);
      for (int64_t kk = k; kk < a.K; ++kk) s += to_f32(w[r * a.ldw + kk]) * x[j * a.ldx + kk];
      a.out[(m + j) * a.ldo + n + r] = s;
    }
}

// AVX-512: 16 lanes, masked loads for the K tail.
T_AVX512 static INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
T_AVX512 static INLINE __m512 load16(const bf16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
T_AVX512 static INLINE __m512 load16(const float* p, __mmask16 mk) { return _mm512_maskz_loadu_ps(mk, p); }
T_AVX512 static INLINE __m512 load16(const bf16_t* p, __mmask16 mk) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, p)), 16));
}

template <class WT>
T_AVX512 static float dot_stream_avx512(const WT* w, const float* x, int64_t K) {
  __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    prefetch_stream(w + k, 64 * sizeof(WT));
    for (int i = 0; i < 4; ++i) s[i] = _mm512_fmadd_ps(load16(w + k + 16 * i), _mm512_loadu_ps(x + k + 16 * i), s[i]);
  }
  for (; k < K; k += 16) {
    const __mmask16 mk = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
    s[0] = _mm512_fmadd_ps(load16(w + k, mk), _mm512_maskz_loadu_ps(mk, x + k), s[0]);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3])));
}

template <int RB, int MB, class WT>
T_AVX512 static void dense_mk_avx512(const DenseArgs& a, int64_t n, int64_t m) {
  const WT* w = static_cast<const WT*>(a.w) + n * a.ldw;
  const float* x = static_cast<const float*>(a.x) + m * a.ldx;
  if constexpr (MB == 1) {
    for (int r = 0; r < RB; ++r) a.out[m * a.ldo + n + r] = dot_stream_avx512(w + r * a.ldw, x, a.K);
    return;
  }
  __m512 acc[RB][MB];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= a.K; k += 16) {
    __m512 xv[MB];
    for (int j = 0; j < MB; ++j) xv[j] = _mm512_loadu_ps(x + j * a.ldx + k);
    for (int r = 0; r < RB; ++r) {
      _mm_prefetch((const char*)(w + (r + kDensePrefetchRows) * a.ldw + k), _MM_HINT_T0);
      __m512 wv = load16(w + r * a.ldw + k);
      for (int j = 0; j < MB; ++j) acc[r][j] = _mm512_fmadd_ps(wv, xv[j], acc[r][j]);
    }
  }
  if (k < a.K) {
    const __mmask16 mk = static_cast<__mmask16>((1u << (a.K - k)) - 1);
    __m512 xv[MB];
    for (int j = 0; j < MB; ++j) xv[j] = _mm512_maskz_loadu_ps(mk, x + j * a.ldx + k);
    for (int r = 0; r < RB; ++r) {
      __m512 wv = load16(w + r * a.ldw + k, mk);
      for (int j = 0; j < MB; ++j) acc[r][j] = _mm512_fmadd_ps(wv, xv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < MB; ++j) a.out[(m + j) * a.ldo + n + r] = _mm512_reduce_add_ps(acc[r][j]);
}

// AVX512_BF16: W and X both bf16; vdpbf16ps multiplies 32 pairs exactly and adds them in fp32.
T_AVX512BF16 static float dot_stream_bf16dp(const bf16_t* w, const bf16_t* x, int64_t K) {
  __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {
    prefetch_stream(w + k, 256);
    for (int i = 0; i < 4; ++i)
      s[i] = _mm512_dpbf16_ps(s[i], (__m512bh)_mm512_loadu_si512(w + k + 32 * i),
                              (__m512bh)_mm512_loadu_si512(x + k + 32 * i));
  }
  for (; k < K; k += 32) {
    const __mmask32 mk = K - k >= 32 ? static_cast<__mmask32>(0xFFFFFFFFu) : static_cast<__mmask32>((1ull << (K - k)) - 1);
    s[0] = _mm512_dpbf16_ps(s[0], (__m512bh)_mm512_maskz_loadu_epi16(mk, w + k),
                            (__m512bh)_mm512_maskz_loadu_epi16(mk, x + k));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3])));
}

template <int RB, int MB>
T_AVX512BF16 static void dense_mk_bf16dp(const DenseArgs& a, int64_t n, int64_t m) {
  const bf16_t* w = static_cast<const bf16_t*>(a.w) + n * a.ldw;
  const bf16_t* x = static_cast<const bf16_t*>(a.x) + m * a.ldx;
  if constexpr (MB == 1) {
    for (int r = 0; r < RB; ++r) a.out[m * a.ldo + n + r] = dot_stream_bf16dp(w + r * a.ldw, x, a.K);
    return;
  }
  __m512 acc[RB][MB];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= a.K; k += 32) {
    __m512bh xv[MB];
    for (int j = 0; j < MB; ++j) xv[j] = (__m512bh)_mm512_loadu_si512(x + j * a.ldx + k);
    for (int r = 0; r < RB; ++r) {
      _mm_prefetch((const char*)(w + (r + kDensePrefetchRows) * a.ldw + k), _MM_HINT_T0);
      __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * a.ldw + k);
      for (int j = 0; j < MB; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv, xv[j]);
    }
  }
  if (k < a.K) {
    const __mmask32 mk = static_cast<__mmask32>((1ull << (a.K - k)) - 1);
    __m512bh xv[MB];
    for (int j = 0; j < MB; ++j) xv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mk, x + j * a.ldx + k);
    for (int r = 0; r < RB; ++r) {
      __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mk, w + r * a.ldw + k);
      for (int j = 0; j < MB; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv, xv[j]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < MB; ++j) a.out[(m + j) * a.ldo + n + r] = _mm512_reduce_add_ps(acc[r][j]);
}

static const DenseKernel kDenseScalarF32 = KERNEL_TABLE(dense_mk_scalar, float);
static const DenseKernel kDenseScalarBf16 = KERNEL_TABLE(dense_mk_scalar, bf16_t);
static const DenseKernel kDenseAvx2F32 = KERNEL_TABLE(dense_mk_avx2, float);
static const DenseKernel kDenseAvx2Bf16 = KERNEL_TABLE(dense_mk_avx2, bf16_t);
static const DenseKernel kDenseAvx512F32 = KERNEL_TABLE(dense_mk_avx512, float);
static const DenseKernel kDenseAvx512Bf16 = KERNEL_TABLE(dense_mk_avx512, bf16_t);
static const DenseKernel kDenseBf16Dp = KERNEL_TABLE(dense_mk_bf16dp);

// One row of x (a decode step) against R weight rows read side by side, one accumulator each, no
// software prefetch: R forward streams keep more reads in flight than one stream prefetched ahead.
// On a 2-core Intel Xeon (AMX), 2 threads, the 20b's q_proj 4096 x 2880 cycled through 944 MB:
// one row at a time (dot_stream_bf16dp) 21.6-21.9 GB/s, 8 rows 23.8-24.2, 16 rows 25.4-25.5;
// torch's bf16 matmul 20.0, its fp32 GEMV 27.4 (a standalone read of 8-16 streams per thread
// without prefetch made 28.0-28.4 GB/s, one stream with a 3 KB prefetch 23.7). On the AMD Zen 4
// host one stream at a time read faster than 4 rows side by side (33.5 vs 30.0 GB/s, above), and
// 16 rows were not measured there: so this path is the default on Intel CPUs only.
template <int R>
T_AVX512BF16 static void gemv_rows_bf16dp(const DenseArgs& a, int64_t n) {
  const bf16_t* w = static_cast<const bf16_t*>(a.w) + n * a.ldw;
  const bf16_t* x = static_cast<const bf16_t*>(a.x);
  __m512 s[R];
  for (int r = 0; r < R; ++r) s[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= a.K; k += 32) {
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + k);
    for (int r = 0; r < R; ++r) s[r] = _mm512_dpbf16_ps(s[r], (__m512bh)_mm512_loadu_si512(w + r * a.ldw + k), x0);
  }
  if (k < a.K) {
    const __mmask32 mk = static_cast<__mmask32>((1ull << (a.K - k)) - 1);
    const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mk, x + k);
    for (int r = 0; r < R; ++r)
      s[r] = _mm512_dpbf16_ps(s[r], (__m512bh)_mm512_maskz_loadu_epi16(mk, w + r * a.ldw + k), xv);
  }
  for (int r = 0; r < R; ++r) a.out[n + r] = _mm512_reduce_add_ps(s[r]);
}
static bool intel_cpu() {
  __builtin_cpu_init();
  return __builtin_cpu_is("intel");
}
static bool g_gemv_side_by_side = intel_cpu();

// The kernel for weights of `w_bf16` type; x must then be bf16 for the vdpbf16ps kernel, else fp32.
static const DenseKernel& dense_kernel(Isa isa, bool w_bf16, bool x_bf16) {
  if (x_bf16) {
    assert(w_bf16 && isa == Isa::Avx512Bf16);
    return kDenseBf16Dp;
  }
  switch (isa) {
    case Isa::Avx512Bf16:
    case Isa::Avx512: return w_bf16 ? kDenseAvx512Bf16 : kDenseAvx512F32;
    case Isa::Avx2: return w_bf16 ? kDenseAvx2Bf16 : kDenseAvx2F32;
    default: return w_bf16 ? kDenseScalarBf16 : kDenseScalarF32;
  }
}

// ---------------------------------------------------------------------------------------------
// Many-token products (prefill) on AVX-512: out[m][n] = sum_k W[n][k] * x[m][k].
//
// Layout: W is an fp32 tile, row-major [rows][K] (bf16 rows widened, or MXFP4 rows decoded, once
// per call). x is packed transposed in blocks of 16 tokens, xt [M/16][K][16] (zero-padded), once
// per call. The micro-kernel keeps NR weight rows x 16*MV tokens of output in 16 registers and,
// for each k, broadcasts NR weights and multiplies them with MV vectors of 16 tokens: 16 FMAs per
// NR + MV loads, no horizontal sums, and no transposition of the weights.

static int64_t gemm_mpad(int64_t M) { return (M + 15) / 16 * 16; }

// x rows (row i is src + rows[i] * ld, or src + i * ld) -> xt.
template <class T>
static void pack_xt(const T* src, int64_t ld, const int64_t* rows, int64_t M, int64_t K, float* xt) {
  const int64_t mp = gemm_mpad(M);
  for (int64_t m0 = 0; m0 < mp; m0 += 16) {
    float* blk = xt + m0 * K;
    for (int64_t i = 0; i < 16; ++i) {
      const int64_t m = m0 + i;
      if (m < M) {
        const T* row = src + (rows ? rows[m] : m) * ld;
        for (int64_t k = 0; k < K; ++k) blk[k * 16 + i] = to_f32(row[k]);
      } else {
        for (int64_t k = 0; k < K; ++k) blk[k * 16 + i] = 0.f;
      }
    }
  }
}

template <int NR, int MV>
T_AVX512 static void gemm_mk_avx512(const float* w, const float* xt, int64_t K, float* c) {
  __m512 acc[NR][MV];
  for (int n = 0; n < NR; ++n)
    for (int v = 0; v < MV; ++v) acc[n][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 xv[MV];
    for (int v = 0; v < MV; ++v) xv[v] = _mm512_loadu_ps(xt + v * K * 16 + k * 16);
    for (int n = 0; n < NR; ++n) {
      const __m512 wb = _mm512_set1_ps(w[n * K + k]);
      for (int v = 0; v < MV; ++v) acc[n][v] = _mm512_fmadd_ps(wb, xv[v], acc[n][v]);
    }
  }
  for (int n = 0; n < NR; ++n)
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(c + n * 16 * MV + 16 * v, acc[n][v]);
}

// The same tiling on AVX512_BF16 for bf16 weights and x, two k at a time with vdpbf16ps (twice the
// multiply-adds of an fp32 FMA, products exact, as the decode GEMV): x is packed as bf16 pairs,
// xt2 [M/16][K/2][16][2], and each weight pair (w[n][k], w[n][k+1]) is broadcast straight from the
// bf16 rows, so no weight is widened. K must be even.
static void pack_xt2(const bf16_t* src, int64_t M, int64_t K, bf16_t* xt) {
  const int64_t mp = gemm_mpad(M);
  for (int64_t m0 = 0; m0 < mp; m0 += 16) {
    bf16_t* blk = xt + m0 * K;
    for (int64_t i = 0; i < 16; ++i) {
      const int64_t m = m0 + i;
      for (int64_t k = 0; k < K; k += 2) {
        blk[k * 16 + 2 * i] = m < M ? src[m * K + k] : bf16_t(0);
        blk[k * 16 + 2 * i + 1] = m < M ? src[m * K + k + 1] : bf16_t(0);
      }
    }
  }
}

template <int NR, int MV>
T_AVX512BF16 static void gemm_mk_bf16dp(const bf16_t* w, const bf16_t* xt, int64_t K, float* c) {
  __m512 acc[NR][MV];
  for (int n = 0; n < NR; ++n)
    for (int v = 0; v < MV; ++v) acc[n][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 2) {
    __m512bh xv[MV];
    for (int v = 0; v < MV; ++v) xv[v] = (__m512bh)_mm512_loadu_si512(xt + v * K * 16 + k * 16);
    for (int n = 0; n < NR; ++n) {
      uint32_t pair;
      std::memcpy(&pair, w + n * K + k, 4);
      const __m512bh wb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      for (int v = 0; v < MV; ++v) acc[n][v] = _mm512_dpbf16_ps(acc[n][v], wb, xv[v]);
    }
  }
  for (int n = 0; n < NR; ++n)
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(c + n * 16 * MV + 16 * v, acc[n][v]);
}

template <int NR, int MV>
static INLINE void gemm_mk(const float* w, const float* xt, int64_t K, float* c) { gemm_mk_avx512<NR, MV>(w, xt, K, c); }
template <int NR, int MV>
static INLINE void gemm_mk(const bf16_t* w, const bf16_t* xt, int64_t K, float* c) { gemm_mk_bf16dp<NR, MV>(w, xt, K, c); }

// Rows [0, rows) of the tile (readable to a multiple of 16 rows, zero-padded) against M tokens;
// out[m * ldo + n]. fp32 tiles with packed fp32 x (pack_xt), or bf16 rows with bf16 pairs (pack_xt2).
template <int NR, int MV, class T>
static void gemm_tile_nm(const T* w, int64_t rows, const T* xt, int64_t M, int64_t K, float* out, int64_t ldo) {
  const int64_t mp = gemm_mpad(M);
  float c[NR * 16 * MV];
  for (int64_t n0 = 0; n0 < rows; n0 += NR) {
    for (int64_t m0 = 0; m0 < mp;) {
      const bool wide = m0 + 16 * MV <= mp;
      const int64_t cw = wide ? 16 * MV : 16;
      if (wide)
        gemm_mk<NR, MV>(w + n0 * K, xt + m0 * K, K, c);
      else
        gemm_mk<NR, 1>(w + n0 * K, xt + m0 * K, K, c);
      for (int64_t n = 0; n < NR && n0 + n < rows; ++n)
        for (int64_t m = 0; m < cw && m0 + m < M; ++m) out[(m0 + m) * ldo + n0 + n] = c[n * cw + m];
      m0 += cw;
    }
  }
}

template <class T>
static void gemm_tile(const T* w, int64_t rows, const T* xt, int64_t M, int64_t K, float* out, int64_t ldo) {
  if (M > 16)
    gemm_tile_nm<8, 2>(w, rows, xt, M, K, out, ldo);
  else
    gemm_tile_nm<16, 1>(w, rows, xt, M, K, out, ldo);
}

// ---------------------------------------------------------------------------------------------
// linear: y = x W^T + b

static int64_t rows_per_unit(int64_t N) {
  const int64_t threads = g_threads;
  int64_t r = N / (threads * 8);
  r = std::max<int64_t>(4, std::min<int64_t>(64, r));
  return (r + 3) / 4 * 4;
}

// Up to this many rows of x, linear streams the weights through the dot-product kernels (GEMV);
// beyond, it runs the tile GEMM (AVX-512) or, on AVX2, the dot-product kernels on widened rows.
static constexpr int64_t kGemvMaxRows = 8;

T_AVX512 static void widen_bf16_avx512(const bf16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
  for (; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

// Many rows of x without AVX-512: the bf16 weights of each block of 4 rows are widened to fp32 once
// in a per-thread buffer, then every chunk of x runs the fp32 dot-product kernel on them.
static void dense_rows_widened(const DenseKernel& k, const DenseArgs& a, int64_t n0, int64_t n1,
                               std::vector<float>& buf) {
  buf.resize(4 * a.K);
  const bf16_t* w = static_cast<const bf16_t*>(a.w);
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t rb = std::min<int64_t>(4, n1 - n);
    for (int64_t r = 0; r < rb; ++r)
      for (int64_t c = 0; c < a.K; ++c) buf[r * a.K + c] = bf16_to_f32(w[(n + r) * a.ldw + c]);
    const DenseArgs b{buf.data(), a.K, a.x, a.ldx, a.M, a.K, a.out + n, a.ldo};
    for (int64_t m = 0; m < a.M; m += 4) k.fn[rb - 1][std::min<int64_t>(4, a.M - m) - 1](b, 0, m);
  }
}

// out [M, N] = x [M, K] W[N, K]^T + bias, summed in fp32; x and W share a dtype (bf16 or fp32),
// the bias is bf16 or fp32, and out is fp32 or bf16 (rounded here, a unit at a time, so a decode
// step does not pay a separate conversion pass per product). Every shape is served here; which
// products torch's matmul runs faster instead is the Python dispatcher's business (dispatch_linear).
static void linear_impl(const void* x, const void* w, bool bf16, const void* bias, bool bias_bf16, int64_t M,
                        int64_t N, int64_t K, void* out, bool out_bf16) {
  const Isa isa = g_isa;
  std::unique_ptr<float[]> sums(out_bf16 ? new float[M * N] : nullptr);
  float* op = out_bf16 ? sums.get() : static_cast<float*>(out);
  auto finish_columns = [&](int64_t n0, int64_t n1) {  // bias, then bf16 rounding
    for (int64_t m = 0; m < M; ++m) {
      float* row = op + m * N;
      if (bias_bf16)
        for (int64_t n = n0; n < n1; ++n) row[n] += bf16_to_f32(static_cast<const bf16_t*>(bias)[n]);
      else if (bias)
        for (int64_t n = n0; n < n1; ++n) row[n] += static_cast<const float*>(bias)[n];
      if (out_bf16) f32_to_bf16_row(isa, row + n0, static_cast<bf16_t*>(out) + m * N + n0, n1 - n0);
    }
  };
  if (M > kGemvMaxRows && bf16 && isa == Isa::Avx512Bf16 && K % 2 == 0) {
    // GEMM with vdpbf16ps: x packed once as bf16 pairs, the weights read in place (a tile of 32 rows
    // per unit; a last unit of fewer rows is copied, zero-padded, to a multiple of 16).
    std::vector<bf16_t> xt(gemm_mpad(M) * K);
    pack_xt2(static_cast<const bf16_t*>(x), M, K, xt.data());
    constexpr int64_t rows = 32;
    parallel_units((N + rows - 1) / rows, [&](int64_t u, std::vector<float>& scratch) {
      const int64_t n0 = u * rows, nr = std::min(N, n0 + rows) - n0, nr16 = (nr + 15) / 16 * 16;
      const bf16_t* wt = static_cast<const bf16_t*>(w) + n0 * K;
      if (nr16 != nr) {
        scratch.assign((nr16 * K + 1) / 2, 0.f);
        std::memcpy(scratch.data(), wt, nr * K * sizeof(bf16_t));
        wt = reinterpret_cast<const bf16_t*>(scratch.data());
      }
      gemm_tile(wt, nr, xt.data(), M, K, op + n0, N);
      finish_columns(n0, n0 + nr);
    });
    return;
  }
  if (M > kGemvMaxRows && isa >= Isa::Avx512) {
    // GEMM: x packed once, the weights copied (fp32) or widened (bf16) to an fp32 tile of rows at a time.
    std::vector<float> xt(gemm_mpad(M) * K);
    if (bf16)
      pack_xt(static_cast<const bf16_t*>(x), K, nullptr, M, K, xt.data());
    else
      pack_xt(static_cast<const float*>(x), K, nullptr, M, K, xt.data());
    constexpr int64_t rows = 32;
    parallel_units((N + rows - 1) / rows, [&](int64_t u, std::vector<float>& tile) {
      const int64_t n0 = u * rows, nr = std::min(N, n0 + rows) - n0;
      tile.resize(rows * K);
      if (bf16)
        widen_bf16_avx512(static_cast<const bf16_t*>(w) + n0 * K, tile.data(), nr * K);
      else
        std::memcpy(tile.data(), static_cast<const float*>(w) + n0 * K, nr * K * sizeof(float));
      std::fill(tile.begin() + nr * K, tile.end(), 0.f);
      gemm_tile(tile.data(), nr, xt.data(), M, K, op + n0, N);
      finish_columns(n0, n0 + nr);
    });
    return;
  }
  // GEMV (or any size without AVX-512): the weights stream once through the dot-product kernels.
  // Only the bf16 GEMV on AVX512_BF16 reads x as bf16; everything else reads fp32.
  const bool x_bf16 = bf16 && isa == Isa::Avx512Bf16 && M <= kGemvMaxRows;
  std::vector<float> widened;
  const void* xs = x;
  if (bf16 && !x_bf16) {
    widened.resize(M * K);
    const bf16_t* xb = static_cast<const bf16_t*>(x);
    for (int64_t i = 0; i < M * K; ++i) widened[i] = bf16_to_f32(xb[i]);
    xs = widened.data();
  }
  const DenseArgs a{w, K, xs, K, M, K, op, N};
  const bool widen = M > kGemvMaxRows && bf16;
  const DenseKernel& kern = dense_kernel(isa, bf16 && !widen, x_bf16);
  const int64_t rows = rows_per_unit(N);
  parallel_units((N + rows - 1) / rows, [&](int64_t u, std::vector<float>& buf) {
    const int64_t n0 = u * rows, n1 = std::min(N, n0 + rows);
    if (widen)
      dense_rows_widened(kern, a, n0, n1, buf);
    else if (x_bf16 && M == 1 && g_gemv_side_by_side) {
      int64_t n = n0;
      for (; n + 16 <= n1; n += 16) gemv_rows_bf16dp<16>(a, n);
      for (; n + 4 <= n1; n += 4) gemv_rows_bf16dp<4>(a, n);
      for (; n < n1; ++n) gemv_rows_bf16dp<1>(a, n);
    } else
      dense_rows(kern, a, n0, n1);
    finish_columns(n0, n1);
  });
}
