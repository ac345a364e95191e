// gptoss CPU kernels: benchmark helper: the memory-bandwidth probe (not used by the model).
// Part of one translation unit: included by kernels.cpp, in order, inside namespace gptoss.
#pragma once

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
