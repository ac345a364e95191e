// gptoss CPU kernels: MXFP4 products and row dequantization, and the clamped SwiGLU of the experts.
// Part of one translation unit: included by kernels.cpp, in order, inside namespace gptoss.
#pragma once

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
// at 4 KB pages; without this a core reaches half of its bandwidth. The packed expert rows are
// prefetched into L2 only (kMxPrefetchHint): a T0 prefetch holds one of the few L1 fill buffers
// until its line arrives, which caps the misses in flight; T1 streamed the experts 8-10% faster
// here on the int8-activation path (benchmarks/kernels_ab.py), while the bf16 GEMV measured the
// same either way.
static constexpr int64_t kPrefetchBytes = 6144;
#define kMxPrefetchHint _MM_HINT_T1  // a macro: _mm_prefetch takes a literal hint

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
      _mm_prefetch((const char*)p + kPrefetchBytes, kMxPrefetchHint);
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
        _mm_prefetch((const char*)p + kPrefetchBytes, kMxPrefetchHint);
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
