// gptoss CPU kernels: the int8 expert tiles of prefill on AMX (Sapphire Rapids and later Xeons).
// Part of one translation unit: included by kernels.cpp, in order, inside namespace gptoss.
#pragma once

// ---------------------------------------------------------------------------------------------
// The many-token int8 product of int8.h (q8_gemm_tile), with each block's integer sums taken by
// one `tdpbusd` on the AMX tiles instead of 64 vpdpbusd: the same decoded weight bytes (A: 16 rows
// x 32 bytes of one block, unsigned), the same prepared tokens (B: their [K/4][16][4] layout is the
// tile layout, signed), the same exact int32 sums; then the same fp32 epilogue in the same order
// (sum + ncorr, converted, times d/2 x the row's scale, added per block). So the results are the
// vector kernel's bit for bit, and a token's output does not depend on which path its step takes.

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define T_AMX __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-int8")))

// The CPU has AMX-INT8 and Linux lets this process use the tile state (arch_prctl
// ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; without it the first tile instruction faults).
static bool amx_request() {
#if defined(__linux__) && defined(__x86_64__)
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8")) return false;
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
  return false;
#endif
}
static const bool g_has_amx = amx_request();
static bool g_use_amx = g_has_amx;  // tests turn it off to run the vector tile kernel on AMX machines

struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Block b's int32 sums of 16 rows x 16 tokens into the fp32 accumulators, as q8_gemm_mk does.
T_AMX static INLINE void amx_scale_block(__m512* fa, const int32_t* cb, const uint8_t* ncorr, const float* dh,
                                         const float* ws, int64_t nblk, int64_t b) {
  const __m512i nc = _mm512_loadu_si512(ncorr + b * 64);
  const __m512 d = _mm512_loadu_ps(dh + b * 16);
  for (int r = 0; r < 16; ++r) {
    const __m512i ia = _mm512_add_epi32(nc, _mm512_load_si512(cb + r * 16));
    fa[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia), _mm512_mul_ps(d, _mm512_set1_ps(ws[r * nblk + b])), fa[r]);
  }
}

// As q8_gemm_tile: rows [0, rows) of a decoded byte tile (rows padded to a multiple of 16 with zero
// bytes) against M prepared tokens, into out[m * ldo + n].
T_AMX static void q8_gemm_tile_amx(const uint8_t* w, const float* ws, int64_t rows, const uint8_t* x, int64_t M,
                                   int64_t K, float* out, int64_t ldo) {
  AmxTileConfig cfg;
  for (int t = 0; t < 2; ++t) {  // two of each, for two blocks in flight
    cfg.rows[t] = 16, cfg.colsb[t] = 64;          // C: 16 rows x 16 tokens of int32
    cfg.rows[2 + t] = 16, cfg.colsb[2 + t] = 32;  // A: 16 rows x one block of weight bytes
    cfg.rows[4 + t] = 8, cfg.colsb[4 + t] = 64;   // B: 8 groups of 4 elements x 16 tokens
  }
  _tile_loadconfig(&cfg);
  const int64_t nblk = K / 32, tb = q8_tile_bytes(nblk);
  alignas(64) int32_t c[2][16 * 16];
  alignas(64) float f[16 * 16];
  for (int64_t n0 = 0; n0 < rows; n0 += 16) {
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
      const uint8_t* xb = x + (m0 / 16) * tb;
      const float* dh = reinterpret_cast<const float*>(xb + 16 * K);
      const uint8_t* ncorr = xb + 16 * K + 64 * nblk;
      __m512 fa[16];
      for (int r = 0; r < 16; ++r) fa[r] = _mm512_setzero_ps();
      // The sums of block b + 1 are taken while those of block b are scaled; blocks still add up in order.
      int64_t b = 0;
      for (; b + 2 <= nblk; b += 2) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_loadd(2, w + n0 * K + b * 32, K);
        _tile_loadd(4, xb + b * 8 * 64, 64);
        _tile_loadd(3, w + n0 * K + (b + 1) * 32, K);
        _tile_loadd(5, xb + (b + 1) * 8 * 64, 64);
        _tile_dpbusd(0, 2, 4);
        _tile_dpbusd(1, 3, 5);
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        amx_scale_block(fa, c[0], ncorr, dh, ws + n0 * nblk, nblk, b);
        amx_scale_block(fa, c[1], ncorr, dh, ws + n0 * nblk, nblk, b + 1);
      }
      if (b < nblk) {
        _tile_zero(0);
        _tile_loadd(2, w + n0 * K + b * 32, K);
        _tile_loadd(4, xb + b * 8 * 64, 64);
        _tile_dpbusd(0, 2, 4);
        _tile_stored(0, c[0], 64);
        amx_scale_block(fa, c[0], ncorr, dh, ws + n0 * nblk, nblk, b);
      }
      for (int r = 0; r < 16; ++r) _mm512_store_ps(f + r * 16, fa[r]);
      const int64_t nrows = std::min<int64_t>(16, rows - n0);
      for (int64_t t = 0; t < 16 && m0 + t < M; ++t)  // each token's outputs: one contiguous run
        for (int64_t r = 0; r < nrows; ++r) out[(m0 + t) * ldo + n0 + r] = f[r * 16 + t];
    }
  }
  _tile_release();
}
