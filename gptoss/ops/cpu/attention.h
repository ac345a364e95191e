// gptoss CPU kernels: attention with sinks, GQA and a sliding window, contiguous or paged keys.
// Part of one translation unit: included by kernels.cpp, in order, inside namespace gptoss.
#pragma once

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
