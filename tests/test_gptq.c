/*
 * test_gptq.c -- GPTQ repacking, dequantization and the CPU int4 matmul paths.
 *
 * Random GPTQ tensors (every nibble random, random f16 scales, random or symmetric zeros,
 * random act-order permutations) are built here directly in the checkpoint layout, so the
 * independent dequantization below reads qweight/qzeros/scales/g_idx by the format's own
 * definition, not through the repacked layout. Tolerances:
 *  - dequant: exact (f16 scale times an integer is exact in f32).
 *  - SIMD vs scalar path: same int8 activations, same operation order, explicit FMAs: equal to
 *    f32 rounding; we allow 1e-6 * sum|W||x| (a bug shows up as O(1) relative error).
 *  - any path vs the exact f32 product: the int8 activation rounding bound,
 *    |err| <= sum_i |W[o][i]| * amax(x) / 254 (half a quantum of a block whose amax is at most
 *    the row's amax), plus 1e-5 * sum|W||x| for f32 accumulation.
 * Fixtures from the independent Python packer (scripts/make_gptq_fixture.py) are checked in
 * test gptq_fixtures.
 */
#include "cpu/threads.h"
#include "dtype.h"
#include "gptq.h"
#include "test.h"
#include "test_gptq_util.h"
#include "util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---- random checkpoint tensors ----

// W[o][i] straight from the checkpoint definition.
static void dequant_direct(const struct gptq_case *c, const struct gptq_tensors *g, float *wd) {
    int64_t in = c->n_in, out = c->n_out;
    for (int64_t i = 0; i < in; i++) {
        int32_t grp = g->g_idx ? g->g_idx[i] : (c->gs == -1 ? 0 : (int32_t)(i / c->gs));
        for (int64_t o = 0; o < out; o++) {
            int   q = (int)(((uint32_t)g->qweight[(i / 8) * out + o] >> (4 * (i % 8))) & 15u);
            int   z = (int)(((uint32_t)g->qzeros[grp * (out / 8) + o / 8] >> (4 * (o % 8))) & 15u) + c->v1;
            float s = coopt_f16_to_f32(g->scales[grp * out + o]);
            wd[o * in + i] = s * (float)(q - z);
        }
    }
}

// Checks got against the exact product with the int8-activation bound (see file comment):
// |err| <= sum_i |W[o][i]| * amax(block of i) / 254, blocks of 32 rows in w's padded order.
static bool check_vs_exact(struct test_ctx *t, const char *what, const float *got, const float *x,
                           const float *wd, const struct coopt_gptq_weight *w, int32_t rows) {
    const int64_t in = w->n_in, out = w->n_out;
    float        *half_q = malloc((size_t)in * sizeof(float)); // half a quantum for each input
    double        sum_err2 = 0, sum_var = 0;
    for (int32_t r = 0; r < rows; r++) {
        const float *xr = x + (int64_t)r * in;
        for (int64_t b = 0; b < w->k_pad / 32; b++) {
            float amax = 0;
            for (int k = 0; k < 2; k++) {
                for (int64_t kk = b * 32; kk < b * 32 + 32; kk++) {
                    int64_t i = w->perm ? w->perm[kk] : (kk < in ? kk : -1);
                    if (i < 0) continue;
                    if (k == 0) amax = fmaxf(amax, fabsf(xr[i]));
                    else half_q[i] = amax / 254.0f;
                }
            }
        }
        for (int64_t o = 0; o < out; o++) {
            double exact = 0, tol = 1e-7, swx = 0;
            for (int64_t i = 0; i < in; i++) {
                exact += (double)wd[o * in + i] * xr[i];
                sum_var += (double)wd[o * in + i] * wd[o * in + i] * half_q[i] * half_q[i] / 3.0;
                tol += fabs(wd[o * in + i]) * half_q[i] * 1.0001;
                swx += fabs(wd[o * in + i] * xr[i]);
            }
            tol += 1e-5 * swx;
            double err = fabs(got[(int64_t)r * out + o] - exact);
            sum_err2 += err * err;
            if (!(err <= tol)) {
                test_fail(t, __FILE__, __LINE__, "%s: row %d col %lld: got %.7g exact %.7g err %.3g > tol %.3g", what,
                          r, (long long)o, got[(int64_t)r * out + o], exact, err, tol);
                free(half_q);
                return false;
            }
        }
    }
    free(half_q);
    // Statistically: rounding errors are ~uniform in [-h, h] and independent, so the mean squared
    // error is ~sum W^2 h^2 / 3. Allow 9x that (3x in RMS): a wrong term is far larger.
    if (!(sum_err2 <= 9.0 * sum_var + 1e-12)) {
        test_fail(t, __FILE__, __LINE__, "%s: rms error %.3g > 3 x expected %.3g", what,
                  sqrt(sum_err2 / ((double)rows * out)), sqrt(sum_var / ((double)rows * out)));
        return false;
    }
    return true;
}

static bool run_case(struct test_ctx *t, const struct gptq_case *c, const int32_t *rows_list, int n_rows_list,
                     struct coopt_threadpool *tp, uint64_t seed) {
    uint64_t            rs = seed;
    struct gptq_tensors g;
    char                what[200], base[160];
    snprintf(base, sizeof(base), "in %lld out %lld gs %d act %d sym %d v1 %d", (long long)c->n_in,
             (long long)c->n_out, c->gs, c->act, c->sym, c->v1);
    gptq_make_tensors(&rs, c, NULL, "model.layers.0.mlp.up_proj", &g);
    snprintf(what, sizeof(what), "%s", base);
    struct coopt_gptq_weight *w = NULL;
    bool                      ok = false;
    float *wd = malloc((size_t)(c->n_in * c->n_out) * 4), *wr = calloc((size_t)(c->n_in * c->n_out), 4);
    float *x = NULL, *ys = NULL, *yv = NULL;
    if (coopt_gptq_repack(&g.src, 2, &w) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "%s: repack failed", what);
        goto done;
    }
    dequant_direct(c, &g, wd);
    coopt_gptq_dequant_ref(w, wr);
    for (int64_t i = 0; i < c->n_in * c->n_out; i++) {
        if (wd[i] != wr[i]) {
            test_fail(t, __FILE__, __LINE__, "%s: dequant [%lld][%lld] %g != %g", what, (long long)(i / c->n_in),
                      (long long)(i % c->n_in), wr[i], wd[i]);
            goto done;
        }
    }
    for (int k = 0; k < n_rows_list; k++) {
        int32_t rows = rows_list[k];
        x = malloc((size_t)(rows * c->n_in) * 4);
        ys = malloc((size_t)(rows * c->n_out) * 4);
        yv = malloc((size_t)(rows * c->n_out) * 4);
        for (int64_t i = 0; i < rows * c->n_in; i++) x[i] = test_rand_normal(&rs);
        x[0] = 6.0f; // an outlier
        coopt_gptq_matmul_cpu_isa(NULL, ys, x, w, rows, COOPT_GPTQ_ISA_SCALAR);
        snprintf(what, sizeof(what), "%s rows %d", base, rows);
        if (!check_vs_exact(t, what, ys, x, wd, w, rows)) goto done;
        for (int isa = COOPT_GPTQ_ISA_AVX2; isa <= COOPT_GPTQ_ISA_AVX512VNNI; isa++) {
            if (!coopt_gptq_isa_available((enum coopt_gptq_isa)isa)) continue;
            memset(yv, 0xff, (size_t)(rows * c->n_out) * 4); // NaN: unwritten outputs fail
            coopt_gptq_matmul_cpu_isa(isa == COOPT_GPTQ_ISA_AVX512VNNI ? tp : NULL, yv, x, w, rows,
                                      (enum coopt_gptq_isa)isa);
            for (int64_t i = 0; i < rows * c->n_out; i++) {
                int64_t r = i / c->n_out, o = i % c->n_out;
                double  swx = 0;
                for (int64_t j = 0; j < c->n_in; j++) swx += fabs(wd[o * c->n_in + j] * x[r * c->n_in + j]);
                if (!(fabs(yv[i] - ys[i]) <= 1e-6 * swx + 1e-9)) {
                    test_fail(t, __FILE__, __LINE__, "%s isa %d: [%lld][%lld] %.7g vs scalar %.7g", what, isa,
                              (long long)r, (long long)o, yv[i], ys[i]);
                    goto done;
                }
            }
        }
        free(x), free(ys), free(yv);
        x = ys = yv = NULL;
    }
    ok = true;
done:
    free(x), free(ys), free(yv), free(wd), free(wr);
    coopt_gptq_weight_free(w);
    gptq_tensors_free(&g);
    return ok;
}

TEST(gptq_matmul_small_shapes) {
    // odd output widths (not multiples of the 16/64-column tiles), every group size, act-order
    // on/off/irregular, sym/asym, v1/v2
    static const struct gptq_case cases[] = {
        {256, 8, 32, 0, 1, 1},    {256, 24, 64, 1, 0, 1},  {384, 72, 128, 0, 0, 0},  {384, 200, 128, 1, 1, 0},
        {200, 72, -1, 0, 0, 1},   {256, 40, -1, 1, 0, 0},  {512, 88, 64, 2, 0, 1},   {192, 56, 16, 0, 0, 0},
        {160, 24, 32, 1, 0, 0},   {128, 136, 128, 2, 1, 1}, {96, 16, 48, 0, 0, 1},
    };
    static const int32_t rows[] = {1, 3, 8, 33};
    for (size_t i = 0; i < COOPT_ARRAY_LEN(cases); i++)
        if (!run_case(t, &cases[i], rows, 4, NULL, 100 + i)) return;
}

TEST(gptq_matmul_real_shapes) {
    // tinyllama-1.1b k/v projection and a slice of down_proj (in 5632), act-order, 2 threads
    struct coopt_threadpool *tp = NULL;
    CHECK(t, coopt_threadpool_init(2, &tp) == COOPT_OK);
    static const struct gptq_case cases[] = {{2048, 256, 128, 1, 0, 1}, {5632, 64, 128, 0, 1, 0}};
    static const int32_t          rows[] = {1, 9};
    bool                          ok = true;
    for (size_t i = 0; i < COOPT_ARRAY_LEN(cases) && ok; i++) ok = run_case(t, &cases[i], rows, 2, tp, 7 + i);
    coopt_threadpool_free(tp);
}

TEST(gptq_repack_errors) {
    uint64_t            rs = 3;
    struct gptq_case    c = {128, 96, 32, 1, 0, 1};
    struct gptq_tensors g;
    gptq_make_tensors(&rs, &c, NULL, "model.layers.0.mlp.up_proj", &g);
    struct coopt_gptq_weight *w = (void *)1;
    struct coopt_gptq_src     s = g.src;
    coopt_log_set_quiet(1);
    CHECK(t, coopt_gptq_repack(&s, 1, &w) == COOPT_OK && w);
    coopt_gptq_weight_free(w);
    s.qzeros_shape[1] = 6; // [4, 6] instead of [4, 12]
    CHECK(t, coopt_gptq_repack(&s, 1, &w) == COOPT_ERR_FORMAT && w == NULL);
    s = g.src, s.scales_shape[0] = 3;
    CHECK(t, coopt_gptq_repack(&s, 1, &w) == COOPT_ERR_FORMAT);
    s = g.src, s.qweight_shape[0] = 15;
    CHECK(t, coopt_gptq_repack(&s, 1, &w) == COOPT_ERR_FORMAT);
    s = g.src, s.n_out = 100; // not a multiple of 8
    CHECK(t, coopt_gptq_repack(&s, 1, &w) == COOPT_ERR_FORMAT);
    s = g.src, s.scales_dtype = COOPT_DTYPE_BF16;
    CHECK(t, coopt_gptq_repack(&s, 1, &w) == COOPT_ERR_FORMAT);
    s = g.src, s.g_idx_len = 127;
    CHECK(t, coopt_gptq_repack(&s, 1, &w) == COOPT_ERR_FORMAT);
    s = g.src, s.bits = 8;
    CHECK(t, coopt_gptq_repack(&s, 1, &w) == COOPT_ERR_UNSUPPORTED);
    s = g.src, s.group_size = 0;
    CHECK(t, coopt_gptq_repack(&s, 1, &w) == COOPT_ERR_FORMAT);
    s = g.src, s.qzeros = NULL;
    CHECK(t, coopt_gptq_repack(&s, 1, &w) == COOPT_ERR_FORMAT);
    g.g_idx[17] = 4; // 4 groups: valid range [0,4)
    CHECK(t, coopt_gptq_repack(&g.src, 1, &w) == COOPT_ERR_FORMAT && w == NULL);
    g.g_idx[17] = -1;
    CHECK(t, coopt_gptq_repack(&g.src, 1, &w) == COOPT_ERR_FORMAT);
    coopt_log_set_quiet(0);
    gptq_tensors_free(&g);
}

TEST(gptq_as_weight) {
    uint64_t            rs = 5;
    struct gptq_case    c = {64, 16, 32, 0, 1, 1};
    struct gptq_tensors g;
    gptq_make_tensors(&rs, &c, NULL, "model.layers.0.mlp.up_proj", &g);
    struct coopt_gptq_weight *w = NULL;
    CHECK(t, coopt_gptq_repack(&g.src, 1, &w) == COOPT_OK);
    struct coopt_weight cw;
    float               bias[16] = {0};
    coopt_gptq_as_weight(w, bias, &cw);
    CHECK(t, cw.dtype == COOPT_DTYPE_Q4_GPTQ && cw.n_in == 64 && cw.n_out == 16 && cw.gptq == w &&
                 cw.bias == bias && cw.data == NULL);
    CHECK(t, w->sym_hint && w->perm == NULL && w->k_pad == 64 && w->n_groups == 2);
    CHECK(t, coopt_gptq_weight_bytes(w) == 16 * 32 + 16 * 2 * 3);
    coopt_gptq_weight_free(w);
    gptq_tensors_free(&g);
}

// ---- fixtures from the independent packer (scripts/make_gptq_fixture.py, test_gptq_util.h) ----

TEST(gptq_fixtures) {
    struct coopt_threadpool *tp = NULL;
    CHECK(t, coopt_threadpool_init(2, &tp) == COOPT_OK);
    int flags_seen = 0;
    for (size_t f = 0; f < COOPT_ARRAY_LEN(gptq_fixture_names); f++) {
        struct gptq_fixture fx;
        const int           lrc = gptq_fixture_load(gptq_fixture_names[f], &fx);
        if (lrc != GPTQ_FIXTURE_OK) {
            coopt_threadpool_free(tp);
            if (lrc == GPTQ_FIXTURE_UNREADABLE)
                CHECKF(t, 0, "cannot read %s (run scripts/make_gptq_fixture.py)", gptq_fixture_names[f]);
            CHECKF(t, 0, "%s: bad fixture header or size", gptq_fixture_names[f]);
        }
        const int64_t               in = fx.in, out = fx.out;
        const struct coopt_gptq_src s   = fx.src;
        const float                *ref = fx.wref;
        flags_seen |= (fx.sym ? 1 : 2) | (fx.act ? 4 : 8) | (fx.v1 ? 16 : 32);

        struct coopt_gptq_weight *w = NULL;
        float                    *wd = NULL, *x = NULL, *y = NULL;
        bool                      pass = false;
        if (coopt_gptq_repack(&s, 1, &w) != COOPT_OK) {
            test_fail(t, __FILE__, __LINE__, "%s: repack failed", gptq_fixture_names[f]);
            goto next;
        }
        wd = malloc((size_t)(in * out) * 4);
        coopt_gptq_dequant_ref(w, wd);
        for (int64_t i = 0; i < in * out; i++) {
            if (wd[i] != ref[i]) { // exact: f16 scale times an integer
                test_fail(t, __FILE__, __LINE__, "%s: W[%lld][%lld] = %.8g, reference %.8g", gptq_fixture_names[f],
                          (long long)(i / in), (long long)(i % in), wd[i], ref[i]);
                goto next;
            }
        }
        uint64_t rs = 11 + f;
        int32_t  rows = 5;
        x = malloc((size_t)(rows * in) * 4), y = malloc((size_t)(rows * out) * 4);
        for (int64_t i = 0; i < rows * in; i++) x[i] = test_rand_normal(&rs);
        for (int isa = COOPT_GPTQ_ISA_SCALAR; isa <= COOPT_GPTQ_ISA_AVX512VNNI; isa++) {
            if (!coopt_gptq_isa_available((enum coopt_gptq_isa)isa)) continue;
            for (int32_t r = 1; r <= rows; r += rows - 1) { // GEMV (1 row) and GEMM (5 rows)
                coopt_gptq_matmul_cpu_isa(tp, y, x, w, r, (enum coopt_gptq_isa)isa);
                char what[128];
                snprintf(what, sizeof(what), "%s isa %d rows %d", gptq_fixture_names[f], isa, r);
                if (!check_vs_exact(t, what, y, x, ref, w, r)) goto next;
            }
        }
        pass = true;
    next:
        free(wd), free(x), free(y), free(fx.data);
        coopt_gptq_weight_free(w);
        if (!pass) break;
    }
    coopt_threadpool_free(tp);
    CHECKF(t, flags_seen == 63, "fixtures must cover sym/asym, act on/off, v1/v2 (seen %#x)", flags_seen);
}
