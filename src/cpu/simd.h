/*
 * simd.h -- small SIMD helpers for the CPU fast paths: horizontal sums, loads that turn 16 (AVX-512)
 * or 8 (AVX2) elements of F16/BF16/FP8 into f32 lanes, and a vector exp.
 *
 * Everything here has an #if __AVX512F__ / #elif __AVX2__ / #else ladder at its call sites; the
 * scalar paths use the conversions of dtype.h, which are the reference.
 *
 * FP8 in registers: an E5M2 byte shifted left by 8 is exactly the f16 with the same value, so
 * vcvtph2ps converts it. An E4M3 byte s.eeee.mmm becomes the f16 s.0eeee.mmm0000000, whose
 * value is the E4M3 value times 2^-8 (bias 15 instead of 7; subnormals scale the same way), so
 * callers multiply by 256 -- folded into the per-row scale. The E4M3 NaN code never occurs in
 * the cache (the store path saturates).
 */
#ifndef COOPT_CPU_SIMD_H
#define COOPT_CPU_SIMD_H

#include <stdint.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define COOPT_FP8_E4M3_F16_FACTOR 256.0f // see the file comment

#if defined(__AVX512F__)

// Mask for the first n (0..16) lanes.
static inline __mmask16 simd_mask16(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

// 16 elements at p (n lanes valid, the rest 0) -> f32.
static inline __m512 simd_load_f32(const float *p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 simd_load_f16(const uint16_t *p, __mmask16 m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
static inline __m512 simd_load_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline __m512 simd_load_e5m2(const uint8_t *p, __mmask16 m) {
    __m256i h = _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, p)), 8);
    return _mm512_cvtph_ps(h);
}
// Returns value * 2^-8 (see the file comment).
static inline __m512 simd_load_e4m3(const uint8_t *p, __mmask16 m) {
    __m256i b = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, p));
    __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7),
                                _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8));
    return _mm512_cvtph_ps(h);
}

// exp(x), relative error ~2e-7; x < -87 gives exp(-87) ~ 1.6e-38, x > 88 gives inf.
static inline __m512 simd_exp_ps(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    x              = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n       = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // r = x - n*ln2 in two steps (Cody-Waite)
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r        = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    // exp(r) on |r| <= ln2/2: degree-6 Taylor/minimax (Cephes expf coefficients)
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p        = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p        = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p        = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p        = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p        = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    __m512 r2 = _mm512_mul_ps(r, r);
    p         = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

#endif // __AVX512F__

#if defined(__AVX2__)

static inline float simd_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s        = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s        = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 simd_load8_f16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline __m256 simd_load8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

#endif // __AVX2__

#endif // COOPT_CPU_SIMD_H
