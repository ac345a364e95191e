// gptoss CPU kernels: dense products, MXFP4 experts and attention.
//
// One translation unit: this file includes the kernels by operation (common.h, dense.h, mxfp4.h,
// attention.h, int8.h, amx.h, norm_rotary.h, experts.h, probe.h) and ends with the C interface that
// gptoss/ops/cpu/__init__.py calls. It is compiled by setup.py at install time (recipe in
// build.py), without -march: every SIMD function carries its own __attribute__((target(...))) and the path
// is chosen at run time (Isa in common.h), so one binary runs on any x86-64 CPU.
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
// On a CPU with AMX-INT8 the many-token int8 products take their block sums on the AMX tiles (amx.h).
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
#include <memory>
#include <string>
#include <vector>

namespace gptoss {

#define T_AVX2 __attribute__((target("avx2,fma,f16c")))
#define T_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define T_AVX512BF16 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define INLINE inline __attribute__((always_inline))

using bf16_t = uint16_t;  // raw bfloat16 bits

// The kernels, by operation (each part uses only those before it).
#include "common.h"
#include "dense.h"
#include "mxfp4.h"
#include "attention.h"
#include "int8.h"
#include "amx.h"
#include "norm_rotary.h"
#include "experts.h"
#include "probe.h"
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

int gptoss_abi_version() { return 4; }
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
// The int8 expert kernels the current ISA path runs: 0 none, 1 avx2, 2 avx-vnni, 3 avx512-vnni.
int gptoss_int8_kernels() { return static_cast<int>(q8_kind(g_isa)); }
int gptoss_has_avx_vnni() { return g_has_avx_vnni ? 1 : 0; }
void gptoss_use_avx_vnni(int on) { g_use_avx_vnni = on && g_has_avx_vnni; }
int gptoss_has_amx() { return g_has_amx ? 1 : 0; }
void gptoss_use_amx(int on) { g_use_amx = on && g_has_amx; }
int gptoss_gemv_side_by_side() { return g_gemv_side_by_side ? 1 : 0; }
void gptoss_use_gemv_side_by_side(int on) { g_gemv_side_by_side = on != 0; }
int gptoss_get_int8_activations() { return static_cast<int>(g_int8_act); }
void gptoss_set_int8_activations(int mode) { g_int8_act = static_cast<Int8Activations>(mode); }

void gptoss_linear(const void* x, const void* w, int bf16, const void* bias, int bias_bf16, int64_t M, int64_t N,
                   int64_t K, void* out, int out_bf16, int threads) {
  g_threads = threads;
  linear_impl(x, w, bf16 != 0, bias, bias_bf16 != 0 && bias, M, N, K, out, out_bf16 != 0);
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
