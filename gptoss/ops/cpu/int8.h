// gptoss CPU kernels: int8 products: MXFP4 x int8 activations (AVX-512 VNNI, AVX-VNNI, AVX2) and the
// --dense-int8 projections (AVX-512 VNNI).
// Part of one translation unit: included by kernels.cpp, in order, inside namespace gptoss.
#pragma once

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
        _mm_prefetch((const char*)p + kPrefetchBytes, kMxPrefetchHint);
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
      // the scales are a second stream (1/16 of the bytes), prefetched as many rows ahead (+3% here)
      _mm_prefetch((const char*)(srow + 16 * g) + kPrefetchBytes / 16, kMxPrefetchHint);
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
// MXFP4 x int8 activations on AVX2 (and AVX-512 CPUs without VNNI/VBMI): the same prepared
// activations and the same exact integer block sums, 32 bytes at a time. vpshufb turns nibbles
// into the bytes 2 * value + 12 (a 16-entry table, so no VBMI), vpmaddubsw multiplies them with
// the int8 activations into pairs of 16-bit sums (at most 2 * 24 * 127 each: no saturation, and
// the even and odd halves of a chunk add up to at most 12192), vpmaddwd widens to 32 bits. Where
// the CPU has AVX-VNNI, the decode kernel uses vpdpbusd (VEX) for the three; the integer sums are
// the same. Prefill tiles keep vpmaddubsw (see q8_gemm_mk_avx2).

enum class Q8Kind : int { None = 0, Avx2 = 1, AvxVnni = 2, Vnni512 = 3 };

static bool cpu_has_avx_vnni() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avxvnni");
#else
  return false;
#endif
}
static const bool g_has_avx_vnni = cpu_has_avx_vnni();
static bool g_use_avx_vnni = g_has_avx_vnni;  // tests turn it off to run the vpmaddubsw kernels

// Which int8 kernels an ISA path runs (None: the int8-activation path is off).
static Q8Kind q8_kind(Isa isa) {
  if (isa >= Isa::Avx512 && g_has_vnni) return Q8Kind::Vnni512;
  if (isa >= Isa::Avx2) return g_use_avx_vnni ? Q8Kind::AvxVnni : Q8Kind::Avx2;
  return Q8Kind::None;
}

// 8 lanes of 4-byte dot products (u8 weights, s8 activations) of two pairs of vectors, added to acc.
T_AVX2 static INLINE __m256i dot4x2_avx2(__m256i acc, __m256i w0, __m256i q0, __m256i w1, __m256i q1) {
  const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(w0, q0), _mm256_maddubs_epi16(w1, q1));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(s16, _mm256_set1_epi16(1)));
}
// AVX-VNNI's vpdpbusd, written as assembly so that the AVX2 code around it needs no extra target
// (it runs only where the CPU reports avxvnni).
T_AVX2 static INLINE __m256i dpbusd_vex(__m256i acc, __m256i w, __m256i q) {
  asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(w), "x"(q));
  return acc;
}
T_AVX2 static INLINE __m256i dot4x2_avxvnni(__m256i acc, __m256i w0, __m256i q0, __m256i w1, __m256i q1) {
  return dpbusd_vex(dpbusd_vex(acc, w0, q0), w1, q1);
}

T_AVX2 static INLINE __m256 e8m0x8(const uint8_t* s) {
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s)));
  __m256i bits = _mm256_slli_epi32(v, 23);
  bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x00400000), _mm256_cmpeq_epi32(v, _mm256_setzero_si256()));
  bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x7FC00000), _mm256_cmpeq_epi32(v, _mm256_set1_epi32(255)));
  return _mm256_castsi256_ps(bits);
}

// Rows [n0, n1) against MB <= 4 prepared tokens (prepare_q8_row), as q8_gemv_rows.
template <int MB, bool VNNI>
T_AVX2 static INLINE void q8_gemv_rows_avx2_impl(const Q8Args& a, int64_t m, int64_t n0, int64_t n1) {
  const int64_t nblk = a.nblk, G = q8_groups(nblk), rb = q8_row_bytes(nblk);
  const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kQ8.lut)));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  // After two rounds of vphaddd the 8 block sums of two chunks sit in the order 0 2 4 6 1 3 5 7.
  const __m256i natural = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  alignas(32) uint8_t wpad[64];
  uint8_t spad[16];
  const uint8_t* xq[MB];
  for (int j = 0; j < MB; ++j) xq[j] = a.x + (m + j) * rb;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = a.blocks + n * nblk * 16;
    const uint8_t* srow = a.scales + n * nblk;
    __m256 facc[MB];
    for (int j = 0; j < MB; ++j) facc[j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const int64_t nb = std::min<int64_t>(16, nblk - 16 * g);
      const uint8_t* sg = srow + 16 * g;
      if (nb < 16) {  // the row's last group: zero scales past its end (their sums are zero)
        std::memset(spad, 0, 16);
        std::memcpy(spad, sg, nb);
        sg = spad;
      }
      for (int64_t e = 0; e < 2 && 8 * e < nb; ++e) {  // blocks 8e .. 8e+7 of the group: chunks 2e, 2e+1
        __m256i pair[MB][2];
        for (int cc = 0; cc < 2; ++cc) {
          const int64_t c = 2 * e + cc, nbc = std::max<int64_t>(0, std::min<int64_t>(4, nb - 4 * c));
          __m256i half[MB][2];
          for (int j = 0; j < MB; ++j) half[j][0] = half[j][1] = _mm256_setzero_si256();
          if (nbc > 0) {
            const uint8_t* p = wrow + (16 * g + 4 * c) * 16;
            if (nbc < 4) {
              std::memset(wpad, 0, 64);
              std::memcpy(wpad, p, nbc * 16);
              p = wpad;
            }
            _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, kMxPrefetchHint);
            for (int h = 0; h < 2; ++h) {
              const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * h));
              const __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low4));
              const __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
              for (int j = 0; j < MB; ++j) {
                const uint8_t* qc = xq[j] + g * 512 + c * 128 + 32 * h;
                const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qc));
                const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qc + 64));
                half[j][h] = VNNI ? dot4x2_avxvnni(half[j][h], lo, q0, hi, q1)
                                  : dot4x2_avx2(half[j][h], lo, q0, hi, q1);
              }
            }
          }
          for (int j = 0; j < MB; ++j) pair[j][cc] = _mm256_hadd_epi32(half[j][0], half[j][1]);
        }
        const __m256 sc = e8m0x8(sg + 8 * e);
        for (int j = 0; j < MB; ++j) {
          const float* dh = reinterpret_cast<const float*>(xq[j] + G * 512) + 16 * g + 8 * e;
          const int32_t* nc = reinterpret_cast<const int32_t*>(xq[j] + G * 576) + 16 * g + 8 * e;
          __m256i s = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(pair[j][0], pair[j][1]), natural);
          s = _mm256_add_epi32(s, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nc)));
          facc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(sc, _mm256_loadu_ps(dh)), facc[j]);
        }
      }
    }
    for (int j = 0; j < MB; ++j) a.out[(m + j) * a.ldo + n] = hsum256(facc[j]);
  }
}

template <int MB>
T_AVX2 static void q8_gemv_rows_avx2(const Q8Args& a, int64_t m, int64_t n0, int64_t n1) {
  q8_gemv_rows_avx2_impl<MB, false>(a, m, n0, n1);
}
template <int MB>
T_AVX2 static void q8_gemv_rows_avxvnni(const Q8Args& a, int64_t m, int64_t n0, int64_t n1) {
  q8_gemv_rows_avx2_impl<MB, true>(a, m, n0, n1);
}

// Rows of packed MXFP4 -> bytes 2 * value + 12 in natural order, and the scales as floats.
T_AVX2 static void decode_rows_q8_avx2(const uint8_t* blocks, const uint8_t* scales, int64_t nblk, int64_t rows,
                                       uint8_t* out, float* ws) {
  const __m128i lut = _mm_loadu_si128(reinterpret_cast<const __m128i*>(kQ8.lut)), low4 = _mm_set1_epi8(0x0F);
  const int64_t n = rows * nblk;
  for (int64_t i = 0; i < n; ++i) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + i * 16));
    const __m128i lo = _mm_shuffle_epi8(lut, _mm_and_si128(v, low4));
    const __m128i hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(v, 4), low4));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i * 32), _mm_unpacklo_epi8(lo, hi));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i * 32 + 16), _mm_unpackhi_epi8(lo, hi));
  }
  for (int64_t j = 0; j < n; ++j) ws[j] = kT.e8m0[scales[j]];
}

// NR decoded rows against 16 prepared tokens (one Q8Tile block): c[r * 16 + token].
// vpmaddubsw + vpmaddwd here even where AVX-VNNI exists: each accumulator then waits on one add
// per step instead of a 5-cycle vpdpbusd chain, which measured faster for these tiles.
template <int NR>
T_AVX2 static void q8_gemm_mk_avx2(const uint8_t* w, const float* ws, int64_t K, const uint8_t* x, float* c) {
  const int64_t nblk = K / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 fa[NR][2];
  for (int r = 0; r < NR; ++r) fa[r][0] = fa[r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nblk; ++b) {
    __m256i ia[NR][2];
    for (int v = 0; v < 2; ++v) {
      const __m256i nc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16 * K + 64 * nblk + b * 64 + 32 * v));
      for (int r = 0; r < NR; ++r) ia[r][v] = nc;
    }
    for (int kq = 0; kq < 8; ++kq) {
      __m256i xv[2];
      for (int v = 0; v < 2; ++v)
        xv[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + (b * 8 + kq) * 64 + 32 * v));
      for (int r = 0; r < NR; ++r) {
        int32_t w4;
        std::memcpy(&w4, w + r * K + b * 32 + kq * 4, 4);
        const __m256i wb = _mm256_set1_epi32(w4);
        for (int v = 0; v < 2; ++v)
          ia[r][v] = _mm256_add_epi32(ia[r][v], _mm256_madd_epi16(_mm256_maddubs_epi16(wb, xv[v]), ones));
      }
    }
    for (int v = 0; v < 2; ++v) {
      const __m256 dh = _mm256_loadu_ps(reinterpret_cast<const float*>(x + 16 * K) + b * 16 + 8 * v);
      for (int r = 0; r < NR; ++r)
        fa[r][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[r][v]), _mm256_mul_ps(dh, _mm256_set1_ps(ws[r * nblk + b])),
                                   fa[r][v]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < 2; ++v) _mm256_storeu_ps(c + r * 16 + 8 * v, fa[r][v]);
}

// As q8_gemm_tile, 2 rows x 16 tokens at a time (AVX2 has 16 vector registers).
static void q8_gemm_tile_avx2(const uint8_t* w, const float* ws, int64_t rows, const uint8_t* x, int64_t M,
                              int64_t K, float* out, int64_t ldo) {
  constexpr int NR = 2;
  const int64_t tb = q8_tile_bytes(K / 32), nblk = K / 32;
  float c[NR * 16];
  for (int64_t n0 = 0; n0 < rows; n0 += NR) {
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
      q8_gemm_mk_avx2<NR>(w + n0 * K, ws + n0 * nblk, K, x + (m0 / 16) * tb, c);
      for (int64_t r = 0; r < NR && n0 + r < rows; ++r)
        for (int64_t m = 0; m < 16 && m0 + m < M; ++m) out[(m0 + m) * ldo + n0 + r] = c[r * 16 + m];
    }
  }
}

// Few tokens against rows [n0, n1): the matrix-vector kernels of `kind`.
static void q8_rows(Q8Kind kind, const Q8Args& a, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < a.M; m += 4) {
    const int64_t mb = std::min<int64_t>(4, a.M - m);
#define GPTOSS_Q8_ROWS(fn)                 \
  switch (mb) {                            \
    case 1: fn<1>(a, m, n0, n1); break;    \
    case 2: fn<2>(a, m, n0, n1); break;    \
    case 3: fn<3>(a, m, n0, n1); break;    \
    default: fn<4>(a, m, n0, n1); break;   \
  }
    if (kind == Q8Kind::Vnni512) {
      GPTOSS_Q8_ROWS(q8_gemv_rows)
    } else if (kind == Q8Kind::AvxVnni) {
      GPTOSS_Q8_ROWS(q8_gemv_rows_avxvnni)
    } else {
      GPTOSS_Q8_ROWS(q8_gemv_rows_avx2)
    }
#undef GPTOSS_Q8_ROWS
  }
}

static bool use_int8_activations(Isa isa, bool x_bf16) {
  if (q8_kind(isa) == Q8Kind::None) return false;
  return g_int8_act == Int8Activations::Always || (g_int8_act == Int8Activations::Bf16 && x_bf16);
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

// One token: each weight row is read start to end as one stream, as dense.h's GEMV does
// (--dense-int8 decode 9.2 -> 11.2 tokens/s on the 20b, 2 threads, against four rows side by side).
T_VNNI static INLINE __m512 i8_chunk(const uint8_t* w, const uint8_t* xr, int64_t K, int64_t Kp, int64_t k, __m512 acc) {
  const __mmask16 mk = k + 64 <= K ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>(0x00FF);
  prefetch_stream(w + k, 64);
  const __m512i sums = _mm512_dpbusd_epi32(_mm512_loadu_si512(xr + 2 * Kp + k), _mm512_maskz_loadu_epi32(mk, w + k),
                                           _mm512_loadu_si512(xr + k));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_loadu_ps(reinterpret_cast<const float*>(xr + Kp) + k / 4),
                         acc);
}

T_VNNI static float i8_dot_stream(const uint8_t* w, const uint8_t* xr, int64_t K, int64_t Kp) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {
    s0 = i8_chunk(w, xr, K, Kp, k, s0);
    s1 = i8_chunk(w, xr, K, Kp, k + 64, s1);
  }
  for (; k < K; k += 64) s0 = i8_chunk(w, xr, K, Kp, k, s0);
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

template <int RB, int MB>
T_VNNI static void i8_mk_vnni(const I8Args& a, int64_t n, int64_t m) {
  const int64_t K = a.K, Kp = i8_kpad(K), rb = i8_row_bytes(K);
  if constexpr (MB == 1) {
    for (int r = 0; r < RB; ++r)
      a.out[m * a.ldo + n + r] = i8_dot_stream(a.w + (n + r) * K, a.x + m * rb, K, Kp) * a.scale[n + r];
    return;
  }
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
