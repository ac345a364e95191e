// gptoss CPU kernels: benchmark helper: the memory-bandwidth probe (not used by the model).
// Part of one translation unit: included by kernels.cpp, in order, inside namespace gptoss.
#pragma once

// Reads every byte of t once with 2 loads per cycle per thread: the machine's read bandwidth.
// The chunk is read as 16 streams side by side, the pattern that read fastest here (a 2-core
// Intel Xeon: 28.0-28.4 GB/s with 8-16 streams per thread against 19-20 with one; see
// docs/cpu-kernels.md), so the reference is the best plain read the kernels could reach.
T_AVX2 static uint64_t xor_reduce_avx2(const uint8_t* p, int64_t n) {
  constexpr int64_t kStreams = 16;
  const int64_t len = n / kStreams / 64 * 64;
  __m256i acc = _mm256_setzero_si256();
  for (int64_t c = 0; c < len; c += 64)
    for (int64_t s = 0; s < kStreams; ++s) {
      const uint8_t* q = p + s * len + c;
      acc = _mm256_xor_si256(acc, _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)q),
                                                   _mm256_loadu_si256((const __m256i*)(q + 32))));
    }
  uint64_t r[4];
  _mm256_storeu_si256((__m256i*)r, acc);
  uint64_t s = r[0] ^ r[1] ^ r[2] ^ r[3];
  for (int64_t i = kStreams * len; i < n; ++i) s ^= p[i];
  return s;
}
