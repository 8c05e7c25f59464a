/*
 * dtype.c -- dtype names, sizes and scalar conversions. These are the references that SIMD and
 * CUDA conversions are tested against; keep them simple and exact.
 */
#include "dtype.h"

#include "util.h"

#include <math.h>
#include <pthread.h>
#include <string.h>

static const char *const g_names[COOPT_DTYPE_COUNT] = {
    [COOPT_DTYPE_F32] = "f32",           [COOPT_DTYPE_F16] = "f16",
    [COOPT_DTYPE_BF16] = "bf16",         [COOPT_DTYPE_Q8_0] = "q8_0",
    [COOPT_DTYPE_Q4_0] = "q4_0",         [COOPT_DTYPE_FP8_E4M3] = "fp8_e4m3",
    [COOPT_DTYPE_FP8_E5M2] = "fp8_e5m2", [COOPT_DTYPE_Q4_GPTQ] = "gptq4",
    [COOPT_DTYPE_I32] = "i32",
};

const char *coopt_dtype_name(enum coopt_dtype t) {
    return (unsigned)t < COOPT_DTYPE_COUNT ? g_names[t] : "?";
}

bool coopt_dtype_parse(const char *name, enum coopt_dtype *out) {
    for (int i = 0; i < COOPT_DTYPE_COUNT; i++) {
        if (strcmp(name, g_names[i]) == 0) {
            *out = (enum coopt_dtype)i;
            return true;
        }
    }
    if (!strcmp(name, "fp8") || !strcmp(name, "e4m3") || !strcmp(name, "fp8_e4m3fn")) {
        *out = COOPT_DTYPE_FP8_E4M3;
        return true;
    }
    if (!strcmp(name, "e5m2")) {
        *out = COOPT_DTYPE_FP8_E5M2;
        return true;
    }
    return false;
}

int coopt_dtype_block_len(enum coopt_dtype t) {
    return (t == COOPT_DTYPE_Q8_0 || t == COOPT_DTYPE_Q4_0) ? COOPT_QK : 1;
}

size_t coopt_dtype_block_bytes(enum coopt_dtype t) {
    switch (t) {
    case COOPT_DTYPE_F32: return 4;
    case COOPT_DTYPE_I32: return 4;
    case COOPT_DTYPE_F16: return 2;
    case COOPT_DTYPE_BF16: return 2;
    case COOPT_DTYPE_Q8_0: return sizeof(struct coopt_block_q8_0);
    case COOPT_DTYPE_Q4_0: return sizeof(struct coopt_block_q4_0);
    case COOPT_DTYPE_FP8_E4M3: return 1;
    case COOPT_DTYPE_FP8_E5M2: return 1;
    default: return 0;
    }
}

size_t coopt_dtype_row_bytes(enum coopt_dtype t, int64_t n) {
    int bl = coopt_dtype_block_len(t);
    if (n < 0 || n % bl != 0) return 0;
    return (size_t)(n / bl) * coopt_dtype_block_bytes(t);
}

// ---- f16 ----

float coopt_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp  = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0) {
        // zero or subnormal: mant * 2^-24
        float f = (float)mant * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    if (exp == 31) return coopt_f32_from_bits(sign | 0x7f800000u | (mant << 13));
    return coopt_f32_from_bits(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t coopt_f32_to_f16(float f) {
    uint32_t u    = coopt_f32_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t abs  = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return (uint16_t)(sign | 0x7e00u); // NaN
    if (abs >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); // rounds to >= 65520: inf
    if (abs < 0x38800000u) {
        // subnormal f16 (or zero): value = abs * 2^24 rounded to integer, ties to even
        float v = coopt_f32_from_bits(abs) * 16777216.0f;
        return (uint16_t)(sign | (uint32_t)nearbyintf(v));
    }
    uint32_t e    = (abs >> 23) - 112;
    uint32_t m    = abs & 0x7fffffu;
    uint32_t r    = (e << 10) | (m >> 13);
    uint32_t rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (r & 1u))) r++;
    return (uint16_t)(sign | r);
}

// ---- fp8 ----

// Generic OCP FP8 decode with `ebits` exponent bits and `mbits` mantissa bits.
static float fp8_decode(uint8_t x, int ebits, int mbits, int bias) {
    int   sign = x >> 7;
    int   e    = (x >> mbits) & ((1 << ebits) - 1);
    int   m    = x & ((1 << mbits) - 1);
    float v;
    if (e == 0) v = ldexpf((float)m, 1 - bias - mbits);
    else v = ldexpf((float)((1 << mbits) | m), e - bias - mbits);
    return sign ? -v : v;
}

float coopt_fp8_e4m3_to_f32(uint8_t x) {
    if ((x & 0x7f) == 0x7f) return NAN;
    return fp8_decode(x, 4, 3, 7);
}

float coopt_fp8_e5m2_to_f32(uint8_t x) {
    int e = (x >> 2) & 0x1f;
    if (e == 31) {
        if (x & 3) return NAN;
        return (x & 0x80) ? -INFINITY : INFINITY;
    }
    return fp8_decode(x, 5, 2, 15);
}

// Round |f| to the nearest representable magnitude with `mbits` mantissa bits, minimum normal
// exponent 1 - bias, saturating at max_val; returns the encoded magnitude (7 bits).
static uint8_t fp8_encode_abs(float a, int ebits, int mbits, int bias, float max_val) {
    if (!(a == a)) return 0; // caller handles NaN
    if (a >= max_val) a = max_val;
    int emin = 1 - bias;
    int e;
    frexpf(a, &e); // a = f * 2^e, f in [0.5, 1)
    e -= 1;        // a = 1.x * 2^e
    if (a == 0.0f) return 0;
    if (e < emin) e = emin; // subnormal range uses the fixed minimum exponent
    float q    = ldexpf(a, mbits - e);  // scaled so the quantum is 1
    float qr   = nearbyintf(q);         // ties to even (default rounding mode)
    float back = ldexpf(qr, e - mbits);
    if (back > max_val) back = max_val;
    // re-encode `back`
    if (back == 0.0f) return 0;
    int eb;
    frexpf(back, &eb);
    eb -= 1;
    if (eb < emin) {
        int m = (int)ldexpf(back, mbits - emin);
        return (uint8_t)m;
    }
    int m = (int)ldexpf(back, mbits - eb) - (1 << mbits);
    (void)ebits;
    return (uint8_t)(((eb + bias) << mbits) | m);
}

uint8_t coopt_f32_to_fp8_e4m3(float f) {
    if (f != f) return 0x7f;
    uint8_t s = signbit(f) ? 0x80 : 0;
    return s | fp8_encode_abs(fabsf(f), 4, 3, 7, 448.0f);
}

uint8_t coopt_f32_to_fp8_e5m2(float f) {
    if (f != f) return 0x7f;
    uint8_t s = signbit(f) ? 0x80 : 0;
    return s | fp8_encode_abs(fabsf(f), 5, 2, 15, 57344.0f);
}

// ---- rows ----

void coopt_dequant_row(enum coopt_dtype t, const void *src, float *dst, int64_t n) {
    switch (t) {
    case COOPT_DTYPE_F32: memcpy(dst, src, (size_t)n * 4); break;
    case COOPT_DTYPE_F16:
        for (int64_t i = 0; i < n; i++) dst[i] = coopt_f16_to_f32(((const uint16_t *)src)[i]);
        break;
    case COOPT_DTYPE_BF16:
        for (int64_t i = 0; i < n; i++) dst[i] = coopt_bf16_to_f32(((const uint16_t *)src)[i]);
        break;
    case COOPT_DTYPE_FP8_E4M3:
        for (int64_t i = 0; i < n; i++) dst[i] = coopt_fp8_e4m3_to_f32(((const uint8_t *)src)[i]);
        break;
    case COOPT_DTYPE_FP8_E5M2:
        for (int64_t i = 0; i < n; i++) dst[i] = coopt_fp8_e5m2_to_f32(((const uint8_t *)src)[i]);
        break;
    case COOPT_DTYPE_Q8_0: {
        const struct coopt_block_q8_0 *b = src;
        for (int64_t i = 0; i < n / COOPT_QK; i++) {
            float d = coopt_f16_to_f32(b[i].d);
            for (int j = 0; j < COOPT_QK; j++) dst[i * COOPT_QK + j] = d * (float)b[i].qs[j];
        }
        break;
    }
    case COOPT_DTYPE_Q4_0: {
        const struct coopt_block_q4_0 *b = src;
        for (int64_t i = 0; i < n / COOPT_QK; i++) {
            float d = coopt_f16_to_f32(b[i].d);
            for (int j = 0; j < COOPT_QK / 2; j++) {
                dst[i * COOPT_QK + j]                 = d * (float)((b[i].qs[j] & 0x0f) - 8);
                dst[i * COOPT_QK + j + COOPT_QK / 2] = d * (float)((b[i].qs[j] >> 4) - 8);
            }
        }
        break;
    }
    default: COOPT_ASSERT(!"dtype not convertible");
    }
}

void coopt_quant_row(enum coopt_dtype t, const float *src, void *dst, int64_t n) {
    switch (t) {
    case COOPT_DTYPE_F32: memcpy(dst, src, (size_t)n * 4); break;
    case COOPT_DTYPE_F16:
        for (int64_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = coopt_f32_to_f16(src[i]);
        break;
    case COOPT_DTYPE_BF16:
        for (int64_t i = 0; i < n; i++) ((uint16_t *)dst)[i] = coopt_f32_to_bf16(src[i]);
        break;
    case COOPT_DTYPE_FP8_E4M3:
        for (int64_t i = 0; i < n; i++) ((uint8_t *)dst)[i] = coopt_f32_to_fp8_e4m3(src[i]);
        break;
    case COOPT_DTYPE_FP8_E5M2:
        for (int64_t i = 0; i < n; i++) ((uint8_t *)dst)[i] = coopt_f32_to_fp8_e5m2(src[i]);
        break;
    case COOPT_DTYPE_Q8_0: {
        struct coopt_block_q8_0 *b = dst;
        for (int64_t i = 0; i < n / COOPT_QK; i++) {
            float amax = 0;
            for (int j = 0; j < COOPT_QK; j++) amax = fmaxf(amax, fabsf(src[i * COOPT_QK + j]));
            float d  = amax / 127.0f;
            float id = d ? 1.0f / d : 0.0f;
            b[i].d   = coopt_f32_to_f16(d);
            for (int j = 0; j < COOPT_QK; j++) b[i].qs[j] = (int8_t)roundf(src[i * COOPT_QK + j] * id);
        }
        break;
    }
    case COOPT_DTYPE_Q4_0: {
        // GGML's reference: the scale maps the value of largest magnitude to -8.
        struct coopt_block_q4_0 *b = dst;
        for (int64_t i = 0; i < n / COOPT_QK; i++) {
            const float *x    = src + i * COOPT_QK;
            float        amax = 0, max = 0;
            for (int j = 0; j < COOPT_QK; j++) {
                if (fabsf(x[j]) > amax) {
                    amax = fabsf(x[j]);
                    max  = x[j];
                }
            }
            float d  = max / -8.0f;
            float id = d ? 1.0f / d : 0.0f;
            b[i].d   = coopt_f32_to_f16(d);
            for (int j = 0; j < COOPT_QK / 2; j++) {
                int q0 = (int)(x[j] * id + 8.5f), q1 = (int)(x[j + COOPT_QK / 2] * id + 8.5f);
                q0 = q0 > 15 ? 15 : q0;
                q1 = q1 > 15 ? 15 : q1;
                b[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
            }
        }
        break;
    }
    default: COOPT_ASSERT(!"dtype not convertible");
    }
}

// ---- FP8 KV rows ----

static float g_e4m3_table[256], g_e5m2_table[256];

static void fp8_tables_init(void) {
    for (int i = 0; i < 256; i++) {
        g_e4m3_table[i] = coopt_fp8_e4m3_to_f32((uint8_t)i);
        g_e5m2_table[i] = coopt_fp8_e5m2_to_f32((uint8_t)i);
    }
}

const float *coopt_fp8_table(enum coopt_dtype t) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, fp8_tables_init);
    return t == COOPT_DTYPE_FP8_E4M3 ? g_e4m3_table : g_e5m2_table;
}

// A candidate's squared error is summed as COOPT_FP8_ERR_WAYS interleaved partial sums (partial j
// takes elements j, j + 8, j + 16, ... in order), combined pairwise: ((p0 + p1) + (p2 + p3)) +
// ((p4 + p5) + (p6 + p7)). Every backend sums in this order (the CUDA store gives each partial to a
// lane and combines them with three shuffles, instead of one 128-add chain on its critical path).
_Static_assert(COOPT_FP8_ERR_WAYS == 8, "the pairwise combines here and in kv_store.cuh are written for 8 partials");
static float fp8_err_combine(const float p[COOPT_FP8_ERR_WAYS]) {
    return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

// Squared error of the row for each of the 16 candidate scales (candidate k in lane k), computed
// with the same operations in the same order as the scalar loop below, so the choice is identical:
// per lane, v = x[i] * inv_k rounded to the FP8 grid (the decoded value of its code), then
// d = dq * s_k - x[i], err[i % 8] += d * d; no fused multiply-adds.
#if defined(__AVX512F__)
#include <immintrin.h>
static void fp8_search_errors_avx512(bool e4, const float *x, int32_t n, const float *s16, float *err16) {
    const __m512  s      = _mm512_loadu_ps(s16);
    const __m512  inv    = _mm512_div_ps(_mm512_set1_ps(1.0f), s);
    const __m512i absm   = _mm512_set1_epi32(0x7fffffff);
    const __m512i sat_t  = _mm512_set1_epi32(e4 ? 0x43e00000 : 0x47600000);
    const __m512  sat_v  = _mm512_set1_ps(e4 ? 448.0f : 57344.0f);
    const __m512i sub_t  = _mm512_set1_epi32(e4 ? 0x3c800000 : 0x38800000);
    const __m512  sub_sc = _mm512_set1_ps(e4 ? 512.0f : 65536.0f);
    const __m512  sub_iv = _mm512_set1_ps(e4 ? 1.0f / 512.0f : 1.0f / 65536.0f);
    const __m512  magic  = _mm512_set1_ps(8388608.0f);
    const int     msh    = e4 ? 20 : 21; // first dropped mantissa bit
    const __m512i half   = _mm512_set1_epi32((1 << (msh - 1)) - 1);
    const __m512i keep   = _mm512_set1_epi32((int)(0xffffffffu << msh));
    const __m512i one    = _mm512_set1_epi32(1);
    __m512        err[COOPT_FP8_ERR_WAYS];
    for (int j = 0; j < COOPT_FP8_ERR_WAYS; j++) err[j] = _mm512_setzero_ps();
    for (int32_t i = 0; i < n; i++) {
        const int    j  = i % COOPT_FP8_ERR_WAYS;
        const __m512 xi = _mm512_set1_ps(x[i]);
        __m512       v  = _mm512_mul_ps(xi, inv);
        __m512i      u  = _mm512_castps_si512(v);
        __m512i      a  = _mm512_and_si512(u, absm);
        __m512i      sg = _mm512_andnot_si512(absm, u);
        // normal: round the mantissa to nearest even, keep the top bits
        __m512i a2 = _mm512_add_epi32(a, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(a, msh), one)));
        __m512  dq = _mm512_castsi512_ps(_mm512_and_si512(a2, keep));
        // subnormal: multiples of the smallest step
        __m512 m  = _mm512_mul_ps(_mm512_castsi512_ps(a), sub_sc);
        __m512 r  = _mm512_sub_ps(_mm512_add_ps(m, magic), magic);
        dq        = _mm512_mask_mov_ps(dq, _mm512_cmplt_epi32_mask(a, sub_t), _mm512_mul_ps(r, sub_iv));
        dq        = _mm512_mask_mov_ps(dq, _mm512_cmpge_epi32_mask(a, sat_t), sat_v);
        dq        = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(dq), sg));
        __m512 d  = _mm512_sub_ps(_mm512_mul_ps(dq, s), xi);
        err[j]    = _mm512_add_ps(err[j], _mm512_mul_ps(d, d));
    }
    const __m512 e01 = _mm512_add_ps(err[0], err[1]), e23 = _mm512_add_ps(err[2], err[3]);
    const __m512 e45 = _mm512_add_ps(err[4], err[5]), e67 = _mm512_add_ps(err[6], err[7]);
    _mm512_storeu_ps(err16, _mm512_add_ps(_mm512_add_ps(e01, e23), _mm512_add_ps(e45, e67)));
}
#endif

float coopt_fp8_quant_row(enum coopt_dtype t, const float *x, uint8_t *q, int32_t n, int32_t n_search) {
    return coopt_fp8_quant_row_isa(t, x, q, n, n_search, true);
}

float coopt_fp8_quant_row_isa(enum coopt_dtype t, const float *x, uint8_t *q, int32_t n, int32_t n_search,
                              bool simd) {
    COOPT_ASSERT(t == COOPT_DTYPE_FP8_E4M3 || t == COOPT_DTYPE_FP8_E5M2);
    bool         e4   = t == COOPT_DTYPE_FP8_E4M3;
    const float *tab  = coopt_fp8_table(t);
    float        amax = 0.0f;
    for (int32_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(x[i]));
    if (!(amax > 0.0f) || !isfinite(amax)) {
        memset(q, 0, (size_t)n);
        return 0.0f;
    }
    static const float steps[16] = COOPT_FP8_SCALE_STEPS_INIT;
    COOPT_ASSERT(n_search == 1 || n_search == 16);
    float base = amax / (e4 ? 448.0f : 57344.0f), best_s = base;
    if (n_search > 1) {
        float s16[16], err16[16];
        for (int32_t k = 0; k < 16; k++) s16[k] = base * steps[k];
        bool done = false;
#if defined(__AVX512F__)
        if (simd) {
            fp8_search_errors_avx512(e4, x, n, s16, err16);
            done = true;
        }
#endif
        if (!done) {
            for (int32_t k = 0; k < 16; k++) {
                float s = s16[k], inv = 1.0f / s, err[COOPT_FP8_ERR_WAYS] = {0};
                for (int32_t i = 0; i < n; i++) {
                    uint8_t c = e4 ? coopt_fp8_e4m3_encode(x[i] * inv) : coopt_fp8_e5m2_encode(x[i] * inv);
                    float   d = tab[c] * s - x[i];
                    err[i % COOPT_FP8_ERR_WAYS] += d * d;
                }
                err16[k] = fp8_err_combine(err);
            }
        }
        float best_err = INFINITY;
        for (int32_t k = 0; k < 16; k++) {
            if (err16[k] < best_err) {
                best_err = err16[k];
                best_s   = s16[k];
            }
        }
    }
    float inv = 1.0f / best_s;
    for (int32_t i = 0; i < n; i++) q[i] = e4 ? coopt_fp8_e4m3_encode(x[i] * inv) : coopt_fp8_e5m2_encode(x[i] * inv);
    return best_s;
}
