// gptoss CPU kernels: RMSNorm and rotary embedding.
// Part of one translation unit: included by kernels.cpp, in order, inside namespace gptoss.
#pragma once

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
