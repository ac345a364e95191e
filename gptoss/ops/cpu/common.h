// gptoss CPU kernels: ISA selection, scalars and tables, threading, horizontal sums and exp.
// Part of one translation unit: included by kernels.cpp, in order, inside namespace gptoss.
#pragma once

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

// n floats rounded to bf16 as f32_to_bf16 does, 16 at a time on AVX-512.
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
