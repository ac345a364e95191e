// gptoss CPU kernels: dense products, MXFP4 experts and attention.
//
// One translation unit, compiled on first use by gptoss/ops/cpu/__init__.py. The file is built
// without -march: every SIMD function carries its own __attribute__((target(...))) and the path
// is chosen at run time (Isa below), so one binary runs on any x86-64 CPU.
//
// Paths, best first:
//   avx512bf16  as avx512, and the bf16 GEMV (decode) multiplies bf16 pairs with vdpbf16ps
//   avx512      AVX-512 F/BW/VL: fp32 FMA on 16 lanes
//   avx2        AVX2 + FMA: fp32 FMA on 8 lanes
//   scalar      portable C++
// All paths accumulate in fp32. On the Xeon measured (Sapphire Rapids class), vdpbf16ps runs at
// half the rate of fp32 FMA, so the compute-bound kernels (MXFP4, GEMM) widen to fp32 instead.
// On the avx512 paths, a CPU with VNNI and VBMI runs the experts of bfloat16 models with int8
// activations (exact integer block sums, see "MXFP4 x int8 activations"); fp32 models stay exact.
// Work is split over OpenMP threads, as many as gptoss_set_threads says (torch.get_num_threads()).
//
// The library does not depend on torch: it exports plain C functions (the `extern "C"` section at
// the end) that take raw pointers and sizes, and gptoss/ops/cpu/__init__.py calls them through
// ctypes on tensors it has checked and made contiguous. So it compiles in seconds with any C++17
// compiler, at install time, and one build serves every torch version. Linked with -fopenmp it
// shares torch's OpenMP runtime (the soname libgomp.so.1 that torch loads first).

#include <immintrin.h>

#include <algorithm>
#include <cassert>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace gptoss {

#define T_AVX2 __attribute__((target("avx2,fma,f16c")))
#define T_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define T_AVX512BF16 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define INLINE inline __attribute__((always_inline))

using bf16_t = uint16_t;  // raw bfloat16 bits

// ---------------------------------------------------------------------------------------------
// ISA selection

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };
static const char* kIsaNames[] = {"scalar", "avx2", "avx512", "avx512bf16"};

static Isa best_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return Isa::Avx512Bf16;
  if (avx512) return Isa::Avx512;
  if (avx2) return Isa::Avx2;
#endif
  return Isa::Scalar;
}

static Isa g_best = best_isa();
static Isa g_isa = g_best;




// ---------------------------------------------------------------------------------------------
// Scalars and tables

static INLINE float bf16_to_f32(bf16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as torch does; NaN stays a quiet NaN.
static INLINE bf16_t f32_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<bf16_t>(u >> 16);
}

static INLINE float to_f32(float v) { return v; }
static INLINE float to_f32(bf16_t v) { return bf16_to_f32(v); }
static INLINE void store_as(float* p, float v) { *p = v; }
static INLINE void store_as(bf16_t* p, float v) { *p = f32_to_bf16(v); }

struct Tables {
  float e2m1[16];        // nibble -> E2M1 value
  bf16_t e2m1_bf16[32];  // the same as bf16 bits, twice (vpermw reads 5 index bits)
  int8_t e2m1_x2[16];    // 2 * value: small integers, for the byte-shuffle path
  float e8m0[256];       // scale byte -> 2^(s-127); 0xFF -> NaN
  float e8m0_half[256];  // 2^(s-128): pairs with e2m1_x2
  Tables() {
    static const float v[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                                -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};
    for (int i = 0; i < 16; ++i) {
      e2m1[i] = v[i];
      uint32_t u;
      std::memcpy(&u, &v[i], 4);
      e2m1_bf16[i] = e2m1_bf16[i + 16] = static_cast<bf16_t>(u >> 16);
      e2m1_x2[i] = static_cast<int8_t>(2 * v[i]);
    }
    for (int s = 0; s < 256; ++s) {
      e8m0[s] = std::ldexp(1.0f, s - 127);
      e8m0_half[s] = std::ldexp(1.0f, s - 128);
    }
    e8m0[255] = e8m0_half[255] = std::numeric_limits<float>::quiet_NaN();
  }
};
static const Tables kT;

// ---------------------------------------------------------------------------------------------
// Threading: a fixed number of workers pull units from a shared counter (units can differ in cost).

static int g_threads = 1;  // set from torch.get_num_threads() before each call

// Fewer than `min_units` units run on the calling thread: waking the others costs more.
template <class Body>
static void parallel_units(int64_t n_units, const Body& body, int64_t min_units = 2) {
  if (n_units <= 0) return;
  if (n_units < min_units) {
    std::vector<float> scratch;
    for (int64_t u = 0; u < n_units; ++u) body(u, scratch);
    return;
  }
  std::atomic<int64_t> next{0};
  const int workers = static_cast<int>(std::min<int64_t>(g_threads, n_units));
  if (workers <= 1) {
    std::vector<float> scratch;
    for (int64_t u = 0; u < n_units; ++u) body(u, scratch);
    return;
  }
#pragma omp parallel num_threads(workers)
  {
    std::vector<float> scratch;  // per worker, grown by the body as needed
    for (int64_t u = next.fetch_add(1); u < n_units; u = next.fetch_add(1)) body(u, scratch);
  }
}

// ---------------------------------------------------------------------------------------------
// Horizontal sums and exp

T_AVX2 static INLINE float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x): x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial, times 2^n (scalef handles under/overflow).
T_AVX512 static INLINE __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  x = _mm512_min_ps(x, _mm512_set1_ps(89.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Same on 8 lanes; 2^n is built in the exponent bits, so x is clamped to the normal range.
T_AVX2 static INLINE __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // n in [-126, 128): 2^n as float bits; 2^128 is split in two factors to stay finite.
  __m256i ni = _mm256_cvtps_epi32(n);
  __m256i half = _mm256_srai_epi32(ni, 1);
  __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
  __m256 f2 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), _mm256_set1_epi32(127)), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
}

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

template <int RB, int MB, class WT>
T_AVX2 static void dense_mk_avx2(const DenseArgs& a, int64_t n, int64_t m) {
  const WT* w = static_cast<const WT*>(a.w) + n * a.ldw;
  const float* x = static_cast<const float*>(a.x) + m * a.ldx;
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

template <int RB, int MB, class WT>
T_AVX512 static void dense_mk_avx512(const DenseArgs& a, int64_t n, int64_t m) {
  const WT* w = static_cast<const WT*>(a.w) + n * a.ldw;
  const float* x = static_cast<const float*>(a.x) + m * a.ldx;
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
template <int RB, int MB>
T_AVX512BF16 static void dense_mk_bf16dp(const DenseArgs& a, int64_t n, int64_t m) {
  const bf16_t* w = static_cast<const bf16_t*>(a.w) + n * a.ldw;
  const bf16_t* x = static_cast<const bf16_t*>(a.x) + m * a.ldx;
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

// Rows [0, rows) of the tile (allocated to a multiple of 16 rows, zero-padded) against M tokens;
// out[m * ldo + n].
template <int NR, int MV>
static void gemm_tile_nm(const float* w, int64_t rows, const float* xt, int64_t M, int64_t K, float* out,
                         int64_t ldo) {
  const int64_t mp = gemm_mpad(M);
  float c[NR * 16 * MV];
  for (int64_t n0 = 0; n0 < rows; n0 += NR) {
    for (int64_t m0 = 0; m0 < mp;) {
      const bool wide = m0 + 16 * MV <= mp;
      const int64_t cw = wide ? 16 * MV : 16;
      if (wide)
        gemm_mk_avx512<NR, MV>(w + n0 * K, xt + m0 * K, K, c);
      else
        gemm_mk_avx512<NR, 1>(w + n0 * K, xt + m0 * K, K, c);
      for (int64_t n = 0; n < NR && n0 + n < rows; ++n)
        for (int64_t m = 0; m < cw && m0 + m < M; ++m) out[(m0 + m) * ldo + n0 + n] = c[n * cw + m];
      m0 += cw;
    }
  }
}

static void gemm_tile(const float* w, int64_t rows, const float* xt, int64_t M, int64_t K, float* out, int64_t ldo) {
  if (M > 16)
    gemm_tile_nm<8, 2>(w, rows, xt, M, K, out, ldo);
  else
    gemm_tile_nm<16, 1>(w, rows, xt, M, K, out, ldo);
}

// ---------------------------------------------------------------------------------------------
// MXFP4 products: out[m][n] = sum_k x[m][k] * W[n][k], W read as packed nibbles and scales.
//
// Layout: row n is nblk blocks of 16 bytes (32 E2M1 values, even element in the low nibble)
// and nblk scale bytes. The weights are decoded in registers with a 16-entry table lookup and
// never written anywhere, so each packed byte is read from memory once (4.25 bits per weight).
// Block sums are multiplied once by the block scale 2^(s-127). x is rearranged once per call so
// that the decoded lanes line up with it (prepare_x_mx), and stays fp32: on the CPUs measured,
// fp32 FMA is as fast as vdpbf16ps here and keeps fp32 activations exact.

enum class MxKind { Scalar, Avx2, Avx512 };

// Bytes ahead of the current read that the MXFP4 and GEMV kernels prefetch, in each row stream:
// about the next block of 4 rows, which the same thread reads next. The hardware prefetchers stop
// at 4 KB pages; without this a core reaches half of its bandwidth.
static constexpr int64_t kPrefetchBytes = 6144;

struct MxArgs {
  const uint8_t* blocks;  // [rows, nblk, 16]
  const uint8_t* scales;  // [rows, nblk]
  int64_t nblk;
  const void* x;  // prepared x, row stride ldx elements
  int64_t ldx;
  int64_t M;
  float* out;
  int64_t ldo;
};
using MxFn = void (*)(const MxArgs&, int64_t n, int64_t m);
struct MxKernel {
  MxFn fn[4][4];
};

static void mx_rows(const MxKernel& k, const MxArgs& a, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t rb = std::min<int64_t>(4, n1 - n);
    for (int64_t m = 0; m < a.M; m += 4) k.fn[rb - 1][std::min<int64_t>(4, a.M - m) - 1](a, n, m);
  }
}

// Prepared x (fp32):
//   Scalar: x as is.
//   Avx2:   per block of 32, the 16 even then the 16 odd elements.
//   Avx512: per group of 4 blocks (128 elements, zero-padded), 8 vectors of 16: vector j,
//           lane L holds element 8L + j (the j-th nibble of the L-th 32-bit word of the group).
static int64_t mx_prepared_len(MxKind kind, int64_t K) {
  const int64_t nblk = K / 32;
  return kind == MxKind::Avx512 ? (nblk + 3) / 4 * 128 : K;
}

template <class T>
static void prepare_x_mx(MxKind kind, const T* src, int64_t K, float* d) {
  const int64_t nblk = K / 32;
  if (kind == MxKind::Scalar) {
    for (int64_t k = 0; k < K; ++k) d[k] = to_f32(src[k]);
  } else if (kind == MxKind::Avx2) {
    for (int64_t b = 0; b < nblk; ++b)
      for (int i = 0; i < 16; ++i) {
        d[b * 32 + i] = to_f32(src[b * 32 + 2 * i]);
        d[b * 32 + 16 + i] = to_f32(src[b * 32 + 2 * i + 1]);
      }
  } else {
    const int64_t len = mx_prepared_len(kind, K);
    for (int64_t e = 0; e < len; ++e) {
      const int64_t g = e / 128, j = (e % 128) / 16, lane = e % 16, k = g * 128 + 8 * lane + j;
      d[e] = k < K ? to_f32(src[k]) : 0.f;
    }
  }
}

template <int RB, int MB>
static void mx_mk_scalar(const MxArgs& a, int64_t n, int64_t m) {
  const float* x = static_cast<const float*>(a.x) + m * a.ldx;
  for (int r = 0; r < RB; ++r) {
    const uint8_t* wb = a.blocks + (n + r) * a.nblk * 16;
    const uint8_t* sb = a.scales + (n + r) * a.nblk;
    for (int j = 0; j < MB; ++j) {
      const float* xj = x + j * a.ldx;
      float acc = 0.f;
      for (int64_t b = 0; b < a.nblk; ++b) {
        float s = 0.f;
        for (int i = 0; i < 16; ++i) {
          const uint8_t byte = wb[b * 16 + i];
          s += kT.e2m1[byte & 15] * xj[b * 32 + 2 * i] + kT.e2m1[byte >> 4] * xj[b * 32 + 2 * i + 1];
        }
        acc += s * kT.e8m0[sb[b]];
      }
      a.out[(m + j) * a.ldo + n + r] = acc;
    }
  }
}

// AVX2: pshufb maps the nibbles to 2*value as int8, which widen exactly to fp32; the block sum is
// then scaled by 2^(s-128).
template <int RB, int MB>
T_AVX2 static void mx_mk_avx2(const MxArgs& a, int64_t n, int64_t m) {
  const float* x = static_cast<const float*>(a.x) + m * a.ldx;
  const __m128i lut = _mm_loadu_si128((const __m128i*)kT.e2m1_x2);
  const __m128i m0f = _mm_set1_epi8(0x0F);
  __m256 acc[RB][MB];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j] = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.nblk; ++b) {
    for (int r = 0; r < RB; ++r) {
      const uint8_t* p = a.blocks + ((n + r) * a.nblk + b) * 16;
      _mm_prefetch((const char*)p + kPrefetchBytes, _MM_HINT_T0);
      const __m128i bytes = _mm_loadu_si128((const __m128i*)p);
      const __m128i vlo = _mm_shuffle_epi8(lut, _mm_and_si128(bytes, m0f));
      const __m128i vhi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(bytes, 4), m0f));
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(vlo));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(vlo, 8)));
      const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(vhi));
      const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(vhi, 8)));
      const __m256 sc = _mm256_set1_ps(kT.e8m0_half[a.scales[(n + r) * a.nblk + b]]);
      for (int j = 0; j < MB; ++j) {
        const float* xb = x + j * a.ldx + b * 32;
        __m256 d = _mm256_mul_ps(w0, _mm256_loadu_ps(xb));
        d = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), d);
        d = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xb + 16), d);
        d = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xb + 24), d);
        acc[r][j] = _mm256_fmadd_ps(d, sc, acc[r][j]);
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < MB; ++j) a.out[(m + j) * a.ldo + n + r] = hsum256(acc[r][j]);
}

// The scales of 16 blocks as floats 2^(s-127), built in the exponent bits (s = 0 gives the
// denormal 2^-127, s = 255 NaN). `count` < 16 reads only that many bytes.
T_AVX512 static INLINE __m512 e8m0x16(const uint8_t* s, int64_t count) {
  const __m128i bytes = count >= 16 ? _mm_loadu_si128((const __m128i*)s)
                                    : _mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << count) - 1), s);
  const __m512i v = _mm512_cvtepu8_epi32(bytes);
  __m512i bits = _mm512_slli_epi32(v, 23);
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(v, _mm512_setzero_si512()),
                               _mm512_set1_epi32(0x00400000));
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(v, _mm512_set1_epi32(255)),
                               _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(bits);
}

// AVX-512: 64 bytes (4 blocks) load as 16 words of 32 bits, 8 nibbles each. vpermps reads only
// the low 4 bits of each index, so nibble j of every word is looked up in the fp32 table after a
// shift by 4j: 8 lookups give 128 weights, with lanes 4i..4i+3 in block i, whose scale is
// broadcast to those lanes from a vector of 16 scales.
template <int RB, int MB>
T_AVX512 static void mx_mk_avx512(const MxArgs& a, int64_t n, int64_t m) {
  const float* x = static_cast<const float*>(a.x) + m * a.ldx;
  const __m512 lut = _mm512_loadu_ps(kT.e2m1);
  const __m512i lane_block = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc[RB][MB];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t b16 = 0; b16 < a.nblk; b16 += 16) {
    const int64_t nb16 = std::min<int64_t>(16, a.nblk - b16);
    __m512 sc16[RB];
    for (int r = 0; r < RB; ++r) sc16[r] = e8m0x16(a.scales + (n + r) * a.nblk + b16, nb16);
    for (int64_t g = 0; g < nb16; g += 4) {
      const int64_t nbg = std::min<int64_t>(4, nb16 - g);
      const __m512i sel = _mm512_add_epi32(lane_block, _mm512_set1_epi32(static_cast<int>(g)));
      const float* xg = x + (b16 + g) / 4 * 128;
      for (int r = 0; r < RB; ++r) {
        const uint8_t* p = a.blocks + ((n + r) * a.nblk + b16 + g) * 16;
        _mm_prefetch((const char*)p + kPrefetchBytes, _MM_HINT_T0);
        const __m512i v = nbg == 4 ? _mm512_loadu_si512(p)
                                   : _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << (4 * nbg)) - 1), p);
        __m512 w[8];
#pragma GCC unroll 8
        for (int q = 0; q < 8; ++q) w[q] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * q), lut);
        const __m512 sc = _mm512_permutexvar_ps(sel, sc16[r]);
        for (int j = 0; j < MB; ++j) {
          const float* xj = xg + j * a.ldx;
          __m512 d0 = _mm512_mul_ps(w[0], _mm512_loadu_ps(xj));
          __m512 d1 = _mm512_mul_ps(w[1], _mm512_loadu_ps(xj + 16));
#pragma GCC unroll 8
          for (int q = 2; q < 8; q += 2) {
            d0 = _mm512_fmadd_ps(w[q], _mm512_loadu_ps(xj + 16 * q), d0);
            d1 = _mm512_fmadd_ps(w[q + 1], _mm512_loadu_ps(xj + 16 * q + 16), d1);
          }
          acc[r][j] = _mm512_fmadd_ps(_mm512_add_ps(d0, d1), sc, acc[r][j]);
        }
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < MB; ++j) a.out[(m + j) * a.ldo + n + r] = _mm512_reduce_add_ps(acc[r][j]);
}

static const MxKernel kMxScalar = KERNEL_TABLE(mx_mk_scalar);
static const MxKernel kMxAvx2 = KERNEL_TABLE(mx_mk_avx2);
static const MxKernel kMxAvx512 = KERNEL_TABLE(mx_mk_avx512);

static MxKind mx_kind(Isa isa) {
  return isa >= Isa::Avx512 ? MxKind::Avx512 : isa == Isa::Avx2 ? MxKind::Avx2 : MxKind::Scalar;
}

static const MxKernel& mx_kernel(MxKind kind) {
  switch (kind) {
    case MxKind::Avx512: return kMxAvx512;
    case MxKind::Avx2: return kMxAvx2;
    default: return kMxScalar;
  }
}

// ---------------------------------------------------------------------------------------------
// MXFP4 dequantization of whole rows (prefill tiles, and the exactness test against mxfp4.py).
// Output is natural order, fp32 = value * 2^(s-127) exactly (denormal scales included).

static void decode_rows_scalar(const uint8_t* blocks, const uint8_t* scales, int64_t nblk, int64_t rows,
                               float* out) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < nblk; ++b) {
      const float sc = kT.e8m0[scales[r * nblk + b]];
      const uint8_t* wb = blocks + (r * nblk + b) * 16;
      float* o = out + (r * nblk + b) * 32;
      for (int i = 0; i < 16; ++i) {
        o[2 * i] = kT.e2m1[wb[i] & 15] * sc;
        o[2 * i + 1] = kT.e2m1[wb[i] >> 4] * sc;
      }
    }
}

T_AVX2 static void decode_rows_avx2(const uint8_t* blocks, const uint8_t* scales, int64_t nblk, int64_t rows,
                                    float* out) {
  const __m128i lut = _mm_loadu_si128((const __m128i*)kT.e2m1_x2);
  const __m128i m0f = _mm_set1_epi8(0x0F);
  for (int64_t rb = 0; rb < rows * nblk; ++rb) {
    const __m128i bytes = _mm_loadu_si128((const __m128i*)(blocks + rb * 16));
    const __m128i lo = _mm_and_si128(bytes, m0f), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), m0f);
    const __m128i v0 = _mm_shuffle_epi8(lut, _mm_unpacklo_epi8(lo, hi));  // elements 0..15
    const __m128i v1 = _mm_shuffle_epi8(lut, _mm_unpackhi_epi8(lo, hi));  // elements 16..31
    const __m256 sc = _mm256_set1_ps(kT.e8m0_half[scales[rb]]);
    float* o = out + rb * 32;
    _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v0)), sc));
    _mm256_storeu_ps(o + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v0, 8))), sc));
    _mm256_storeu_ps(o + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v1)), sc));
    _mm256_storeu_ps(o + 24, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v1, 8))), sc));
  }
  // pshufb drops the sign of -0: restore it so the output matches the reference bit for bit
  // (only codes 8 have that; a cheap fix-up pass keeps the hot loop simple).
  for (int64_t rb = 0; rb < rows * nblk; ++rb)
    for (int i = 0; i < 16; ++i) {
      const uint8_t byte = blocks[rb * 16 + i];
      if ((byte & 15) == 8) out[rb * 32 + 2 * i] *= -1.0f;
      if ((byte >> 4) == 8) out[rb * 32 + 2 * i + 1] *= -1.0f;
    }
}

T_AVX512 static void decode_rows_avx512(const uint8_t* blocks, const uint8_t* scales, int64_t nblk, int64_t rows,
                                        float* out) {
  const __m512 lut = _mm512_loadu_ps(kT.e2m1);
  const __m128i m0f = _mm_set1_epi8(0x0F);
  for (int64_t rb = 0; rb < rows * nblk; ++rb) {
    const __m128i bytes = _mm_loadu_si128((const __m128i*)(blocks + rb * 16));
    const __m128i lo = _mm_and_si128(bytes, m0f), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), m0f);
    const __m512 sc = _mm512_set1_ps(kT.e8m0[scales[rb]]);
    const __m512 v0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), lut);
    const __m512 v1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)), lut);
    _mm512_storeu_ps(out + rb * 32, _mm512_mul_ps(v0, sc));
    _mm512_storeu_ps(out + rb * 32 + 16, _mm512_mul_ps(v1, sc));
  }
}

static void decode_rows(Isa isa, const uint8_t* blocks, const uint8_t* scales, int64_t nblk, int64_t rows,
                        float* out) {
  switch (isa) {
    case Isa::Avx512Bf16:
    case Isa::Avx512: return decode_rows_avx512(blocks, scales, nblk, rows, out);
    case Isa::Avx2: return decode_rows_avx2(blocks, scales, nblk, rows, out);
    default: return decode_rows_scalar(blocks, scales, nblk, rows, out);
  }
}

T_AVX512 static void f32_to_bf16_avx512(const float* src, bf16_t* dst, int64_t n) {
  int64_t i = 0;
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF);
  for (; i + 16 <= n; i += 16) {
    const __m512 f = _mm512_loadu_ps(src + i);
    __m512i u = _mm512_castps_si512(f);
    u = _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
    u = _mm512_srli_epi32(u, 16);
    u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256((__m256i*)(dst + i), _mm512_cvtepi32_epi16(u));
  }
  for (; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

static void f32_to_bf16_row(Isa isa, const float* src, bf16_t* dst, int64_t n) {
  if (isa >= Isa::Avx512) return f32_to_bf16_avx512(src, dst, n);
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

// ---------------------------------------------------------------------------------------------
// Clamped SwiGLU on one row of interleaved gate/up pre-activations h[2I] (bias included):
// a[i] = (clamp(up, -l, l) + 1) * g * sigmoid(1.702 g), g = min(gate, l).

static constexpr float kSwigluAlpha = 1.702f;

static void swiglu_scalar(const float* gate, const float* up, float* a, int64_t I, float limit) {
  for (int64_t i = 0; i < I; ++i) {
    const float g = std::min(gate[i], limit);
    const float u = std::max(std::min(up[i], limit), -limit);
    a[i] = (u + 1.f) * (g / (1.f + std::exp(-kSwigluAlpha * g)));
  }
}

T_AVX2 static void swiglu_avx2(const float* gate, const float* up, float* a, int64_t I, float limit) {
  int64_t i = 0;
  const __m256 lim = _mm256_set1_ps(limit), nlim = _mm256_set1_ps(-limit), one = _mm256_set1_ps(1.f);
  for (; i + 8 <= I; i += 8) {
    // min/max return their second operand when one is NaN: the input goes second so NaN stays NaN.
    const __m256 g = _mm256_min_ps(lim, _mm256_loadu_ps(gate + i));
    const __m256 u = _mm256_max_ps(nlim, _mm256_min_ps(lim, _mm256_loadu_ps(up + i)));
    const __m256 e = exp256(_mm256_mul_ps(g, _mm256_set1_ps(-kSwigluAlpha)));
    _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_add_ps(u, one), _mm256_div_ps(g, _mm256_add_ps(one, e))));
  }
  swiglu_scalar(gate + i, up + i, a + i, I - i, limit);
}

T_AVX512 static void swiglu_avx512(const float* gate, const float* up, float* a, int64_t I, float limit) {
  int64_t i = 0;
  const __m512 lim = _mm512_set1_ps(limit), nlim = _mm512_set1_ps(-limit), one = _mm512_set1_ps(1.f);
  for (; i + 16 <= I; i += 16) {
    const __m512 g = _mm512_min_ps(lim, _mm512_loadu_ps(gate + i));  // NaN stays NaN (see avx2)
    const __m512 u = _mm512_max_ps(nlim, _mm512_min_ps(lim, _mm512_loadu_ps(up + i)));
    const __m512 e = exp512(_mm512_mul_ps(g, _mm512_set1_ps(-kSwigluAlpha)));
    _mm512_storeu_ps(a + i, _mm512_mul_ps(_mm512_add_ps(u, one), _mm512_div_ps(g, _mm512_add_ps(one, e))));
  }
  swiglu_scalar(gate + i, up + i, a + i, I - i, limit);
}

static void swiglu_row(Isa isa, const float* h, const float* bias, float* gate, float* up, float* a, int64_t I,
                       float limit) {
  for (int64_t i = 0; i < I; ++i) {
    gate[i] = h[2 * i] + bias[2 * i];
    up[i] = h[2 * i + 1] + bias[2 * i + 1];
  }
  if (isa >= Isa::Avx512) return swiglu_avx512(gate, up, a, I, limit);
  if (isa == Isa::Avx2) return swiglu_avx2(gate, up, a, I, limit);
  swiglu_scalar(gate, up, a, I, limit);
}

// ---------------------------------------------------------------------------------------------
// Attention: per (row, query, kv head), scores over the visible keys only (so causal prefill does
// half the work and memory stays O(keys)), an exact softmax with the sink column (the running max
// starts at the sink logit and exp(sink - max) joins the denominator), and the weighted sum of
// values. The query heads sharing a kv head are done together so each key is read once.

template <class T>
static void attn_scores_scalar(const float* q, const T* k, const int64_t* idx, int64_t nv, int64_t stride,
                               int64_t D, float scale, float* s) {
  for (int64_t i = 0; i < nv; ++i) {
    const T* kr = k + idx[i] * stride;
    float acc = 0.f;
    for (int64_t d = 0; d < D; ++d) acc += q[d] * to_f32(kr[d]);
    s[i] = acc * scale;
  }
}
template <class T>
static void attn_values_scalar(const float* p, const T* v, const int64_t* idx, int64_t nv, int64_t stride,
                               int64_t D, float* out) {
  for (int64_t i = 0; i < nv; ++i) {
    const T* vr = v + idx[i] * stride;
    for (int64_t d = 0; d < D; ++d) out[d] += p[i] * to_f32(vr[d]);
  }
}
static float exp_sub_sum_scalar(float* s, int64_t n, float mx) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += (s[i] = std::exp(s[i] - mx));
  return sum;
}

template <class T>
T_AVX2 static void attn_scores_avx2(const float* q, const T* k, const int64_t* idx, int64_t nv, int64_t stride,
                                    int64_t D, float scale, float* s) {
  for (int64_t i = 0; i < nv; ++i) {
    const T* kr = k + idx[i] * stride;
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(kr + d), acc);
    float t = hsum256(acc);
    for (; d < D; ++d) t += q[d] * to_f32(kr[d]);
    s[i] = t * scale;
  }
}
template <class T>
T_AVX2 static void attn_values_avx2(const float* p, const T* v, const int64_t* idx, int64_t nv, int64_t stride,
                                    int64_t D, float* out) {
  for (int64_t i = 0; i < nv; ++i) {
    const T* vr = v + idx[i] * stride;
    const __m256 pi = _mm256_set1_ps(p[i]);
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      _mm256_storeu_ps(out + d, _mm256_fmadd_ps(pi, load8(vr + d), _mm256_loadu_ps(out + d)));
    for (; d < D; ++d) out[d] += p[i] * to_f32(vr[d]);
  }
}
T_AVX2 static float exp_sub_sum_avx2(float* s, int64_t n, float mx) {
  __m256 sum = _mm256_setzero_ps();
  const __m256 m = _mm256_set1_ps(mx);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + i), m));
    _mm256_storeu_ps(s + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  return hsum256(sum) + exp_sub_sum_scalar(s + i, n - i, mx);
}

template <class T>
T_AVX512 static void attn_scores_avx512(const float* q, const T* k, const int64_t* idx, int64_t nv, int64_t stride,
                                        int64_t D, float scale, float* s) {
  const int64_t tail = D % 16;
  const __mmask16 mk = static_cast<__mmask16>((1u << tail) - 1);
  for (int64_t i = 0; i < nv; ++i) {
    const T* kr = k + idx[i] * stride;
    __m512 acc = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(kr + d), acc);
    if (tail) acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, q + d), load16(kr + d, mk), acc);
    s[i] = _mm512_reduce_add_ps(acc) * scale;
  }
}
template <class T>
T_AVX512 static void attn_values_avx512(const float* p, const T* v, const int64_t* idx, int64_t nv, int64_t stride,
                                        int64_t D, float* out) {
  const int64_t tail = D % 16;
  const __mmask16 mk = static_cast<__mmask16>((1u << tail) - 1);
  for (int64_t i = 0; i < nv; ++i) {
    const T* vr = v + idx[i] * stride;
    const __m512 pi = _mm512_set1_ps(p[i]);
    int64_t d = 0;
    for (; d + 16 <= D; d += 16)
      _mm512_storeu_ps(out + d, _mm512_fmadd_ps(pi, load16(vr + d), _mm512_loadu_ps(out + d)));
    if (tail)
      _mm512_mask_storeu_ps(out + d, mk,
                            _mm512_fmadd_ps(pi, load16(vr + d, mk), _mm512_maskz_loadu_ps(mk, out + d)));
  }
}
T_AVX512 static float exp_sub_sum_avx512(float* s, int64_t n, float mx) {
  __m512 sum = _mm512_setzero_ps();
  const __m512 m = _mm512_set1_ps(mx);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + i), m));
    _mm512_storeu_ps(s + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum) + exp_sub_sum_scalar(s + i, n - i, mx);
}

// Rows of one kv head are Hkv * D apart, a stride the hardware prefetchers follow poorly.
static constexpr int64_t kAttnPrefetchKeys = 16;

// 16 vectors -> one vector of their 16 horizontal sums (lane i = sum of p[i]), in 45 shuffles/adds.
T_AVX512 static INLINE __m512 reduce16(const __m512* p) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(p[2 * i], p[2 * i + 1]), _mm512_unpackhi_ps(p[2 * i], p[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// Up to 4 heads' weighted sums of values, kept in registers while the values stream past.
template <class T, int NC, int HB>
T_AVX512 static void attn_values_heads_avx512(const float* p, int64_t ldp, const T* v, const int64_t* idx, int64_t nv,
                                              int64_t stride, float* out, int64_t D) {
  __m512 acc[HB][NC];
  for (int h = 0; h < HB; ++h)
    for (int c = 0; c < NC; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t i = 0; i < nv; ++i) {
    if (i + kAttnPrefetchKeys < nv) {
      const char* ahead = reinterpret_cast<const char*>(v + idx[i + kAttnPrefetchKeys] * stride);
      for (int64_t c = 0; c < 16 * NC * static_cast<int64_t>(sizeof(T)); c += 64) _mm_prefetch(ahead + c, _MM_HINT_T0);
    }
    const T* vr = v + idx[i] * stride;
    __m512 vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = load16(vr + 16 * c);
    for (int h = 0; h < HB; ++h) {
      const __m512 ph = _mm512_set1_ps(p[h * ldp + i]);
      for (int c = 0; c < NC; ++c) acc[h][c] = _mm512_fmadd_ps(ph, vv[c], acc[h][c]);
    }
  }
  for (int h = 0; h < HB; ++h)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(out + h * D + 16 * c, acc[h][c]);
}

// All heads of one kv group for D = 16 * NC. Scores: each key is widened once and dotted with every
// query head of the group; 16 keys' partial vectors are summed together by reduce16. Then an exact
// softmax with the sink column, then the values (4 heads at a time).
template <class T, int NC>
T_AVX512 static void attn_group_avx512(const float* q, int64_t group, const T* k, const T* v, const int64_t* idx,
                                       int64_t nv, int64_t stride, float scale, const float* sinks, float* s,
                                       int64_t lds, float* part, float* out) {
  constexpr int64_t D = 16 * NC;
  for (int64_t j0 = 0; j0 < nv; j0 += 16) {
    const int64_t nj = std::min<int64_t>(16, nv - j0);
    for (int64_t jj = 0; jj < 16; ++jj) {
      if (j0 + jj + kAttnPrefetchKeys < nv) {  // keys of one kv head are strided: prefetch by index
        const char* ahead = reinterpret_cast<const char*>(k + idx[j0 + jj + kAttnPrefetchKeys] * stride);
        for (int64_t c = 0; c < D * static_cast<int64_t>(sizeof(T)); c += 64) _mm_prefetch(ahead + c, _MM_HINT_T0);
      }
      __m512 kv[NC];
      const T* kr = k + idx[j0 + std::min(jj, nj - 1)] * stride;  // past the end: repeat the last key
      for (int c = 0; c < NC; ++c) kv[c] = load16(kr + 16 * c);
      for (int64_t h = 0; h < group; ++h) {
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + h * D), kv[0]);
        for (int c = 1; c < NC; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * D + 16 * c), kv[c], acc);
        _mm512_storeu_ps(part + (h * 16 + jj) * 16, acc);
      }
    }
    const __mmask16 mk = static_cast<__mmask16>((1u << nj) - 1);
    for (int64_t h = 0; h < group; ++h) {
      __m512 pv[16];
      for (int i = 0; i < 16; ++i) pv[i] = _mm512_loadu_ps(part + (h * 16 + i) * 16);
      _mm512_mask_storeu_ps(s + h * lds + j0, mk, _mm512_mul_ps(reduce16(pv), _mm512_set1_ps(scale)));
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    float* sh = s + h * lds;
    __m512 mv = _mm512_set1_ps(sinks[h]);
    int64_t i = 0;
    for (; i + 16 <= nv; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(sh + i));
    float mx = _mm512_reduce_max_ps(mv);
    for (; i < nv; ++i) mx = std::max(mx, sh[i]);
    const float inv = 1.0f / (exp_sub_sum_avx512(sh, nv, mx) + std::exp(sinks[h] - mx));
    const __m512 iv = _mm512_set1_ps(inv);
    for (i = 0; i + 16 <= nv; i += 16) _mm512_storeu_ps(sh + i, _mm512_mul_ps(_mm512_loadu_ps(sh + i), iv));
    for (; i < nv; ++i) sh[i] *= inv;
  }
  int64_t h = 0;
  for (; h + 4 <= group; h += 4) attn_values_heads_avx512<T, NC, 4>(s + h * lds, lds, v, idx, nv, stride, out + h * D, D);
  switch (group - h) {
    case 3: attn_values_heads_avx512<T, NC, 3>(s + h * lds, lds, v, idx, nv, stride, out + h * D, D); break;
    case 2: attn_values_heads_avx512<T, NC, 2>(s + h * lds, lds, v, idx, nv, stride, out + h * D, D); break;
    case 1: attn_values_heads_avx512<T, NC, 1>(s + h * lds, lds, v, idx, nv, stride, out + h * D, D); break;
    default: break;
  }
}

template <class T>
using AttnGroupFn = void (*)(const float*, int64_t, const T*, const T*, const int64_t*, int64_t, int64_t, float,
                             const float*, float*, int64_t, float*, float*);

template <class T>
static AttnGroupFn<T> attn_group_kernel(Isa isa, int64_t D) {
  if (isa < Isa::Avx512 || D % 16 != 0 || D > 64) return nullptr;
  switch (D / 16) {
    case 1: return attn_group_avx512<T, 1>;
    case 2: return attn_group_avx512<T, 2>;
    case 3: return attn_group_avx512<T, 3>;
    default: return attn_group_avx512<T, 4>;
  }
}

template <class T>
struct AttnOps {
  void (*scores)(const float*, const T*, const int64_t*, int64_t, int64_t, int64_t, float, float*);
  void (*values)(const float*, const T*, const int64_t*, int64_t, int64_t, int64_t, float*);
  float (*exp_sub_sum)(float*, int64_t, float);
};

template <class T>
static AttnOps<T> attn_ops(Isa isa) {
  if (isa >= Isa::Avx512) return {attn_scores_avx512<T>, attn_values_avx512<T>, exp_sub_sum_avx512};
  if (isa == Isa::Avx2) return {attn_scores_avx2<T>, attn_values_avx2<T>, exp_sub_sum_avx2};
  return {attn_scores_scalar<T>, attn_values_scalar<T>, exp_sub_sum_scalar};
}

// key_rows (optional, [B, S]): key j of row b is row key_rows[b, j] of k and v seen as [R, Hkv, D]
// (a paged cache read in place through its block table); without it, k and v are [B, S, Hkv, D].
template <class T>
static void attention_impl(const T* qp, const T* kp, const T* vp, const float* sp, const int64_t* qpos,
                           const int64_t* kpos, int64_t B, int64_t Tq, int64_t Hq, int64_t D, int64_t S, int64_t Hkv,
                           int64_t window, const int64_t* key_rows, float* op) {
  const int64_t group = Hq / Hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const AttnOps<T> ops = attn_ops<T>(g_isa);

  const AttnGroupFn<T> group_fn = attn_group_kernel<T>(g_isa, D);
  const float* sinks_f = sp;

  // Units walk the queries of one (row, kv head) in turn, so its keys and values stay in cache.
  parallel_units(B * Tq * Hkv, [&](int64_t u, std::vector<float>& scratch) {
    const int64_t t = u % Tq, g = (u / Tq) % Hkv, b = u / (Tq * Hkv), bt = b * Tq + t;
    const int64_t qi = qpos[bt];
    std::vector<int64_t> idx;  // the visible keys
    idx.reserve(S);
    for (int64_t j = 0; j < S; ++j) {
      const int64_t kj = kpos[b * S + j];
      if (kj >= 0 && kj <= qi && (window <= 0 || kj > qi - window)) idx.push_back(key_rows ? key_rows[b * S + j] : j);
    }
    const int64_t nv = static_cast<int64_t>(idx.size());
    const int64_t lds = (nv + 15) / 16 * 16;
    scratch.resize(group * lds + 2 * group * D + group * 256);
    float* s = scratch.data();
    float* qf = s + group * lds;
    float* acc = qf + group * D;
    float* part = acc + group * D;
    const T* kbase = kp + ((key_rows ? 0 : b * S) * Hkv + g) * D;
    const T* vbase = vp + ((key_rows ? 0 : b * S) * Hkv + g) * D;
    for (int64_t h = 0; h < group; ++h)
      for (int64_t d = 0; d < D; ++d) qf[h * D + d] = to_f32(qp[(bt * Hq + g * group + h) * D + d]);
    if (group_fn) {
      group_fn(qf, group, kbase, vbase, idx.data(), nv, Hkv * D, scale, sinks_f + g * group, s, lds, part, acc);
    } else {
      for (int64_t h = 0; h < group; ++h) {
        float* sh = s + h * lds;
        ops.scores(qf + h * D, kbase, idx.data(), nv, Hkv * D, D, scale, sh);
        const float sink = sinks_f[g * group + h];
        float mx = sink;  // the sink column takes part in the max
        for (int64_t i = 0; i < nv; ++i) mx = std::max(mx, sh[i]);
        const float inv = 1.0f / (ops.exp_sub_sum(sh, nv, mx) + std::exp(sink - mx));
        for (int64_t i = 0; i < nv; ++i) sh[i] *= inv;
        std::fill(acc + h * D, acc + (h + 1) * D, 0.f);
        ops.values(sh, vbase, idx.data(), nv, Hkv * D, D, acc + h * D);
      }
    }
    std::memcpy(op + (bt * Hq + g * group) * D, acc, group * D * sizeof(float));
  });
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
// beyond, it runs the tile GEMM (AVX-512, bf16 weights) or torch's BLAS (fp32 weights).
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

// out [M, N] fp32 = x [M, K] W[N, K]^T + bias; x and W share a dtype (bf16 or fp32). Many rows of
// fp32 weights go to torch's BLAS instead (the caller's business): this serves the rest.
static void linear_impl(const void* x, const void* w, bool bf16, const float* bp, int64_t M, int64_t N, int64_t K,
                        float* op) {
  const Isa isa = g_isa;
  auto add_bias = [&](int64_t n0, int64_t n1) {
    if (bp)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n0; n < n1; ++n) op[m * N + n] += bp[n];
  };
  if (M > kGemvMaxRows && isa >= Isa::Avx512) {
    // GEMM: x packed once, bf16 weights widened to fp32 a tile of rows at a time.
    std::vector<float> xt(gemm_mpad(M) * K);
    if (bf16)
      pack_xt(static_cast<const bf16_t*>(x), K, nullptr, M, K, xt.data());
    else
      pack_xt(static_cast<const float*>(x), K, nullptr, M, K, xt.data());
    constexpr int64_t rows = 32;
    parallel_units((N + rows - 1) / rows, [&](int64_t u, std::vector<float>& tile) {
      const int64_t n0 = u * rows, nr = std::min(N, n0 + rows) - n0;
      tile.resize(rows * K);
      widen_bf16_avx512(static_cast<const bf16_t*>(w) + n0 * K, tile.data(), nr * K);
      std::fill(tile.begin() + nr * K, tile.end(), 0.f);
      gemm_tile(tile.data(), nr, xt.data(), M, K, op + n0, N);
      add_bias(n0, n0 + nr);
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
    else
      dense_rows(kern, a, n0, n1);
    add_bias(n0, n1);
  });
}

// ---------------------------------------------------------------------------------------------
// MXFP4 x int8 activations (AVX-512 VNNI + VBMI): the expert path for bfloat16 models.
//
// As llama.cpp does for MXFP4 (its q8_0 activations), each block of 32 activations is rounded to
// int8 with one fp32 scale d = max|x| / 127. A block's dot product with the weights is then exact
// integer arithmetic: vpermb turns 64 packed bytes into 128 weights as bytes 2*value + 12 in
// [0, 24] (vpdpbusd multiplies unsigned by signed bytes), vpdpbusd adds 64 byte products per
// instruction, and the 12 * sum(q) that the offset adds is taken off once per block. The block
// sum is scaled once by (d / 2) * 2^(s-127). The activation rounding is the only approximation
// (at most max|x| / 254 per element, about the size of bf16's own rounding); fp32 models keep the
// exact fp32 path above unless asked (set_int8_activations).
//
// Prepared activations (quantize_q8_*): per token, G = ceil(nblk / 16) groups of 16 blocks,
//   q      G * 512 bytes: per 64-byte weight chunk (4 blocks), 64 bytes of the even elements
//          (the low nibbles) then 64 of the odd ones, in the chunk's byte order;
//   dh     G * 16 floats: d / 2 per block (0 past the end);
//   ncorr  G * 16 int32:  -12 * sum(q) per block.
// For the many-token product the 16 tokens of a token block are interleaved instead (Q8Tile).

enum class Int8Activations : int { Never = 0, Bf16 = 1, Always = 2 };
static Int8Activations g_int8_act = Int8Activations::Bf16;

static bool cpu_has_vnni_vbmi() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi");
#else
  return false;
#endif
}
static const bool g_has_vnni = cpu_has_vnni_vbmi();

static bool use_int8_activations(Isa isa, bool x_bf16) {
  if (!g_has_vnni || isa < Isa::Avx512) return false;
  return g_int8_act == Int8Activations::Always || (g_int8_act == Int8Activations::Bf16 && x_bf16);
}




static constexpr int kQ8Offset = 12;  // 2 * 6, the largest E2M1 magnitude, doubled

// Byte j of the table is 2 * e2m1(j % 16) + 12; vpermb reads 6 index bits, so bits 4-5 of a
// packed byte (the other nibble) select the same entry.
struct Q8Tables {
  uint8_t lut[64];
  Q8Tables() {
    for (int j = 0; j < 64; ++j) lut[j] = static_cast<uint8_t>(kT.e2m1_x2[j % 16] + kQ8Offset);
  }
};
static const Q8Tables kQ8;

// One row of K activations -> int8 q (natural order), d / 2 and -12 * sum(q) per block.
// max that keeps a NaN (std::max drops it when it comes second).
static INLINE float nan_max(float a, float b) { return std::isnan(a) || b <= a ? a : b; }

// 127 / amax, or 0 where amax is 0 or so small that the quotient overflows (as the reference).
static INLINE float int8_inverse_step(float amax) {
  const float inv = 127.f / amax;
  return amax > 0.f && std::isfinite(inv) ? inv : 0.f;
}

template <class T>
static void quantize_q8_blocks(const T* src, int64_t K, int8_t* q, float* dh, int32_t* ncorr,
                               int32_t offset = kQ8Offset) {
  for (int64_t b = 0; b < K / 32; ++b) {
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = nan_max(amax, std::fabs(to_f32(src[b * 32 + i])));
    const float inv = int8_inverse_step(amax);
    int32_t sum = 0;
    for (int i = 0; i < 32; ++i) {
      const float v = to_f32(src[b * 32 + i]) * inv;
      const int32_t qi = std::isfinite(v) ? static_cast<int32_t>(std::nearbyint(v)) : 0;
      q[b * 32 + i] = static_cast<int8_t>(qi);
      sum += qi;
    }
    dh[b] = std::isfinite(amax) ? amax / 127.f * 0.5f : std::numeric_limits<float>::quiet_NaN();  // NaN/inf in, NaN out
    ncorr[b] = -offset * sum;
  }
}

static int64_t q8_groups(int64_t nblk) { return (nblk + 15) / 16; }
// Bytes of one prepared token for the matrix-vector kernel: q, then dh, then ncorr.
static int64_t q8_row_bytes(int64_t nblk) { return q8_groups(nblk) * (512 + 64 + 64); }

template <class T>
static void prepare_q8_row(const T* src, int64_t K, uint8_t* dst, std::vector<float>& scratch) {
  const int64_t nblk = K / 32, G = q8_groups(nblk);
  int8_t* q = reinterpret_cast<int8_t*>(dst);
  float* dh = reinterpret_cast<float*>(dst + G * 512);
  int32_t* ncorr = reinterpret_cast<int32_t*>(dst + G * 576);
  std::memset(dst, 0, q8_row_bytes(nblk));
  scratch.resize(K / 4 + 1);
  int8_t* qn = reinterpret_cast<int8_t*>(scratch.data());  // natural order, K bytes
  quantize_q8_blocks(src, K, qn, dh, ncorr);
  // Chunk c (blocks 4c..4c+3): byte j holds elements 2(j%16) and 2(j%16)+1 of block 4c + j/16.
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t c = b / 4, j0 = (b % 4) * 16;
    for (int i = 0; i < 16; ++i) {
      q[c * 128 + j0 + i] = qn[b * 32 + 2 * i];
      q[c * 128 + 64 + j0 + i] = qn[b * 32 + 2 * i + 1];
    }
  }
}

#define T_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi")))

// a0..a3: lane l of a_c holds part of block 4c + l/4 -> lane b holds the sum for block b.
T_VNNI static INLINE __m512i sum_lane_quads(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const __m512i p01 = _mm512_add_epi32(_mm512_permutex2var_epi32(a0, even, a1), _mm512_permutex2var_epi32(a0, odd, a1));
  const __m512i p23 = _mm512_add_epi32(_mm512_permutex2var_epi32(a2, even, a3), _mm512_permutex2var_epi32(a2, odd, a3));
  return _mm512_add_epi32(_mm512_permutex2var_epi32(p01, even, p23), _mm512_permutex2var_epi32(p01, odd, p23));
}

struct Q8Args {
  const uint8_t* blocks;  // [rows, nblk, 16]
  const uint8_t* scales;  // [rows, nblk]
  int64_t nblk;
  const uint8_t* x;  // prepared tokens, q8_row_bytes(nblk) apart
  int64_t M;
  float* out;
  int64_t ldo;
};

// Rows [n0, n1) against MB <= 4 tokens, one row at a time (the rows are one sequential stream).
template <int MB>
T_VNNI static void q8_gemv_rows(const Q8Args& a, int64_t m, int64_t n0, int64_t n1) {
  const int64_t nblk = a.nblk, G = q8_groups(nblk), rb = q8_row_bytes(nblk);
  const __m512i lut = _mm512_loadu_si512(kQ8.lut);
  const uint8_t* xq[MB];
  for (int j = 0; j < MB; ++j) xq[j] = a.x + (m + j) * rb;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = a.blocks + n * nblk * 16;
    const uint8_t* srow = a.scales + n * nblk;
    __m512 facc[MB];
    for (int j = 0; j < MB; ++j) facc[j] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const int64_t nb = std::min<int64_t>(16, nblk - 16 * g);
      __m512i ia[MB][4];
      for (int c = 0; c < 4; ++c) {
        const int64_t nbc = std::max<int64_t>(0, std::min<int64_t>(4, nb - 4 * c));
        for (int j = 0; j < MB; ++j) ia[j][c] = _mm512_setzero_si512();
        if (nbc == 0) continue;
        const uint8_t* p = wrow + (16 * g + 4 * c) * 16;
        _mm_prefetch((const char*)p + kPrefetchBytes, _MM_HINT_T0);
        const __m512i v = nbc == 4 ? _mm512_loadu_si512(p)
                                   : _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << (4 * nbc)) - 1), p);
        const __m512i lo = _mm512_permutexvar_epi8(v, lut);
        const __m512i hi = _mm512_permutexvar_epi8(_mm512_srli_epi16(v, 4), lut);
        for (int j = 0; j < MB; ++j) {
          const uint8_t* qc = xq[j] + g * 512 + c * 128;
          ia[j][c] = _mm512_dpbusd_epi32(ia[j][c], lo, _mm512_loadu_si512(qc));
          ia[j][c] = _mm512_dpbusd_epi32(ia[j][c], hi, _mm512_loadu_si512(qc + 64));
        }
      }
      const __m512 sc = e8m0x16(srow + 16 * g, nb);
      for (int j = 0; j < MB; ++j) {
        const float* dh = reinterpret_cast<const float*>(xq[j] + G * 512) + 16 * g;
        const int32_t* nc = reinterpret_cast<const int32_t*>(xq[j] + G * 576) + 16 * g;
        __m512i s = sum_lane_quads(ia[j][0], ia[j][1], ia[j][2], ia[j][3]);
        s = _mm512_add_epi32(s, _mm512_loadu_si512(nc));
        facc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(sc, _mm512_loadu_ps(dh)), facc[j]);
      }
    }
    for (int j = 0; j < MB; ++j) a.out[(m + j) * a.ldo + n] = _mm512_reduce_add_ps(facc[j]);
  }
}

static void q8_rows(const Q8Args& a, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < a.M; m += 4) {
    switch (std::min<int64_t>(4, a.M - m)) {
      case 1: q8_gemv_rows<1>(a, m, n0, n1); break;
      case 2: q8_gemv_rows<2>(a, m, n0, n1); break;
      case 3: q8_gemv_rows<3>(a, m, n0, n1); break;
      default: q8_gemv_rows<4>(a, m, n0, n1); break;
    }
  }
}

// Many tokens: the expert's rows are decoded once per call into a byte tile (2 * value + 12,
// natural order) with their scales as floats, and multiplied with tokens packed 16 at a time:
// xq [K/4][16][4] (4 consecutive elements of each token form one 32-bit lane), dh [nblk][16],
// ncorr [nblk][16]. The micro-kernel broadcasts 4 weight bytes of NR rows and runs vpdpbusd with
// MV vectors of 16 tokens; after each block of 32 the integer sums are scaled into fp32.
static int64_t q8_tile_bytes(int64_t nblk) { return 16 * nblk * 32 + 2 * 64 * nblk; }  // per 16 tokens

template <class T>
static void prepare_q8_tile(const T* src, int64_t ld, const int64_t* rows, int64_t M, int64_t K, uint8_t* dst,
                            std::vector<float>& scratch, int32_t offset = kQ8Offset) {
  const int64_t nblk = K / 32, tb = q8_tile_bytes(nblk);
  scratch.resize((K + 8 * nblk) / 4 + 1);
  int8_t* qn = reinterpret_cast<int8_t*>(scratch.data());
  float* dh = scratch.data() + K / 4;
  int32_t* nc = reinterpret_cast<int32_t*>(dh + nblk);
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    uint8_t* blk = dst + (m0 / 16) * tb;
    std::memset(blk, 0, tb);
    int8_t* xq = reinterpret_cast<int8_t*>(blk);
    float* bdh = reinterpret_cast<float*>(blk + 16 * K);
    int32_t* bnc = reinterpret_cast<int32_t*>(blk + 16 * K + 64 * nblk);
    for (int64_t i = 0; i < 16 && m0 + i < M; ++i) {
      const int64_t m = m0 + i;
      quantize_q8_blocks(src + (rows ? rows[m] : m) * ld, K, qn, dh, nc, offset);
      for (int64_t k = 0; k < K; ++k) xq[(k / 4) * 64 + i * 4 + k % 4] = qn[k];
      for (int64_t b = 0; b < nblk; ++b) {
        bdh[b * 16 + i] = dh[b];
        bnc[b * 16 + i] = nc[b];
      }
    }
  }
}

// Rows of packed MXFP4 -> bytes 2 * value + 12 in natural order, and the scales as floats.
T_VNNI static void decode_rows_q8(const uint8_t* blocks, const uint8_t* scales, int64_t nblk, int64_t rows,
                                  uint8_t* out, float* ws) {
  const __m512i lut = _mm512_loadu_si512(kQ8.lut);
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  const int64_t n = rows * nblk;  // blocks of 16 bytes -> 32 bytes
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m512i v = _mm512_loadu_si512(blocks + i * 16);
    const __m512i lo = _mm512_permutexvar_epi8(v, lut), hi = _mm512_permutexvar_epi8(_mm512_srli_epi16(v, 4), lut);
    // Per 128-bit lane (one block): unpacklo = its elements 0..15, unpackhi = 16..31.
    const __m512i a = _mm512_unpacklo_epi8(lo, hi), b = _mm512_unpackhi_epi8(lo, hi);
    _mm512_storeu_si512(out + i * 32, _mm512_permutex2var_epi64(a, first, b));
    _mm512_storeu_si512(out + i * 32 + 64, _mm512_permutex2var_epi64(a, second, b));
  }
  for (; i < n; ++i)
    for (int k = 0; k < 16; ++k) {
      out[i * 32 + 2 * k] = kQ8.lut[blocks[i * 16 + k] & 15];
      out[i * 32 + 2 * k + 1] = kQ8.lut[blocks[i * 16 + k] >> 4];
    }
  for (int64_t j = 0; j < n; ++j) ws[j] = kT.e8m0[scales[j]];
}

template <int NR, int MV>
T_VNNI static void q8_gemm_mk(const uint8_t* w, const float* ws, int64_t K, const uint8_t* x, float* c) {
  const int64_t nblk = K / 32, tb = q8_tile_bytes(nblk);
  __m512 fa[NR][MV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < MV; ++v) fa[r][v] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nblk; ++b) {
    __m512i ia[NR][MV];
    for (int v = 0; v < MV; ++v) {
      const __m512i nc = _mm512_loadu_si512(x + v * tb + 16 * K + 64 * nblk + b * 64);
      for (int r = 0; r < NR; ++r) ia[r][v] = nc;
    }
#pragma GCC unroll 8
    for (int kq = 0; kq < 8; ++kq) {
      __m512i xv[MV];
      for (int v = 0; v < MV; ++v) xv[v] = _mm512_loadu_si512(x + v * tb + (b * 8 + kq) * 64);
      for (int r = 0; r < NR; ++r) {
        int32_t w4;
        std::memcpy(&w4, w + r * K + b * 32 + kq * 4, 4);
        const __m512i wb = _mm512_set1_epi32(w4);
        for (int v = 0; v < MV; ++v) ia[r][v] = _mm512_dpbusd_epi32(ia[r][v], wb, xv[v]);
      }
    }
    for (int v = 0; v < MV; ++v) {
      const __m512 dh = _mm512_loadu_ps(reinterpret_cast<const float*>(x + v * tb + 16 * K) + b * 16);
      for (int r = 0; r < NR; ++r)
        fa[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r][v]), _mm512_mul_ps(dh, _mm512_set1_ps(ws[r * nblk + b])),
                                   fa[r][v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < MV; ++v) _mm512_storeu_ps(c + (r * MV + v) * 16, fa[r][v]);
}

// Rows [0, rows) of a decoded tile (rows padded to a multiple of 4 with zero bytes) against M tokens.
static void q8_gemm_tile(const uint8_t* w, const float* ws, int64_t rows, const uint8_t* x, int64_t M, int64_t K,
                         float* out, int64_t ldo) {
  constexpr int NR = 4;
  const int64_t tb = q8_tile_bytes(K / 32), nblk = K / 32;
  float c[NR * 2 * 16];
  for (int64_t n0 = 0; n0 < rows; n0 += NR) {
    for (int64_t m0 = 0; m0 < M;) {
      const bool wide = m0 + 16 < M;
      const int64_t cw = wide ? 32 : 16;
      if (wide)
        q8_gemm_mk<NR, 2>(w + n0 * K, ws + n0 * nblk, K, x + (m0 / 16) * tb, c);
      else
        q8_gemm_mk<NR, 1>(w + n0 * K, ws + n0 * nblk, K, x + (m0 / 16) * tb, c);
      for (int64_t r = 0; r < NR && n0 + r < rows; ++r)
        for (int64_t m = 0; m < cw && m0 + m < M; ++m) {
          const int64_t v = m / 16;
          out[(m0 + m) * ldo + n0 + r] = c[(r * (cw / 16) + v) * 16 + m % 16];
        }
      m0 += cw;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Dense int8 (--dense-int8): attention projections and lm_head quantized at load to int8 with one
// fp32 scale per row, stored as bytes w + 128 (vpdpbusd's unsigned side), which halves the bytes
// a decode step reads from them. Activations are rounded to int8 per block of 32 as for the
// experts. In natural order a 64-byte chunk of a row meets two activation blocks: vpdpbusd gives
// 16 lanes of exact integer sums, lanes 0-7 in the first block and 8-15 in the second, which are
// scaled by their block's d and accumulated in fp32; the row scale is applied once at the end.
//
// Prepared activations, per token (K padded to Kp = a multiple of 64 with zeros):
//   q      Kp int8
//   d      Kp / 4 floats: lane l of chunk c holds the d of the block of elements 64c + 4l
//   ncorr  Kp / 4 int32: -128 * (sum of the lane's 4 q), which the +128 of the weights adds

static int64_t i8_kpad(int64_t K) { return (K + 63) / 64 * 64; }
static int64_t i8_row_bytes(int64_t K) { return i8_kpad(K) * 3; }

template <class T>
static void prepare_i8_row(const T* src, int64_t K, uint8_t* dst, std::vector<float>& scratch) {
  const int64_t Kp = i8_kpad(K), nblk = K / 32;
  std::memset(dst, 0, i8_row_bytes(K));
  int8_t* q = reinterpret_cast<int8_t*>(dst);
  float* d = reinterpret_cast<float*>(dst + Kp);
  int32_t* nc = reinterpret_cast<int32_t*>(dst + 2 * Kp);
  scratch.resize(2 * nblk);
  float* dh = scratch.data();
  int32_t* unused = reinterpret_cast<int32_t*>(dh + nblk);
  quantize_q8_blocks(src, K, q, dh, unused);
  for (int64_t l = 0; l < K / 4; ++l) {
    d[l] = 2.f * dh[l / 8];  // quantize_q8_blocks gives d / 2 (the experts' weights are doubled)
    nc[l] = -128 * (q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
  }
}

struct I8Args {
  const uint8_t* w;    // [N, K] bytes w + 128
  const float* scale;  // [N]
  const uint8_t* x;    // prepared tokens, i8_row_bytes(K) apart
  int64_t M, K;
  float* out;  // out[m * ldo + n]
  int64_t ldo;
};
using I8Fn = void (*)(const I8Args&, int64_t n, int64_t m);
struct I8Kernel {
  I8Fn fn[4][4];
};

template <int RB, int MB>
T_VNNI static void i8_mk_vnni(const I8Args& a, int64_t n, int64_t m) {
  const int64_t K = a.K, Kp = i8_kpad(K), rb = i8_row_bytes(K);
  __m512 acc[RB][MB];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < MB; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask16 mk = k + 64 <= K ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>(0x00FF);
    __m512i w[RB];
    for (int r = 0; r < RB; ++r) {
      const uint8_t* p = a.w + (n + r) * K + k;
      _mm_prefetch((const char*)p + kDensePrefetchRows * K, _MM_HINT_T0);
      w[r] = _mm512_maskz_loadu_epi32(mk, p);
    }
    for (int j = 0; j < MB; ++j) {
      const uint8_t* xr = a.x + (m + j) * rb;
      const __m512i xv = _mm512_loadu_si512(xr + k);
      const __m512i nc = _mm512_loadu_si512(xr + 2 * Kp + k);
      const __m512 d = _mm512_loadu_ps(reinterpret_cast<const float*>(xr + Kp) + k / 4);
      for (int r = 0; r < RB; ++r)
        acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(nc, w[r], xv)), d, acc[r][j]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < MB; ++j) a.out[(m + j) * a.ldo + n + r] = _mm512_reduce_add_ps(acc[r][j]) * a.scale[n + r];
}

template <int RB, int MB>
static void i8_mk_scalar(const I8Args& a, int64_t n, int64_t m) {
  const int64_t K = a.K, Kp = i8_kpad(K), rb = i8_row_bytes(K);
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < MB; ++j) {
      const uint8_t* xr = a.x + (m + j) * rb;
      const int8_t* q = reinterpret_cast<const int8_t*>(xr);
      const float* d = reinterpret_cast<const float*>(xr + Kp);
      const uint8_t* w = a.w + (n + r) * K;
      float acc = 0.f;
      for (int64_t l = 0; l < K / 4; ++l) {
        int32_t s = 0;
        for (int i = 0; i < 4; ++i) s += (static_cast<int32_t>(w[4 * l + i]) - 128) * q[4 * l + i];
        acc += static_cast<float>(s) * d[l];
      }
      a.out[(m + j) * a.ldo + n + r] = acc * a.scale[n + r];
    }
}

static const I8Kernel kI8Vnni = KERNEL_TABLE(i8_mk_vnni);
static const I8Kernel kI8Scalar = KERNEL_TABLE(i8_mk_scalar);

// Weight rows -> bytes round(w * 127 / max|row|) + 128 and the scale max|row| / 127.
template <class T>
static void quantize_rows_i8(const T* w, int64_t N, int64_t K, uint8_t* out, float* scale) {
  parallel_units(N, [&](int64_t n, std::vector<float>&) {
    const T* row = w + n * K;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = nan_max(amax, std::fabs(to_f32(row[k])));
    if (!std::isfinite(amax)) {  // the caller refuses the weight (its scale is not finite)
      std::memset(out + n * K, 128, K);
      scale[n] = std::numeric_limits<float>::quiet_NaN();
      return;
    }
    const float inv = int8_inverse_step(amax);
    for (int64_t k = 0; k < K; ++k)
      out[n * K + k] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(to_f32(row[k]) * inv)) + 128);
    scale[n] = amax / 127.f;
  });
}


// y = round_int8_blocks(x) (W8 * scale)^T + b. Few rows: the VNNI matrix-vector kernel; many rows:
// the experts' int8 tile product, so a row gets the same integer sums either way. Without VNNI
// (where --dense-int8 is refused) the scalar matrix-vector kernel serves every size.
// out [M, N] fp32 = round_int8_blocks(x) (W8 * scale)^T; the caller adds the bias.
static void linear_int8_impl(const void* x, bool x_bf16, const uint8_t* w, const float* scale, int64_t M,
                             int64_t N, int64_t K, float* op) {
  const Isa isa = g_isa;


  if (M > kGemvMaxRows && g_has_vnni && isa >= Isa::Avx512) {
    // The experts' int8 tile product: the stored bytes are already its tile (offset 128 instead of
    // 12), with the row scale for every block; x packed 16 tokens at a time.
    const int64_t nblk = K / 32, tb = q8_tile_bytes(nblk);
    std::vector<uint8_t> xt((M + 15) / 16 * tb);
    parallel_units((M + 15) / 16, [&](int64_t u, std::vector<float>& scratch) {
      const int64_t m0 = u * 16, mb = std::min<int64_t>(16, M - m0);
      if (x_bf16)
        prepare_q8_tile(static_cast<const bf16_t*>(x) + m0 * K, K, nullptr, mb, K, xt.data() + u * tb,
                        scratch, 128);
      else
        prepare_q8_tile(static_cast<const float*>(x) + m0 * K, K, nullptr, mb, K, xt.data() + u * tb, scratch, 128);
    });
    constexpr int64_t rows = 32;
    parallel_units((N + rows - 1) / rows, [&](int64_t u, std::vector<float>& scratch) {
      const int64_t n0 = u * rows, nr = std::min(N, n0 + rows) - n0, nr4 = (nr + 3) / 4 * 4;
      scratch.assign(nr4 * nblk + (nr4 == nr ? 0 : nr4 * K / 4 + 1), 0.f);
      float* ws = scratch.data();
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t b = 0; b < nblk; ++b) ws[r * nblk + b] = 2.f * scale[n0 + r];  // dh is d / 2
      const uint8_t* wt = w + n0 * K;
      if (nr4 != nr) {  // the micro-kernel reads rows 4 at a time: pad the last tile
        uint8_t* pad = reinterpret_cast<uint8_t*>(ws + nr4 * nblk);
        std::memcpy(pad, wt, nr * K);
        wt = pad;
      }
      q8_gemm_tile(wt, ws, nr, xt.data(), M, K, op + n0, N);
    });
  } else {
    // Matrix-vector kernels (the scalar one where VNNI is missing): every token's int8 rounding and scales.
    const int64_t rbytes = i8_row_bytes(K);
    std::vector<uint8_t> xp(M * rbytes);
    parallel_units(M, [&](int64_t mi, std::vector<float>& scratch) {
      if (x_bf16)
        prepare_i8_row(static_cast<const bf16_t*>(x) + mi * K, K, xp.data() + mi * rbytes, scratch);
      else
        prepare_i8_row(static_cast<const float*>(x) + mi * K, K, xp.data() + mi * rbytes, scratch);
    }, 8);
    const I8Args a{w, scale, xp.data(), M, K, op, N};
    const I8Kernel& kern = g_has_vnni && isa >= Isa::Avx512 ? kI8Vnni : kI8Scalar;
    const int64_t rows = rows_per_unit(N);
    parallel_units((N + rows - 1) / rows, [&](int64_t u, std::vector<float>&) {
      const int64_t n0 = u * rows, n1 = std::min(N, n0 + rows);
      for (int64_t n = n0; n < n1; n += 4) {
        const int64_t rb = std::min<int64_t>(4, n1 - n);
        for (int64_t m = 0; m < M; m += 4) kern.fn[rb - 1][std::min<int64_t>(4, M - m) - 1](a, n, m);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm and rotary embedding: tiny amounts of work, done here so a decode step makes one call
// each instead of the eight or ten small torch operations (and dtype conversions) of the
// reference, which cost more than the arithmetic.

template <class T, class W>
static void rms_norm_rows(const T* x, const W* w, T* out, int64_t rows, int64_t D, float eps) {
  parallel_units(rows, [&](int64_t r, std::vector<float>&) {
    const T* xr = x + r * D;
    float ss = 0.f;
    for (int64_t i = 0; i < D; ++i) ss += to_f32(xr[i]) * to_f32(xr[i]);
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t i = 0; i < D; ++i) store_as(out + r * D + i, to_f32(xr[i]) * inv * to_f32(w[i]));
  }, 16);
}


// x [B, T, H, D] rotated in the half-split form by cos/sin [B, T, 1, D/2] (fp32), in fp32, rounded once.
template <class T>
static void rotary_rows(const T* x, const float* cs, const float* sn, T* out, int64_t BT, int64_t H, int64_t D) {
  const int64_t half = D / 2;
  parallel_units(BT, [&](int64_t bt, std::vector<float>&) {
    const float* c = cs + bt * half;
    const float* s = sn + bt * half;
    for (int64_t h = 0; h < H; ++h) {
      const T* xr = x + (bt * H + h) * D;
      T* o = out + (bt * H + h) * D;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = to_f32(xr[i]), x2 = to_f32(xr[i + half]);
        store_as(o + i, x1 * c[i] - x2 * s[i]);
        store_as(o + i + half, x2 * c[i] + x1 * s[i]);
      }
    }
  }, 16);
}


// ---------------------------------------------------------------------------------------------
// MoE experts: out[t] = sum_j w[t, j] * (down_e(swiglu(gate_up_e(x[t]) + b)) + b_down), e = idx[t, j].
//
// Tokens are grouped by expert. An expert with few tokens (decode) runs the MXFP4 product straight
// from the packed bytes; an expert with many tokens (prefill) has its rows dequantized once, a
// tile of rows at a time into a per-thread fp32 buffer that stays in L2, and multiplied with the
// dense kernel. Each projection (gate_up, then down) is one parallel sweep over (expert, row
// block) units; the weighted sum is a third sweep over tokens. Everything accumulates in fp32.

static constexpr int64_t kFusedMaxTokens = 4;  // more tokens than this on an expert: dequantized tiles
static constexpr int64_t kTileRows = 32;       // rows per tile: 32 x 2880 fp32 = 368 KB
static constexpr int64_t kFusedRows = 64;      // rows per unit on the packed path
static constexpr int64_t kTokenChunk = 512;    // tokens per pass (bounds the intermediate buffers)

struct ExpertGroup {
  int64_t expert;
  int64_t first;  // offset of its first assignment in the sorted lists
  int64_t count;
  bool fused;
  int64_t x_off;  // offset of its inputs in the packed input buffer (floats)
};

// Copies the inputs of every group: fused groups in the prepared layout, tile groups as plain rows.
// Row i of group g is source row rows[g.first + i] (or g.first + i without `rows`).
template <class T>
static void pack_inputs(MxKind kind, std::vector<ExpertGroup>& groups, const T* src, int64_t K,
                        const int64_t* rows, std::vector<float>& buf) {
  const int64_t ld_fused = mx_prepared_len(kind, K);
  int64_t total = 0;
  for (auto& g : groups) {
    g.x_off = total;
    total += g.fused ? g.count * ld_fused : kind == MxKind::Avx512 ? gemm_mpad(g.count) * K : g.count * K;
    total = (total + 15) / 16 * 16;
  }
  buf.resize(total);
  parallel_units(static_cast<int64_t>(groups.size()), [&](int64_t gi, std::vector<float>&) {
    const ExpertGroup& g = groups[gi];
    if (!g.fused && kind == MxKind::Avx512) {
      if (rows)
        pack_xt(src, K, rows + g.first, g.count, K, buf.data() + g.x_off);
      else
        pack_xt(src + g.first * K, K, nullptr, g.count, K, buf.data() + g.x_off);
      return;
    }
    for (int64_t i = 0; i < g.count; ++i) {
      const T* row = src + (rows ? rows[g.first + i] : g.first + i) * K;
      if (g.fused) {
        prepare_x_mx(kind, row, K, buf.data() + g.x_off + i * ld_fused);
      } else {
        float* d = buf.data() + g.x_off + i * K;
        for (int64_t k = 0; k < K; ++k) d[k] = to_f32(row[k]);
      }
    }
  });
}

// The parallel work of one projection: (group, row range) pieces, smaller for the packed path.
struct ProjectionUnit {
  int64_t g, r0, r1;
};

// Runs body(unit, group, expert blocks, expert scales, output rows of the group, scratch) over every
// (group, row range) piece of one projection, in parallel.
template <class Body>
static void for_each_projection_unit(const std::vector<ExpertGroup>& groups, const uint8_t* blocks,
                                     const uint8_t* scales, int64_t rows, int64_t nblk, float* y, int64_t ldy,
                                     const Body& body) {
  std::vector<ProjectionUnit> units;
  for (int64_t g = 0; g < static_cast<int64_t>(groups.size()); ++g) {
    const int64_t step = groups[g].fused ? kFusedRows : kTileRows;
    for (int64_t r = 0; r < rows; r += step) units.push_back({g, r, std::min(rows, r + step)});
  }
  parallel_units(static_cast<int64_t>(units.size()), [&](int64_t ui, std::vector<float>& scratch) {
    const ProjectionUnit& un = units[ui];
    const ExpertGroup& grp = groups[un.g];
    body(un, grp, blocks + grp.expert * rows * nblk * 16, scales + grp.expert * rows * nblk, y + grp.first * ldy,
         scratch);
  });
}

// One projection for every used expert: Y_e [count, rows] = X_e @ W_e^T, into y at row g.first.
static void expert_projection(Isa isa, MxKind kind, const std::vector<ExpertGroup>& groups, const uint8_t* blocks,
                              const uint8_t* scales, int64_t rows, int64_t K, const float* xbuf, float* y,
                              int64_t ldy) {
  const int64_t nblk = K / 32, ld_fused = mx_prepared_len(kind, K);
  const MxKernel& mxk = mx_kernel(kind);
  const DenseKernel& dk = dense_kernel(isa, false, false);
  for_each_projection_unit(groups, blocks, scales, rows, nblk, y, ldy, [&](const ProjectionUnit& un,
                           const ExpertGroup& grp, const uint8_t* eb, const uint8_t* es, float* yg,
                           std::vector<float>& tile) {
    if (grp.fused) {
      const MxArgs a{eb, es, nblk, xbuf + grp.x_off, ld_fused, grp.count, yg, ldy};
      mx_rows(mxk, a, un.r0, un.r1);
      return;
    }
    // Dequantize rows r0..r1 into the tile, then a dense product over all of the expert's tokens.
    const int64_t nr = un.r1 - un.r0;
    tile.resize((nr + 15) / 16 * 16 * K);
    decode_rows(isa, eb + un.r0 * nblk * 16, es + un.r0 * nblk, nblk, nr, tile.data());
    if (kind == MxKind::Avx512) {
      std::fill(tile.begin() + nr * K, tile.end(), 0.f);
      gemm_tile(tile.data(), nr, xbuf + grp.x_off, grp.count, K, yg + un.r0, ldy);
      return;
    }
    const DenseArgs a{tile.data(), K, xbuf + grp.x_off, K, grp.count, K, yg + un.r0, ldy};
    dense_rows(dk, a, 0, nr);
  });
}

// The int8-activation twins of pack_inputs and expert_projection (offsets in bytes).
template <class T>
static void q8_pack_inputs(std::vector<ExpertGroup>& groups, const T* src, int64_t K, const int64_t* rows,
                           std::vector<uint8_t>& buf) {
  const int64_t nblk = K / 32;
  int64_t total = 0;
  for (auto& g : groups) {
    g.x_off = total;
    total += g.fused ? g.count * q8_row_bytes(nblk) : (g.count + 15) / 16 * q8_tile_bytes(nblk);
  }
  buf.resize(total);
  parallel_units(static_cast<int64_t>(groups.size()), [&](int64_t gi, std::vector<float>& scratch) {
    const ExpertGroup& g = groups[gi];
    uint8_t* dst = buf.data() + g.x_off;
    if (!g.fused) {
      if (rows)
        prepare_q8_tile(src, K, rows + g.first, g.count, K, dst, scratch);
      else
        prepare_q8_tile(src + g.first * K, K, nullptr, g.count, K, dst, scratch);
      return;
    }
    for (int64_t i = 0; i < g.count; ++i)
      prepare_q8_row(src + (rows ? rows[g.first + i] : g.first + i) * K, K, dst + i * q8_row_bytes(nblk), scratch);
  });
}

static void q8_expert_projection(const std::vector<ExpertGroup>& groups, const uint8_t* blocks, const uint8_t* scales,
                                 int64_t rows, int64_t K, const uint8_t* xbuf, float* y, int64_t ldy) {
  const int64_t nblk = K / 32;
  for_each_projection_unit(groups, blocks, scales, rows, nblk, y, ldy, [&](const ProjectionUnit& un,
                           const ExpertGroup& grp, const uint8_t* eb, const uint8_t* es, float* yg,
                           std::vector<float>& scratch) {
    if (grp.fused) {
      q8_rows(Q8Args{eb, es, nblk, xbuf + grp.x_off, grp.count, yg, ldy}, un.r0, un.r1);
      return;
    }
    const int64_t nr = un.r1 - un.r0, nr4 = (nr + 3) / 4 * 4;
    scratch.assign(nr4 * K / 4 + nr4 * nblk, 0.f);  // the byte tile, then its scales
    uint8_t* tile = reinterpret_cast<uint8_t*>(scratch.data());
    float* ws = scratch.data() + nr4 * K / 4;
    decode_rows_q8(eb + un.r0 * nblk * 16, es + un.r0 * nblk, nblk, nr, tile, ws);
    q8_gemm_tile(tile, ws, nr, xbuf + grp.x_off, grp.count, K, yg + un.r0, ldy);
  });
}

// out [N, H] fp32 (zeroed by the caller) = sum over each token's experts of weight * expert(x).
// The expert indices are checked by the caller. Biases are bf16 or fp32 ([E, 2I] and [E, H]).
static void moe_experts_impl(const void* x, bool x_bf16, const int64_t* ip, const float* wp, int64_t N,
                             int64_t topk, const uint8_t* gub, const uint8_t* gus, const void* gu_bias,
                             const uint8_t* dnb, const uint8_t* dns, const void* dn_bias, bool bias_bf16, int64_t E,
                             int64_t I2, int64_t H, float limit, float* op) {
  const int64_t I = I2 / 2;
  const Isa isa = g_isa;
  const MxKind kind = mx_kind(isa);
  // The biases of the experts in use as fp32 (widening all of them would cost more than decoding
  // a token's experts); slot[e] is expert e's row in them.
  std::vector<int64_t> used_list, slot(E, -1);
  for (int64_t i = 0; i < N * topk; ++i)
    if (slot[ip[i]] < 0) {
      slot[ip[i]] = static_cast<int64_t>(used_list.size());
      used_list.push_back(ip[i]);
    }
  const int64_t n_used = static_cast<int64_t>(used_list.size());
  std::vector<float> gubias(n_used * I2), dnbias(n_used * H);
  for (int64_t u = 0; u < n_used; ++u) {
    const int64_t e = used_list[u];
    for (int64_t c = 0; c < I2; ++c)
      gubias[u * I2 + c] = bias_bf16 ? bf16_to_f32(static_cast<const bf16_t*>(gu_bias)[e * I2 + c])
                                     : static_cast<const float*>(gu_bias)[e * I2 + c];
    for (int64_t c = 0; c < H; ++c)
      dnbias[u * H + c] = bias_bf16 ? bf16_to_f32(static_cast<const bf16_t*>(dn_bias)[e * H + c])
                                    : static_cast<const float*>(dn_bias)[e * H + c];
  }
  const float* gbias = gubias.data();
  const float* dbias = dnbias.data();
  const bool q8 = use_int8_activations(isa, x_bf16);
  std::vector<float> xbuf, h, act, y;
  std::vector<uint8_t> qbuf;

  for (int64_t t0 = 0; t0 < N; t0 += kTokenChunk) {
    const int64_t t1 = std::min(N, t0 + kTokenChunk), nt = t1 - t0, rows_total = nt * topk;
    // Group the (token, slot) assignments of this chunk by expert (a counting sort); a token that
    // lists an expert twice gets two rows, as in the reference.
    std::vector<int64_t> start(E + 1, 0);
    for (int64_t i = t0 * topk; i < t1 * topk; ++i) ++start[ip[i] + 1];
    for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
    std::vector<int64_t> fill(start.begin(), start.end() - 1), tok(rows_total), row_of(rows_total), expert_of_row(rows_total);
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < topk; ++j) {
        const int64_t e = ip[t * topk + j], r = fill[e]++;
        tok[r] = t;
        expert_of_row[r] = e;
        row_of[(t - t0) * topk + j] = r;
      }
    std::vector<ExpertGroup> groups;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t count = start[e + 1] - start[e];
      if (count) groups.push_back({e, start[e], count, count <= kFusedMaxTokens, 0});
    }

    // 1. gate_up
    h.resize(rows_total * I2);
    if (q8) {
      if (x_bf16)
        q8_pack_inputs(groups, static_cast<const bf16_t*>(x), H, tok.data(), qbuf);
      else
        q8_pack_inputs(groups, static_cast<const float*>(x), H, tok.data(), qbuf);
      q8_expert_projection(groups, gub, gus, I2, H, qbuf.data(), h.data(), I2);
    } else {
      if (x_bf16)
        pack_inputs(kind, groups, static_cast<const bf16_t*>(x), H, tok.data(), xbuf);
      else
        pack_inputs(kind, groups, static_cast<const float*>(x), H, tok.data(), xbuf);
      expert_projection(isa, kind, groups, gub, gus, I2, H, xbuf.data(),
                        h.data(), I2);
    }

    // 2. bias + SwiGLU; with bf16 activations the result is rounded to bf16 like the reference's.
    act.resize(rows_total * I);
    parallel_units(rows_total, [&](int64_t r, std::vector<float>& scratch) {
      scratch.resize(2 * I);
      float* a = act.data() + r * I;
      swiglu_row(isa, h.data() + r * I2, gbias + slot[expert_of_row[r]] * I2, scratch.data(), scratch.data() + I, a, I,
                 limit);
      if (x_bf16)
        for (int64_t i = 0; i < I; ++i) a[i] = bf16_to_f32(f32_to_bf16(a[i]));
    });

    // 3. down
    y.resize(rows_total * H);
    if (q8) {
      q8_pack_inputs(groups, act.data(), I, nullptr, qbuf);
      q8_expert_projection(groups, dnb, dns, H, I, qbuf.data(), y.data(), H);
    } else {
      pack_inputs(kind, groups, act.data(), I, nullptr, xbuf);
      expert_projection(isa, kind, groups, dnb, dns, H, I, xbuf.data(),
                        y.data(), H);
    }

    // 4. out[t] = sum_j w[t, j] * (y_row + down bias), accumulated in slot order.
    parallel_units(nt, [&](int64_t tt, std::vector<float>&) {
      const int64_t t = t0 + tt;
      float* o = op + t * H;
      for (int64_t j = 0; j < topk; ++j) {
        const float w = wp[t * topk + j];
        const float* yr = y.data() + row_of[tt * topk + j] * H;
        const float* br = dbias + slot[ip[t * topk + j]] * H;
        for (int64_t c = 0; c < H; ++c) o[c] += w * (yr[c] + br[c]);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Test and benchmark helpers


// Reads every byte of t once with 2 loads per cycle per thread: the machine's read bandwidth.
T_AVX2 static uint64_t xor_reduce_avx2(const uint8_t* p, int64_t n) {
  __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a = _mm256_xor_si256(a, _mm256_loadu_si256((const __m256i*)(p + i)));
    b = _mm256_xor_si256(b, _mm256_loadu_si256((const __m256i*)(p + i + 32)));
  }
  a = _mm256_xor_si256(a, b);
  uint64_t r[4];
  _mm256_storeu_si256((__m256i*)r, a);
  uint64_t s = r[0] ^ r[1] ^ r[2] ^ r[3];
  for (; i < n; ++i) s ^= p[i];
  return s;
}


}  // namespace gptoss


// ---------------------------------------------------------------------------------------------
// The C interface (ctypes). Shapes and dtypes are checked by the Python side, which passes
// contiguous buffers; what only this side can check cheaply (index ranges) returns an error code
// with a message in gptoss_last_error(). Every call runs on `threads` OpenMP workers.

namespace {
thread_local std::string g_error;
int fail(const std::string& message) {
  g_error = message;
  return -1;
}
}  // namespace

using namespace gptoss;

extern "C" {

#ifndef GPTOSS_SOURCE_HASH
#define GPTOSS_SOURCE_HASH "unknown"
#endif

int gptoss_abi_version() { return 1; }
const char* gptoss_source_hash() { return GPTOSS_SOURCE_HASH; }
const char* gptoss_last_error() { return g_error.c_str(); }

int gptoss_best_isa() { return static_cast<int>(g_best); }
int gptoss_get_isa() { return static_cast<int>(g_isa); }
int gptoss_set_isa(int isa) {
  if (isa < 0 || isa > static_cast<int>(g_best)) return -1;
  g_isa = static_cast<Isa>(isa);
  return 0;
}
int gptoss_has_vnni_vbmi() { return g_has_vnni ? 1 : 0; }
int gptoss_get_int8_activations() { return static_cast<int>(g_int8_act); }
void gptoss_set_int8_activations(int mode) { g_int8_act = static_cast<Int8Activations>(mode); }

void gptoss_linear(const void* x, const void* w, int bf16, const float* bias, int64_t M, int64_t N, int64_t K,
                   float* out, int threads) {
  g_threads = threads;
  linear_impl(x, w, bf16 != 0, bias, M, N, K, out);
}

void gptoss_linear_int8(const void* x, int x_bf16, const uint8_t* w, const float* scale, int64_t M, int64_t N,
                        int64_t K, float* out, int threads) {
  g_threads = threads;
  linear_int8_impl(x, x_bf16 != 0, w, scale, M, N, K, out);
}

void gptoss_quantize_rows_int8(const void* w, int bf16, int64_t N, int64_t K, uint8_t* out, float* scale,
                               int threads) {
  g_threads = threads;
  if (bf16)
    quantize_rows_i8(static_cast<const bf16_t*>(w), N, K, out, scale);
  else
    quantize_rows_i8(static_cast<const float*>(w), N, K, out, scale);
}

// x_bf16 / w_bf16 select the element types; out has x's type.
void gptoss_rms_norm(const void* x, int x_bf16, const void* w, int w_bf16, void* out, int64_t rows, int64_t D,
                     float eps, int threads) {
  g_threads = threads;
  if (x_bf16 && w_bf16)
    rms_norm_rows(static_cast<const bf16_t*>(x), static_cast<const bf16_t*>(w), static_cast<bf16_t*>(out), rows, D, eps);
  else if (x_bf16)
    rms_norm_rows(static_cast<const bf16_t*>(x), static_cast<const float*>(w), static_cast<bf16_t*>(out), rows, D, eps);
  else if (w_bf16)
    rms_norm_rows(static_cast<const float*>(x), static_cast<const bf16_t*>(w), static_cast<float*>(out), rows, D, eps);
  else
    rms_norm_rows(static_cast<const float*>(x), static_cast<const float*>(w), static_cast<float*>(out), rows, D, eps);
}

// x [BT, H, D] rotated by fp32 cos/sin [BT, D/2]; out has x's type.
void gptoss_rotary(const void* x, int bf16, const float* cos, const float* sin, void* out, int64_t BT, int64_t H,
                   int64_t D, int threads) {
  g_threads = threads;
  if (bf16)
    rotary_rows(static_cast<const bf16_t*>(x), cos, sin, static_cast<bf16_t*>(out), BT, H, D);
  else
    rotary_rows(static_cast<const float*>(x), cos, sin, static_cast<float*>(out), BT, H, D);
}

// q [B, Tq, Hq, D]; k, v [B, S, Hkv, D], or with key_rows [B, S] rows of a flat [R, Hkv, D] cache.
int gptoss_attention(const void* q, const void* k, const void* v, int bf16, const float* sinks,
                     const int64_t* q_pos, const int64_t* k_pos, const int64_t* key_rows, int64_t R, int64_t B,
                     int64_t Tq, int64_t Hq, int64_t D, int64_t S, int64_t Hkv, int64_t window, float* out,
                     int threads) {
  if (key_rows)
    for (int64_t i = 0; i < B * S; ++i)
      if (k_pos[i] >= 0 && (key_rows[i] < 0 || key_rows[i] >= R))
        return fail("attention: key row " + std::to_string(key_rows[i]) + " out of range [0, " + std::to_string(R) + ")");
  g_threads = threads;
  if (bf16)
    attention_impl<bf16_t>(static_cast<const bf16_t*>(q), static_cast<const bf16_t*>(k), static_cast<const bf16_t*>(v),
                           sinks, q_pos, k_pos, B, Tq, Hq, D, S, Hkv, window, key_rows, out);
  else
    attention_impl<float>(static_cast<const float*>(q), static_cast<const float*>(k), static_cast<const float*>(v),
                          sinks, q_pos, k_pos, B, Tq, Hq, D, S, Hkv, window, key_rows, out);
  return 0;
}

int gptoss_moe_experts(const void* x, int x_bf16, const int64_t* expert_indices, const float* expert_weights,
                       int64_t N, int64_t topk, const uint8_t* gu_blocks, const uint8_t* gu_scales,
                       const void* gu_bias, const uint8_t* dn_blocks, const uint8_t* dn_scales, const void* dn_bias,
                       int bias_bf16, int64_t E, int64_t I2, int64_t H, float swiglu_limit, float* out, int threads) {
  for (int64_t i = 0; i < N * topk; ++i)
    if (expert_indices[i] < 0 || expert_indices[i] >= E)
      return fail("moe_experts: expert index " + std::to_string(expert_indices[i]) + " out of range [0, " +
                  std::to_string(E) + ")");
  g_threads = threads;
  moe_experts_impl(x, x_bf16 != 0, expert_indices, expert_weights, N, topk, gu_blocks, gu_scales, gu_bias, dn_blocks,
                   dn_scales, dn_bias, bias_bf16 != 0, E, I2, H, swiglu_limit, out);
  return 0;
}

// MXFP4 [rows, nblk, 16] + scales [rows, nblk] -> fp32 [rows, nblk * 32] (and bf16 when out_bf16 is given).
void gptoss_mxfp4_dequantize(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t nblk, float* out32,
                             uint16_t* out_bf16, int threads) {
  g_threads = threads;
  const Isa isa = g_isa;
  parallel_units(rows, [&](int64_t r, std::vector<float>&) {
    decode_rows(isa, blocks + r * nblk * 16, scales + r * nblk, nblk, 1, out32 + r * nblk * 32);
  });
  if (out_bf16) f32_to_bf16_row(isa, out32, reinterpret_cast<bf16_t*>(out_bf16), rows * nblk * 32);
}

// Reads n bytes once, as fast as the CPU can (the bandwidth probe); returns their xor.
int64_t gptoss_read_probe(const uint8_t* p, int64_t n, int threads) {
  g_threads = threads;
  const int64_t chunk = 1 << 20;
  std::atomic<uint64_t> acc{0};
  const bool simd = g_best >= Isa::Avx2;
  parallel_units((n + chunk - 1) / chunk, [&](int64_t u, std::vector<float>&) {
    const int64_t b = u * chunk, len = std::min(chunk, n - b);
    uint64_t s = 0;
    if (simd)
      s = xor_reduce_avx2(p + b, len);
    else
      for (int64_t i = 0; i < len; ++i) s ^= p[b + i];
    acc.fetch_xor(s);
  });
  return static_cast<int64_t>(acc.load());
}

}  // extern "C"
