/*
 * test_dtype.c -- scalar conversions: f16, bf16, fp8 round trips and known values.
 */
#include "dtype.h"
#include "test.h"

#include <math.h>

TEST(dtype_f16_roundtrip) {
    // every finite f16 converts to f32 and back unchanged
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7c00) == 0x7c00) continue;
        float f = coopt_f16_to_f32((uint16_t)h);
        CHECKF(t, coopt_f32_to_f16(f) == h, "h=%04x f=%g back=%04x", h, f, coopt_f32_to_f16(f));
    }
    CHECK(t, coopt_f16_to_f32(0x3c00) == 1.0f);
    CHECK(t, coopt_f16_to_f32(0xc000) == -2.0f);
    CHECK(t, coopt_f32_to_f16(65520.0f) == 0x7c00); // rounds to inf
    CHECK(t, coopt_f32_to_f16(1.0f + 1.0f / 2048) == 0x3c00); // tie to even
}

TEST(dtype_fp8_e4m3) {
    // every non-NaN code round-trips; known values
    for (int x = 0; x < 256; x++) {
        if ((x & 0x7f) == 0x7f) continue;
        float f = coopt_fp8_e4m3_to_f32((uint8_t)x);
        CHECKF(t, coopt_f32_to_fp8_e4m3(f) == x || (x == 0x80 && f == 0.0f), "x=%02x f=%g", x, f);
    }
    CHECK(t, coopt_fp8_e4m3_to_f32(0x7e) == 448.0f);
    CHECK(t, coopt_f32_to_fp8_e4m3(1e6f) == 0x7e);           // saturate
    CHECK(t, coopt_fp8_e4m3_to_f32(0x01) == ldexpf(1, -9));  // smallest subnormal
    CHECK(t, coopt_f32_to_fp8_e4m3(1.0625f) == 0x38);        // tie to even (1.0)
}

TEST(dtype_fp8_e5m2) {
    for (int x = 0; x < 256; x++) {
        if (((x >> 2) & 0x1f) == 0x1f) continue;
        float f = coopt_fp8_e5m2_to_f32((uint8_t)x);
        CHECKF(t, coopt_f32_to_fp8_e5m2(f) == x || (x == 0x80 && f == 0.0f), "x=%02x f=%g", x, f);
    }
    CHECK(t, coopt_fp8_e5m2_to_f32(0x7b) == 57344.0f);
}

TEST(dtype_q8_q4_rows) {
    uint64_t s = 1;
    float    x[96], y[96];
    uint8_t  buf[96 * 2];
    test_fill_uniform(&s, x, 96, -3, 3);
    coopt_quant_row(COOPT_DTYPE_Q8_0, x, buf, 96);
    coopt_dequant_row(COOPT_DTYPE_Q8_0, buf, y, 96);
    CHECK_NEAR(t, y, x, 96, 3.0 / 127 * 0.51 + 3e-3, 0); // half a quantum + f16 scale rounding
    coopt_quant_row(COOPT_DTYPE_Q4_0, x, buf, 96);
    coopt_dequant_row(COOPT_DTYPE_Q4_0, buf, y, 96);
    CHECK_NEAR(t, y, x, 96, 3.0 / 8 + 3e-3, 0); // the +max side clamps at 7 quanta: up to one quantum
    CHECK(t, coopt_dtype_row_bytes(COOPT_DTYPE_Q4_0, 64) == 36);
    CHECK(t, coopt_dtype_row_bytes(COOPT_DTYPE_Q4_0, 33) == 0);
}

TEST(dtype_fp8_fast_encoders_exact) {
    // every f32 bit pattern with the low 8 mantissa bits swept coarsely, plus all ties
    for (uint64_t u = 0; u < (1ull << 32); u += 251) {
        float f = coopt_f32_from_bits((uint32_t)u);
        if (f != f) continue;
        uint8_t a = coopt_fp8_e4m3_encode(f), b = coopt_f32_to_fp8_e4m3(f);
        CHECKF(t, a == b, "e4m3 %a: fast %02x ref %02x", (double)f, a, b);
        a = coopt_fp8_e5m2_encode(f);
        b = coopt_f32_to_fp8_e5m2(f);
        CHECKF(t, a == b, "e5m2 %a: fast %02x ref %02x", (double)f, a, b);
    }
    // exact midpoints between neighbouring codes round to even
    for (int c = 0; c < 0x7e; c++) {
        float lo = coopt_fp8_e4m3_to_f32((uint8_t)c), hi = coopt_fp8_e4m3_to_f32((uint8_t)(c + 1));
        float mid = (lo + hi) / 2;
        CHECKF(t, coopt_fp8_e4m3_encode(mid) == coopt_f32_to_fp8_e4m3(mid), "e4m3 tie %d", c);
    }
    for (int c = 0; c < 0x7b; c++) {
        float lo = coopt_fp8_e5m2_to_f32((uint8_t)c), hi = coopt_fp8_e5m2_to_f32((uint8_t)(c + 1));
        float mid = (lo + hi) / 2;
        CHECKF(t, coopt_fp8_e5m2_encode(mid) == coopt_f32_to_fp8_e5m2(mid), "e5m2 tie %d", c);
    }
}

TEST(dtype_fp8_quant_row_search) {
    uint64_t s = 7;
    float    x[128], y[128];
    uint8_t  q[128];
    for (int rep = 0; rep < 200; rep++) {
        for (int i = 0; i < 128; i++) x[i] = test_rand_normal(&s) * (rep % 7 == 0 ? 100.0f : 0.5f);
        for (int n = 8; n <= 128; n *= 2) {
            float err1 = 0, err16 = 0;
            float s1   = coopt_fp8_quant_row(COOPT_DTYPE_FP8_E4M3, x, q, n, 1);
            for (int i = 0; i < n; i++) err1 += powf(coopt_fp8_e4m3_to_f32(q[i]) * s1 - x[i], 2);
            float s16 = coopt_fp8_quant_row(COOPT_DTYPE_FP8_E4M3, x, q, n, 16);
            for (int i = 0; i < n; i++) {
                y[i] = coopt_fp8_e4m3_to_f32(q[i]) * s16;
                err16 += powf(y[i] - x[i], 2);
            }
            // the search includes the plain scale, so it is never worse; and never saturates
            CHECKF(t, err16 <= err1 * (1 + 1e-6f), "rep %d n %d: %g > %g", rep, n, err16, err1);
            float amax = 0;
            for (int i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
            CHECK(t, s16 >= s1 && s16 < 2 * s1 && amax / s16 <= 448.0f * (1 + 1e-6f));
        }
    }
    float zero[16] = {0};
    CHECK(t, coopt_fp8_quant_row(COOPT_DTYPE_FP8_E5M2, zero, q, 16, 16) == 0.0f && q[0] == 0 && q[15] == 0);
}

TEST(dtype_fp8_quant_row_simd_matches_scalar) {
    uint64_t s = 11;
    float    x[256];
    uint8_t  qa[256], qb[256];
    for (int rep = 0; rep < 3000; rep++) {
        int   n     = (int[]){8, 16, 64, 80, 128, 256}[rep % 6];
        float scale = (float[]){1e-6f, 1e-3f, 0.3f, 5.0f, 300.0f, 1e5f}[(rep / 6) % 6];
        for (int i = 0; i < n; i++) {
            x[i] = test_rand_normal(&s) * scale;
            if (rep % 5 == 0 && i % 7 == 0) x[i] = 0.0f;                 // zeros
            if (rep % 9 == 0 && i % 5 == 0) x[i] *= 1e-4f;               // subnormal range
        }
        for (int e = 0; e < 2; e++) {
            enum coopt_dtype ty = e ? COOPT_DTYPE_FP8_E5M2 : COOPT_DTYPE_FP8_E4M3;
            float            sa = coopt_fp8_quant_row_isa(ty, x, qa, n, 16, true);
            float            sb = coopt_fp8_quant_row_isa(ty, x, qb, n, 16, false);
            CHECKF(t, sa == sb && memcmp(qa, qb, (size_t)n) == 0, "rep %d n %d type %d: scale %g vs %g", rep, n, e,
                   (double)sa, (double)sb);
        }
    }
}
