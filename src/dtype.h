/*
 * dtype.h -- element types: sizes, block formats, and scalar conversions.
 *
 * Block formats follow GGML exactly so GGUF tensors are used in place:
 *   Q8_0: { f16 d; int8 qs[32]; }            x = d * qs[i]
 *   Q4_0: { f16 d; uint8 qs[16]; }           x = d * ((nibble) - 8); element i < 16 is the low
 *                                            nibble of qs[i], element i + 16 the high nibble.
 * FP8 follows the OCP 8-bit floating point spec (E4M3: bias 7, max 448, no infinities, S.1111.111
 * is NaN; E5M2: bias 15, IEEE-like). Conversions to FP8 round to nearest even and saturate.
 */
#ifndef COOPT_DTYPE_H
#define COOPT_DTYPE_H

#include "coopt.h"

#include <stdint.h>
#include <string.h>

#define COOPT_QK 32 // values per Q8_0 / Q4_0 block

struct coopt_block_q8_0 {
    uint16_t d;          // f16 scale
    int8_t   qs[COOPT_QK];
};
struct coopt_block_q4_0 {
    uint16_t d;          // f16 scale
    uint8_t  qs[COOPT_QK / 2];
};
_Static_assert(sizeof(struct coopt_block_q8_0) == 34, "q8_0 block size");
_Static_assert(sizeof(struct coopt_block_q4_0) == 18, "q4_0 block size");

// Values per block (1 for plain types) and bytes per block.
int    coopt_dtype_block_len(enum coopt_dtype t);
size_t coopt_dtype_block_bytes(enum coopt_dtype t);
// Bytes of a row of n elements; n must be a multiple of the block length (returns 0 if not).
size_t coopt_dtype_row_bytes(enum coopt_dtype t, int64_t n);

// ---- scalar conversions (the reference for every SIMD path) ----

static inline float coopt_f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint32_t coopt_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float coopt_bf16_to_f32(uint16_t h) { return coopt_f32_from_bits((uint32_t)h << 16); }
static inline uint16_t coopt_f32_to_bf16(float f) {
    uint32_t u = coopt_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                           // round to nearest even
    return (uint16_t)(u >> 16);
}

float    coopt_f16_to_f32(uint16_t h);
uint16_t coopt_f32_to_f16(float f);

float   coopt_fp8_e4m3_to_f32(uint8_t x);
uint8_t coopt_f32_to_fp8_e4m3(float f);
float   coopt_fp8_e5m2_to_f32(uint8_t x);
uint8_t coopt_f32_to_fp8_e5m2(float f);

// Fast exact FP8 encoders (bit manipulation, round to nearest even, saturating, NaN -> NaN code):
// identical to coopt_f32_to_fp8_e4m3 / _e5m2 for every input (tested exhaustively over ranges).
static inline uint8_t coopt_fp8_e4m3_encode(float f) {
    uint32_t u = coopt_f32_bits(f), sign = (u >> 24) & 0x80u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint8_t)(sign | 0x7f);
    if (a >= 0x43e00000u) return (uint8_t)(sign | 0x7e); // >= 448: saturate
    if (a < 0x3c800000u) {                               // < 2^-6: subnormal, quantum 2^-9
        float m = coopt_f32_from_bits(a) * 512.0f;
        float r = (m + 8388608.0f) - 8388608.0f;          // round to nearest even
        return (uint8_t)(sign | (uint32_t)r);            // r == 8 encodes the smallest normal
    }
    a += 0x7ffffu + ((a >> 20) & 1u);                    // round the mantissa to 3 bits
    uint32_t e = (a >> 23) - 120u, m = (a >> 20) & 7u;
    if (e > 15 || (e == 15 && m == 7)) return (uint8_t)(sign | 0x7e);
    return (uint8_t)(sign | (e << 3) | m);
}
static inline uint8_t coopt_fp8_e5m2_encode(float f) {
    uint32_t u = coopt_f32_bits(f), sign = (u >> 24) & 0x80u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint8_t)(sign | 0x7f);
    if (a >= 0x47600000u) return (uint8_t)(sign | 0x7b); // >= 57344: saturate
    if (a < 0x38800000u) {                               // < 2^-14: subnormal, quantum 2^-16
        float m = coopt_f32_from_bits(a) * 65536.0f;
        float r = (m + 8388608.0f) - 8388608.0f;
        return (uint8_t)(sign | (uint32_t)r);
    }
    a += 0xfffffu + ((a >> 21) & 1u);                    // round the mantissa to 2 bits
    uint32_t e = (a >> 23) - 112u, m = (a >> 21) & 3u;
    if (e > 30 || (e == 30 && m == 3)) return (uint8_t)(sign | 0x7b);
    return (uint8_t)(sign | (e << 2) | m);
}

// FP8 KV row quantization with a per-row f32 scale, the Opt-KV write-path reference (every
// backend must produce the same bytes). The scale is amax / fp8_max (the row's largest element
// is then exact) times 2^(k/n_search) for the k in [0, n_search) that minimizes the row's squared
// error; n_search <= 1 keeps amax / fp8_max. Writes n codes to q and returns the scale (0 for an
// all-zero row, whose codes are 0). See docs/BENCHMARKS.md "FP8 KV scaling" for the measurements
// behind the choice (search for K, plain amax for V).
// n_search is 1 or 16; candidate k's scale is base * COOPT_FP8_SCALE_STEPS[k] (2^(k/16) rounded
// to f32, written out so every backend multiplies by the same constants), the error an f32 sum of
// COOPT_FP8_ERR_WAYS interleaved partial sums (partial j: elements i = j mod 8 in order) combined
// pairwise, ((p0 + p1) + (p2 + p3)) + ((p4 + p5) + (p6 + p7)), no fused multiply-add; ties go to
// the smallest k.
float coopt_fp8_quant_row(enum coopt_dtype t, const float *x, uint8_t *q, int32_t n, int32_t n_search);
// The same with the AVX-512 search (16 candidates in 16 lanes) switched off (simd = false): both
// produce identical bytes and scales (tested); the scalar one is the reference.
float coopt_fp8_quant_row_isa(enum coopt_dtype t, const float *x, uint8_t *q, int32_t n, int32_t n_search,
                              bool simd);
#define COOPT_FP8_ERR_WAYS 8
#define COOPT_FP8_SCALE_STEPS_INIT                                                                 \
    {1.000000000e+00f, 1.044273734e+00f, 1.090507746e+00f, 1.138788581e+00f, 1.189207077e+00f,  \
     1.241857767e+00f, 1.296839595e+00f, 1.354255557e+00f, 1.414213538e+00f, 1.476826191e+00f,  \
     1.542210817e+00f, 1.610490322e+00f, 1.681792855e+00f, 1.756252170e+00f, 1.834008098e+00f,  \
     1.915206552e+00f}

// Decode table of an FP8 type (256 entries; NaN codes decode to NaN).
const float *coopt_fp8_table(enum coopt_dtype t);

// Converts n elements of row `src` (type t) to f32. Works for every type but Q4_GPTQ.
void coopt_dequant_row(enum coopt_dtype t, const void *src, float *dst, int64_t n);
// Converts n f32 values into type t (F32, F16, BF16, Q8_0, Q4_0, FP8_*), reference rounding.
void coopt_quant_row(enum coopt_dtype t, const float *src, void *dst, int64_t n);

#endif // COOPT_DTYPE_H
