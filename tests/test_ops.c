/*
 * test_ops.c -- every coopt_ops entry of the fast CPU table against the scalar reference table
 * (ops_cpu_ref.c), with random inputs at real and odd shapes; plus checks of the reference itself
 * against independent formulas where one exists (RoPE, the K/V round trip).
 *
 * Tolerances (|got - ref| <= atol + rtol*|ref|, or a per-element bound), and why:
 *   matmul F32/F16/BF16: 1e-5 * sum_i |w_i x_i| per output -- f32 accumulation in a different
 *     order against a double reference (worst case ~n/16 * 2^-24 relative to sum|w x|).
 *   matmul Q8_0/Q4_0: sum_blocks amax(x block)/254 * sum_block |w| + 1e-5 * sum|w x| -- the fast
 *     path rounds x to int8 per 32-block (error <= half a quantum), see matmul_cpu.c.
 *   attention: 2e-5 abs + 1e-4 rel -- f32 online softmax with a polynomial exp (2e-7 rel)
 *     against double math; both read the same cache bytes.
 *   rmsnorm 2e-6 rel (f32 vs double sum of squares), silu_mul 1e-6 rel (vector exp), the rest
 *     exact.
 *   rope_store round trip, per row: F32 exact; F16 2^-11 and BF16 2^-8 relative per element
 *     (round to nearest with 11 / 8 significant bits); FP8 2^-4 (E4M3, 4 significant bits) and
 *     2^-3 (E5M2, 3 bits) of the row's amax (values are scaled so the amax maps to the FP8 max;
 *     relative rounding error of normals, and subnormals are far smaller in absolute terms).
 */
#include "backend.h"
#include "dtype.h"
#include "kv_cache.h"
#include "test.h"
#include "util.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

struct be_pair {
    struct coopt_backend *fast, *ref;
};

static bool pair_init(struct test_ctx *t, struct be_pair *p, int32_t n_threads) {
    p->fast = p->ref = NULL;
    if (coopt_cpu_backend_init(n_threads, false, &p->fast) != COOPT_OK ||
        coopt_cpu_backend_init(1, true, &p->ref) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "backend init failed");
        return false;
    }
    return true;
}

static void pair_free(struct be_pair *p) {
    if (p->fast) p->fast->ops->destroy(p->fast);
    if (p->ref) p->ref->ops->destroy(p->ref);
}

// ---- matmul ----

static const enum coopt_dtype k_wtypes[] = {COOPT_DTYPE_F32, COOPT_DTYPE_F16, COOPT_DTYPE_BF16, COOPT_DTYPE_Q8_0,
                                            COOPT_DTYPE_Q4_0};

static bool is_quant(enum coopt_dtype d) { return d == COOPT_DTYPE_Q8_0 || d == COOPT_DTYPE_Q4_0; }

// Checks one shape; returns false (after test_fail) on mismatch.
static bool check_matmul(struct test_ctx *t, struct be_pair *p, uint64_t *s, enum coopt_dtype dt, int64_t n_in,
                         int64_t n_out, int32_t n_rows, bool bias) {
    size_t   rb   = coopt_dtype_row_bytes(dt, n_in);
    float   *wf   = test_rand_array(s, (size_t)n_in * n_out, -1, 1);
    uint8_t *wq   = malloc(rb * n_out);
    float   *wd   = malloc((size_t)n_in * n_out * sizeof(float)); // dequantized weights, for bounds
    float   *x    = test_rand_array(s, (size_t)n_in * n_rows, -2, 2);
    float   *b    = bias ? test_rand_array(s, n_out, -1, 1) : NULL;
    float   *got  = malloc((size_t)n_out * n_rows * sizeof(float));
    float   *want = malloc((size_t)n_out * n_rows * sizeof(float));
    for (int64_t o = 0; o < n_out; o++) {
        coopt_quant_row(dt, wf + o * n_in, wq + o * rb, n_in);
        coopt_dequant_row(dt, wq + o * rb, wd + o * n_in, n_in);
    }
    struct coopt_weight w = {.dtype = dt, .n_in = n_in, .n_out = n_out, .data = wq, .bias = b};
    p->ref->ops->matmul(p->ref, want, x, &w, n_rows);
    p->fast->ops->matmul(p->fast, got, x, &w, n_rows);
    bool ok = true;
    for (int32_t r = 0; r < n_rows && ok; r++) {
        const float *xr = x + (size_t)r * n_in;
        for (int64_t o = 0; o < n_out && ok; o++) {
            const float *wr  = wd + o * n_in;
            double       mag = 0, qerr = 0;
            for (int64_t i = 0; i < n_in; i++) mag += fabs((double)wr[i] * xr[i]);
            if (is_quant(dt)) {
                for (int64_t b0 = 0; b0 < n_in; b0 += 32) {
                    double amax = 0, sw = 0;
                    for (int j = 0; j < 32; j++) {
                        amax = fmax(amax, fabs(xr[b0 + j]));
                        sw += fabs(wr[b0 + j]);
                    }
                    qerr += amax / 254.0 * sw;
                }
            }
            double tol = 1e-5 * mag + qerr + 1e-6;
            double g = got[(size_t)r * n_out + o], e = want[(size_t)r * n_out + o];
            if (!(fabs(g - e) <= tol)) {
                test_fail(t, __FILE__, __LINE__,
                          "matmul %s n_in %lld n_out %lld n_rows %d bias %d: out[%d][%lld] = %.7g, ref %.7g, tol %.3g",
                          coopt_dtype_name(dt), (long long)n_in, (long long)n_out, n_rows, bias, r, (long long)o, g,
                          e, tol);
                ok = false;
            }
        }
    }
    free(wf), free(wq), free(wd), free(x), free(b), free(got), free(want);
    return ok;
}

TEST(ops_matmul) {
    struct be_pair p;
    if (!pair_init(t, &p, 2)) return;
    uint64_t      s         = 42;
    const int64_t n_ins[]   = {64, 128, 172};
    const int64_t n_outs[]  = {1, 7, 64, 173, 512};
    const int32_t n_rowss[] = {1, 3, 8, 17};
    bool          ok        = true;
    for (size_t d = 0; d < COOPT_ARRAY_LEN(k_wtypes) && ok; d++)
        for (size_t a = 0; a < COOPT_ARRAY_LEN(n_ins) && ok; a++) {
            if (is_quant(k_wtypes[d]) && n_ins[a] % 32) continue;
            for (size_t bo = 0; bo < COOPT_ARRAY_LEN(n_outs) && ok; bo++)
                for (size_t c = 0; c < COOPT_ARRAY_LEN(n_rowss) && ok; c++)
                    ok = check_matmul(t, &p, &s, k_wtypes[d], n_ins[a], n_outs[bo], n_rowss[c], (a + bo + c) % 3 == 0);
        }
    // long rows (several k slices in the prefill path) and several row panels
    for (size_t d = 0; d < COOPT_ARRAY_LEN(k_wtypes) && ok; d++) {
        ok = ok && check_matmul(t, &p, &s, k_wtypes[d], 4096 + 32, 7, 1, false);
        ok = ok && check_matmul(t, &p, &s, k_wtypes[d], 4096 + 32, 9, 17, true);
        ok = ok && check_matmul(t, &p, &s, k_wtypes[d], 96, 33, 131, false);
    }
    pair_free(&p);
}

TEST(ops_matmul_decode) {
    // the decode path (n_rows <= 8): every row count, quantized rows of 1..17 blocks (partial last
    // steps of 8 blocks), float rows with partial last vectors, and a 2-step row
    struct be_pair p;
    if (!pair_init(t, &p, 2)) return;
    uint64_t      s            = 11;
    const int64_t q_ins[]      = {32, 96, 160, 224, 256, 288, 544};
    const int64_t f_ins[]      = {1, 17, 33, 100, 256, 300};
    bool          ok           = true;
    for (size_t d = 0; d < COOPT_ARRAY_LEN(k_wtypes) && ok; d++) {
        const int64_t *ins = is_quant(k_wtypes[d]) ? q_ins : f_ins;
        size_t         n   = is_quant(k_wtypes[d]) ? COOPT_ARRAY_LEN(q_ins) : COOPT_ARRAY_LEN(f_ins);
        for (size_t a = 0; a < n && ok; a++)
            for (int32_t rows = 1; rows <= 9 && ok; rows++)
                ok = check_matmul(t, &p, &s, k_wtypes[d], ins[a], 37, rows, (a + (size_t)rows) % 2 == 0);
    }
    pair_free(&p);
}

TEST(ops_matmul_threads) {
    // 1 and 3 threads (uneven splits) give the same results as the reference
    for (int32_t n = 1; n <= 3; n += 2) {
        struct be_pair p;
        if (!pair_init(t, &p, n)) return;
        uint64_t s  = 7;
        bool     ok = true;
        for (size_t d = 0; d < COOPT_ARRAY_LEN(k_wtypes) && ok; d++) {
            ok = check_matmul(t, &p, &s, k_wtypes[d], 256, 301, 1, true) &&
                 check_matmul(t, &p, &s, k_wtypes[d], 256, 67, 9, false);
        }
        pair_free(&p);
        if (!ok) return;
    }
}

// ---- embed, rmsnorm, element-wise ----

TEST(ops_embed) {
    struct be_pair p;
    if (!pair_init(t, &p, 2)) return;
    uint64_t s = 3;
    for (size_t d = 0; d < COOPT_ARRAY_LEN(k_wtypes); d++) {
        int64_t  n_in = is_quant(k_wtypes[d]) ? 96 : 77, n_vocab = 50;
        size_t   rb   = coopt_dtype_row_bytes(k_wtypes[d], n_in);
        float   *tf   = test_rand_array(&s, (size_t)n_in * n_vocab, -1, 1);
        uint8_t *tq   = malloc(rb * n_vocab);
        for (int64_t r = 0; r < n_vocab; r++) coopt_quant_row(k_wtypes[d], tf + r * n_in, tq + r * rb, n_in);
        struct coopt_weight w = {.dtype = k_wtypes[d], .n_in = n_in, .n_out = n_vocab, .data = tq};
        int32_t tokens[600];
        for (int i = 0; i < 600; i++) tokens[i] = (int32_t)(test_rand_u64(&s) % n_vocab);
        float *got = malloc(600 * n_in * sizeof(float)), *want = malloc(600 * n_in * sizeof(float));
        p.fast->ops->embed(p.fast, got, &w, tokens, 600);
        p.ref->ops->embed(p.ref, want, &w, tokens, 600);
        bool ok = memcmp(got, want, 600 * n_in * sizeof(float)) == 0;
        free(tf), free(tq), free(got), free(want);
        CHECKF(t, ok, "embed %s differs from the reference", coopt_dtype_name(k_wtypes[d]));
    }
    pair_free(&p);
}

TEST(ops_rmsnorm) {
    struct be_pair p;
    if (!pair_init(t, &p, 2)) return;
    uint64_t      s      = 5;
    const int32_t dims[] = {1, 15, 64, 100, 4096};
    for (size_t d = 0; d < COOPT_ARRAY_LEN(dims); d++) {
        int32_t dim = dims[d], n_rows = 37;
        float  *x = test_rand_array(&s, (size_t)dim * n_rows, -3, 3), *w = test_rand_array(&s, dim, 0.5f, 1.5f);
        float  *got = malloc((size_t)dim * n_rows * sizeof(float)), *want = malloc((size_t)dim * n_rows * sizeof(float));
        p.ref->ops->rmsnorm(p.ref, want, x, w, n_rows, dim, 1e-5f);
        p.fast->ops->rmsnorm(p.fast, got, x, w, n_rows, dim, 1e-5f);
        bool ok = test_near(t, __FILE__, __LINE__, got, want, (size_t)dim * n_rows, 1e-7, 2e-6);
        // in place (out == x) and a single row
        p.fast->ops->rmsnorm(p.fast, x, x, w, n_rows, dim, 1e-5f);
        ok = ok && test_near(t, __FILE__, __LINE__, x, want, (size_t)dim * n_rows, 1e-7, 2e-6);
        free(x), free(w), free(got), free(want);
        if (!ok) return;
    }
    // a known value: x = [3, 4] -> rms = sqrt(12.5)
    float x[2] = {3, 4}, w[2] = {1, 2}, o[2];
    p.fast->ops->rmsnorm(p.fast, o, x, w, 1, 2, 0);
    float r = 1.0f / sqrtf(12.5f);
    CHECK(t, fabsf(o[0] - 3 * r) < 1e-6f && fabsf(o[1] - 8 * r) < 1e-6f);
    pair_free(&p);
}

TEST(ops_elementwise) {
    struct be_pair p;
    if (!pair_init(t, &p, 2)) return;
    uint64_t      s    = 9;
    const int64_t ns[] = {1, 17, 1000, 100003};
    for (size_t k = 0; k < COOPT_ARRAY_LEN(ns); k++) {
        int64_t n = ns[k];
        float  *a = test_rand_array(&s, n, -20, 20), *b = test_rand_array(&s, n, -2, 2);
        float  *got = malloc(n * sizeof(float)), *want = malloc(n * sizeof(float));
        p.ref->ops->silu_mul(p.ref, want, a, b, n);
        p.fast->ops->silu_mul(p.fast, got, a, b, n);
        bool ok = test_near(t, __FILE__, __LINE__, got, want, n, 1e-7, 1e-6);
        p.ref->ops->add(p.ref, want, a, b, n);
        p.fast->ops->add(p.fast, a, a, b, n); // aliasing out == a
        ok = ok && test_near(t, __FILE__, __LINE__, a, want, n, 0, 0);
        free(a), free(b), free(got), free(want);
        if (!ok) return;
    }
    // silu known values: silu(0) = 0, silu(1) = 1/(1+e^-1)
    float g[2] = {0, 1}, u[2] = {5, 2}, o[2];
    p.fast->ops->silu_mul(p.fast, o, g, u, 2);
    CHECK(t, o[0] == 0 && fabsf(o[1] - 2.0f / (1.0f + expf(-1.0f))) < 1e-6f);
    // get_rows, in place with ascending rows
    float   x[5 * 3];
    int32_t rows[3] = {1, 3, 4};
    for (int i = 0; i < 15; i++) x[i] = (float)i;
    p.fast->ops->get_rows(p.fast, x, x, rows, 3, 3);
    float want_rows[9] = {3, 4, 5, 9, 10, 11, 12, 13, 14};
    CHECK_NEAR(t, x, want_rows, 9, 0, 0);
    pair_free(&p);
}

// ---- argmax ----

// The greedy choice: hand-made rows with known answers (ties, NaN, infinities, nothing to
// choose), then random rows at vocabulary sizes against coopt_sampler's greedy choice.
TEST(ops_argmax) {
    struct be_pair p;
    if (!pair_init(t, &p, 2)) return;
    const float inf = INFINITY, nan = NAN;
    struct {
        int32_t n, want;
        float   x[6];
    } rows[] = {
        {4, 1, {1, 3, 3, 2}},           {5, 2, {nan, -inf, 2, nan, 2}}, {3, 0, {-inf, -inf, -inf}},
        {3, 0, {nan, nan, nan}},        {3, 1, {-inf, inf, 5}},          {2, 0, {-FLT_MAX, -inf}},
        {2, 1, {-inf, -FLT_MAX}},       {1, 0, {-7}},                    {6, 5, {-1, -2, -3, -4, -5, 0}},
    };
    for (size_t i = 0; i < COOPT_ARRAY_LEN(rows); i++) {
        int32_t got[2] = {-1, -1};
        p.fast->ops->argmax(p.fast, got, NULL, rows[i].x, 1, rows[i].n);
        p.ref->ops->argmax(p.ref, got + 1, NULL, rows[i].x, 1, rows[i].n);
        CHECKF(t, got[0] == rows[i].want && got[1] == rows[i].want, "row %zu: argmax %d / %d, want %d", i, got[0], got[1],
               rows[i].want);
    }
    struct coopt_sampler_params sp = coopt_sampler_default_params();
    sp.temp                        = 0;
    uint64_t      s                = 5;
    const int32_t ns[]             = {7, 32000, 32001};
    for (size_t k = 0; k < COOPT_ARRAY_LEN(ns); k++) {
        int32_t               n = ns[k], got[3];
        float                *x = test_rand_array(&s, (size_t)3 * n, -4, 4);
        struct coopt_sampler *smp;
        CHECK(t, coopt_sampler_init(&sp, n, &smp) == COOPT_OK);
        x[n + 3] = x[n + n - 2] = 9; // row 1: a tie, the lower index wins
        x[2 * n + n - 1] = 10;       // row 2: the last element
        p.fast->ops->argmax(p.fast, got, NULL, x, 3, n);
        for (int r = 0; r < 3; r++) {
            int32_t want = coopt_sampler_sample(smp, x + (size_t)r * n);
            CHECKF(t, got[r] == want, "n %d row %d: argmax %d, sampler %d", n, r, got[r], want);
        }
        CHECK(t, got[1] == 3 && got[2] == n - 1);
        coopt_sampler_free(smp);
        free(x);
    }
    pair_free(&p);
}

// ---- rope ----

static float *make_inv_freq(int32_t hd, float theta) {
    float *f = malloc((size_t)hd / 2 * sizeof(float));
    for (int32_t i = 0; i < hd / 2; i++) f[i] = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
    return f;
}

TEST(ops_rope) {
    struct be_pair p;
    if (!pair_init(t, &p, 2)) return;
    uint64_t s = 11;
    for (int layout = 0; layout < 2; layout++) {
        int32_t          hd = 64, nh = 5, n = 40;
        float           *inv = make_inv_freq(hd, 10000.0f);
        struct coopt_rope rope = {.layout = layout ? COOPT_ROPE_HALF : COOPT_ROPE_INTERLEAVED, .head_dim = hd,
                                  .inv_freq = inv};
        int32_t          pos[40];
        for (int i = 0; i < n; i++) pos[i] = (int32_t)(test_rand_u64(&s) % 5000);
        float *q = test_rand_array(&s, (size_t)n * nh * hd, -1, 1);
        float *a = malloc((size_t)n * nh * hd * sizeof(float)), *b = malloc((size_t)n * nh * hd * sizeof(float));
        float *indep = malloc((size_t)n * nh * hd * sizeof(float));
        memcpy(a, q, (size_t)n * nh * hd * sizeof(float));
        memcpy(b, q, (size_t)n * nh * hd * sizeof(float));
        p.ref->ops->rope(p.ref, a, nh, pos, n, &rope);
        p.fast->ops->rope(p.fast, b, nh, pos, n, &rope);
        // independent: HF's formula, angle in f32 (pos * inv_freq), cos/sin in double
        for (int tk = 0; tk < n; tk++)
            for (int h = 0; h < nh; h++) {
                const float *x = q + ((size_t)tk * nh + h) * hd;
                float       *y = indep + ((size_t)tk * nh + h) * hd;
                for (int i = 0; i < hd / 2; i++) {
                    float  ang = (float)pos[tk] * inv[i];
                    double c = cos(ang), sn = sin(ang);
                    int    i0 = layout ? i : 2 * i, i1 = layout ? i + hd / 2 : 2 * i + 1;
                    y[i0] = (float)(x[i0] * c - x[i1] * sn);
                    y[i1] = (float)(x[i1] * c + x[i0] * sn);
                }
            }
        bool ok = test_near(t, __FILE__, __LINE__, b, a, (size_t)n * nh * hd, 0, 0) &&
                  test_near(t, __FILE__, __LINE__, a, indep, (size_t)n * nh * hd, 1e-6, 1e-6);
        free(inv), free(q), free(a), free(b), free(indep);
        if (!ok) return;
    }
    pair_free(&p);
}

// ---- KV cache helpers ----

static const enum coopt_dtype k_kvtypes[] = {COOPT_DTYPE_F32, COOPT_DTYPE_F16, COOPT_DTYPE_BF16,
                                             COOPT_DTYPE_FP8_E4M3, COOPT_DTYPE_FP8_E5M2};

// Reads one cached row back as f32 (scale applied).
static void kv_read_row(const struct coopt_kv_cache *kv, int64_t page, int32_t layer, int kvi, int32_t h, int32_t row,
                        float *dst) {
    const struct coopt_kv_layout *l = &kv->layout;
    coopt_dequant_row(l->dtype, kv->pool + coopt_kv_offset(l, page, layer, kvi, h, row), dst, l->head_dim);
    if (l->has_scales) {
        float sc;
        memcpy(&sc, kv->pool + coopt_kv_scale_offset(l, page, layer, kvi, h, row), 4);
        for (int32_t i = 0; i < l->head_dim; i++) dst[i] *= sc;
    }
}

TEST(ops_rope_store_roundtrip) {
    struct be_pair p;
    if (!pair_init(t, &p, 2)) return;
    uint64_t s = 13;
    for (size_t kt = 0; kt < COOPT_ARRAY_LEN(k_kvtypes); kt++)
        for (int layout = 0; layout < 2; layout++) {
            enum coopt_dtype dt = k_kvtypes[kt];
            int32_t hd = layout ? 80 : 64, nh = 8, nkv = 2, ps = 7, n_layers = 3, layer = 1, n = 23, n_pages = 5;
            struct coopt_kv_cache kv = {0};
            CHECK(t, coopt_kv_layout_init(&kv.layout, dt, n_layers, nkv, hd, ps) == COOPT_OK);
            size_t pool_bytes = kv.layout.page_bytes * n_pages;
            void  *pool_ref;
            CHECK(t, p.fast->ops->kv_pool_init(p.fast, pool_bytes, (void **)&kv.pool) == COOPT_OK);
            CHECK(t, p.ref->ops->kv_pool_init(p.ref, pool_bytes, &pool_ref) == COOPT_OK);
            float            *inv  = make_inv_freq(hd, 500000.0f);
            struct coopt_rope rope = {.layout   = layout ? COOPT_ROPE_HALF : COOPT_ROPE_INTERLEAVED,
                                      .head_dim = hd,
                                      .inv_freq = inv};
            // tokens at positions 0..n-1 of one sequence, pages in a scrambled order
            int32_t bt[5] = {3, 0, 4, 1, 2}, pos[23], seq[23];
            int64_t slots[23];
            for (int i = 0; i < n; i++) {
                pos[i]   = i;
                seq[i]   = 0;
                slots[i] = (int64_t)bt[i / ps] * ps + i % ps;
            }
            struct coopt_batch b = {.n_tokens = n, .pos = pos, .tok_seq = seq, .slots = slots, .n_seqs = 1,
                                    .max_blocks = 5, .block_tables = bt};
            float *q = test_rand_array(&s, (size_t)n * nh * hd, -1, 1), *k = test_rand_array(&s, (size_t)n * nkv * hd, -3, 3),
                  *v = test_rand_array(&s, (size_t)n * nkv * hd, -3, 3);
            for (int i = 0; i < hd; i++) v[i] = 0; // an all-zero row: scale 0, zeros
            float *k0 = malloc((size_t)n * nkv * hd * 4), *q_ref = malloc((size_t)n * nh * hd * 4);
            float *q_rope = malloc((size_t)n * nh * hd * 4), *k_rope = malloc((size_t)n * nkv * hd * 4);
            memcpy(k0, k, (size_t)n * nkv * hd * 4);
            memcpy(q_ref, q, (size_t)n * nh * hd * 4);
            memcpy(q_rope, q, (size_t)n * nh * hd * 4);
            memcpy(k_rope, k, (size_t)n * nkv * hd * 4);
            p.ref->ops->rope(p.ref, q_rope, nh, pos, n, &rope);
            p.ref->ops->rope(p.ref, k_rope, nkv, pos, n, &rope);

            p.fast->ops->rope_store(p.fast, q, k, v, nh, &kv, layer, &b, &rope);
            uint8_t *fast_pool = kv.pool;
            kv.pool            = pool_ref;
            p.ref->ops->rope_store(p.ref, q_ref, k, v, nh, &kv, layer, &b, &rope);
            kv.pool = fast_pool;
            CHECKF(t, memcmp(pool_ref, fast_pool, pool_bytes) == 0, "%s: fast and reference caches differ",
                   coopt_dtype_name(dt));
            CHECK_NEAR(t, q, q_rope, (size_t)n * nh * hd, 0, 0);
            CHECK_NEAR(t, q_ref, q_rope, (size_t)n * nh * hd, 0, 0);
            CHECK(t, memcmp(k, k0, (size_t)n * nkv * hd * 4) == 0); // k left unrotated

            double rel = dt == COOPT_DTYPE_F32 ? 0 : dt == COOPT_DTYPE_F16 ? ldexp(1, -11)
                         : dt == COOPT_DTYPE_BF16                          ? ldexp(1, -8)
                         : dt == COOPT_DTYPE_FP8_E4M3                      ? ldexp(1, -4)
                                                                           : ldexp(1, -3);
            bool   fp8 = kv.layout.has_scales;
            float  row[80];
            for (int i = 0; i < n; i++)
                for (int h = 0; h < nkv; h++)
                    for (int kvi = 0; kvi < 2; kvi++) {
                        const float *want = (kvi ? v : k_rope) + ((size_t)i * nkv + h) * hd;
                        kv_read_row(&kv, bt[i / ps], layer, kvi, h, i % ps, row);
                        double amax = 0;
                        for (int j = 0; j < hd; j++) amax = fmax(amax, fabs(want[j]));
                        for (int j = 0; j < hd; j++) {
                            double tol = fp8 ? rel * amax : rel * fabs(want[j]);
                            CHECKF(t, fabs(row[j] - want[j]) <= tol,
                                   "%s layout %d token %d head %d %c[%d]: cache %.7g, want %.7g, tol %.3g",
                                   coopt_dtype_name(dt), layout, i, h, kvi ? 'v' : 'k', j, row[j], want[j], tol);
                        }
                    }
            if (fp8) {
                float sc;
                memcpy(&sc, kv.pool + coopt_kv_scale_offset(&kv.layout, bt[0], layer, 1, 0, 0), 4);
                CHECK(t, sc == 0.0f); // the all-zero v row
            }
            p.fast->ops->kv_pool_free(p.fast, kv.pool, pool_bytes);
            p.ref->ops->kv_pool_free(p.ref, pool_ref, pool_bytes);
            free(inv), free(q), free(k), free(v), free(k0), free(q_ref), free(q_rope), free(k_rope);
        }
    pair_free(&p);
}

// ---- attention ----

struct attn_case {
    int32_t          hd, nh, nkv, ps, window;
    enum coopt_dtype dt;
};

static bool check_attention(struct test_ctx *t, struct be_pair *p, uint64_t *s, const struct attn_case *c) {
    enum { N_SEQS = 4 };
    const int32_t lens[N_SEQS] = {1, 37, 300, 130};
    // query tokens: decode for seqs 0 and 2, a prefill chunk of 5 for seq 1, 20 for seq 3
    const int32_t n_q[N_SEQS] = {1, 5, 1, 20};
    int32_t       max_blocks = (300 + c->ps - 1) / c->ps;
    int32_t       n_pages    = 0;
    for (int i = 0; i < N_SEQS; i++) n_pages += (lens[i] + c->ps - 1) / c->ps;
    struct coopt_kv_cache kv = {0};
    if (coopt_kv_layout_init(&kv.layout, c->dt, 2, c->nkv, c->hd, c->ps) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "layout");
        return false;
    }
    size_t pool_bytes = kv.layout.page_bytes * (size_t)n_pages;
    if (p->fast->ops->kv_pool_init(p->fast, pool_bytes, (void **)&kv.pool) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "pool");
        return false;
    }
    // block tables: pages handed out in a scrambled order
    int32_t *bt   = malloc(sizeof(int32_t) * N_SEQS * max_blocks);
    int32_t *perm = malloc(sizeof(int32_t) * n_pages);
    for (int i = 0; i < n_pages; i++) perm[i] = i;
    for (int i = n_pages - 1; i > 0; i--) {
        int j = (int)(test_rand_u64(s) % (uint64_t)(i + 1)), tmp = perm[i];
        perm[i] = perm[j], perm[j] = tmp;
    }
    int next = 0;
    for (int q = 0; q < N_SEQS; q++)
        for (int bl = 0; bl < max_blocks; bl++) bt[q * max_blocks + bl] = bl * c->ps < lens[q] ? perm[next++] : -1;

    // fill every position through the reference write path (layer 1; layer 0 stays zero)
    int32_t n_all = 0;
    for (int q = 0; q < N_SEQS; q++) n_all += lens[q];
    int32_t *pos = malloc(sizeof(int32_t) * n_all), *seq = malloc(sizeof(int32_t) * n_all);
    int64_t *slots = malloc(sizeof(int64_t) * n_all);
    int      k = 0;
    for (int q = 0; q < N_SEQS; q++)
        for (int i = 0; i < lens[q]; i++, k++) {
            pos[k] = i, seq[k] = q;
            slots[k] = (int64_t)bt[q * max_blocks + i / c->ps] * c->ps + i % c->ps;
        }
    float            *inv  = make_inv_freq(c->hd, 10000.0f);
    struct coopt_rope rope = {.layout = COOPT_ROPE_HALF, .head_dim = c->hd, .inv_freq = inv};
    float *qa = test_rand_array(s, (size_t)n_all * c->nh * c->hd, -1, 1), *ka = test_rand_array(s, (size_t)n_all * c->nkv * c->hd, -1, 1),
          *va = test_rand_array(s, (size_t)n_all * c->nkv * c->hd, -1, 1);
    struct coopt_batch fill = {.n_tokens = n_all, .pos = pos, .tok_seq = seq, .slots = slots, .n_seqs = N_SEQS,
                               .max_blocks = max_blocks, .block_tables = bt};
    p->ref->ops->rope_store(p->ref, qa, ka, va, c->nh, &kv, 1, &fill, &rope);

    // the query batch: the last n_q[q] positions of each sequence
    int32_t qpos[32], qseq[32], n_tok = 0;
    for (int q = 0; q < N_SEQS; q++)
        for (int i = lens[q] - n_q[q]; i < lens[q]; i++) qpos[n_tok] = i, qseq[n_tok++] = q;
    if (c->window > 0) {
        // release pages wholly before every query's window: they must not be read
        for (int q = 0; q < N_SEQS; q++) {
            int first = COOPT_MAX(0, lens[q] - n_q[q] - c->window + 1);
            for (int bl = 0; (bl + 1) * c->ps <= first; bl++) bt[q * max_blocks + bl] = -1;
        }
    }
    struct coopt_batch b = {.n_tokens = n_tok, .pos = qpos, .tok_seq = qseq, .n_seqs = N_SEQS,
                            .max_blocks = max_blocks, .block_tables = bt, .window = c->window};
    float *q    = test_rand_array(s, (size_t)n_tok * c->nh * c->hd, -2, 2);
    size_t n_o  = (size_t)n_tok * c->nh * c->hd;
    float *got  = malloc(n_o * sizeof(float)), *want = malloc(n_o * sizeof(float));
    float  scale = 1.0f / sqrtf((float)c->hd);
    p->ref->ops->attention(p->ref, want, q, c->nh, &kv, 1, &b, scale);
    p->fast->ops->attention(p->fast, got, q, c->nh, &kv, 1, &b, scale);
    bool ok = test_near(t, __FILE__, __LINE__, got, want, n_o, 2e-5, 1e-4);
    if (!ok) {
        char extra[200];
        snprintf(extra, sizeof(extra), " [hd %d heads %d/%d page %d window %d %s]", c->hd, c->nh, c->nkv, c->ps,
                 c->window, coopt_dtype_name(c->dt));
        strncat(t->msg, extra, sizeof(t->msg) - strlen(t->msg) - 1);
    }
    p->fast->ops->kv_pool_free(p->fast, kv.pool, pool_bytes);
    free(bt), free(perm), free(pos), free(seq), free(slots), free(inv), free(qa), free(ka), free(va), free(q);
    free(got), free(want);
    return ok;
}

TEST(ops_attention) {
    struct be_pair p;
    if (!pair_init(t, &p, 2)) return;
    uint64_t      s       = 17;
    const int32_t hds[]   = {8, 32, 64, 80, 96, 128};
    const int32_t heads[][2] = {{8, 8}, {8, 4}, {8, 1}, {32, 8}};
    const int32_t pss[]   = {16, 32, 7};
    int           i       = 0;
    for (size_t a = 0; a < COOPT_ARRAY_LEN(hds); a++)
        for (size_t h = 0; h < COOPT_ARRAY_LEN(heads); h++)
            for (size_t d = 0; d < COOPT_ARRAY_LEN(k_kvtypes); d++, i++) {
                // page size and window cycle through the cases so every pair meets every type
                struct attn_case c = {.hd = hds[a], .nh = heads[h][0], .nkv = heads[h][1], .ps = pss[i % 3],
                                      .window = (i / 3) % 2 ? 64 : 0, .dt = k_kvtypes[d]};
                if (!check_attention(t, &p, &s, &c)) return;
            }
    pair_free(&p);
}

// ---- KV pool ----

TEST(ops_kv_pool) {
    struct be_pair p;
    if (!pair_init(t, &p, 2)) return;
    size_t   page_bytes = 3 * 4096 + 64, n_pages = 4, bytes = page_bytes * n_pages;
    uint8_t *pool;
    CHECK(t, p.fast->ops->kv_pool_init(p.fast, bytes, (void **)&pool) == COOPT_OK);
    for (size_t i = 0; i < bytes; i++) CHECK(t, pool[i] == 0);
    memset(pool, 0xab, bytes);
    p.fast->ops->kv_page_copy(p.fast, pool, page_bytes, 3, 1);
    pool[page_bytes * 2] = 7;
    p.fast->ops->kv_page_copy(p.fast, pool, page_bytes, 0, 2);
    CHECK(t, pool[0] == 7 && pool[1] == 0xab);
    // release page 1: the OS pages wholly inside it read back as zero, its neighbours are kept
    p.fast->ops->kv_pool_release(p.fast, pool, page_bytes, page_bytes);
    size_t    os   = (size_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo   = ((uintptr_t)pool + page_bytes + os - 1) & ~(uintptr_t)(os - 1);
    uintptr_t hi   = ((uintptr_t)pool + 2 * page_bytes) & ~(uintptr_t)(os - 1);
    CHECK(t, hi > lo);
    for (uintptr_t a = lo; a < hi; a++) CHECK(t, *(uint8_t *)a == 0);
    for (uintptr_t a = (uintptr_t)pool + page_bytes; a < lo; a++) CHECK(t, *(uint8_t *)a == 0xab);
    for (uintptr_t a = hi; a < (uintptr_t)pool + 2 * page_bytes; a++) CHECK(t, *(uint8_t *)a == 0xab);
    CHECK(t, pool[2 * page_bytes] == 7 && pool[page_bytes - 1] == 0xab);
    // residency follows writes: a fresh pool of 64 MiB has (almost) nothing resident
    size_t   big = 64u << 20;
    uint8_t *bp;
    CHECK(t, p.fast->ops->kv_pool_init(p.fast, big, (void **)&bp) == COOPT_OK);
    bp[big / 2] = 1;
    unsigned char *vec = malloc(big / os);
    CHECK(t, mincore(bp, big, vec) == 0);
    size_t resident = 0;
    for (size_t i = 0; i < big / os; i++) resident += vec[i] & 1;
    free(vec);
    CHECKF(t, resident <= 16, "%zu OS pages resident after one write", resident);
    p.fast->ops->kv_pool_free(p.fast, bp, big);
    p.fast->ops->kv_pool_free(p.fast, pool, bytes);
    // memory ops
    void *m;
    CHECK(t, p.fast->ops->alloc(p.fast, 1000, &m) == COOPT_OK && ((uintptr_t)m & 63) == 0);
    p.fast->ops->upload(p.fast, m, "hello", 6);
    char back[6];
    p.fast->ops->download(p.fast, back, m, 6);
    p.fast->ops->sync(p.fast);
    p.fast->ops->free(p.fast, m);
    p.fast->ops->free(p.fast, NULL);
    CHECK(t, strcmp(back, "hello") == 0);
    CHECK(t, p.fast->n_threads == 2 && p.ref->n_threads == 1);
    CHECK(t, strcmp(p.fast->ops->name, "cpu") == 0);
    pair_free(&p);
}
