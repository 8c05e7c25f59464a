/*
 * test_quantize.c -- GPTQ / RTN math on small random problems, packing round trips through the
 * GPTQ loader's repacker, and `coopt quantize` end to end on story-lmrs.
 *
 * Exactness: dequantized weights are f16 scale times a small integer, exact in f32, so packing
 * round trips compare bit for bit. GPTQ with H = I propagates nothing (U is diagonal, its
 * off-diagonal entries are exactly 0), so it must equal RTN bit for bit.
 */
#include "cpu/threads.h"
#include "dtype.h"
#include "gptq.h"
#include "quantize.h"
#include "safetensors.h"
#include "test.h"
#include "util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static float rand_normal(uint64_t *rs) {
    double u1 = ((double)(test_rand_u64(rs) >> 11) + 0.5) / 9007199254740992.0;
    double u2 = ((double)(test_rand_u64(rs) >> 11) + 0.5) / 9007199254740992.0;
    return (float)(sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2));
}

static float *rand_matrix(uint64_t *rs, int64_t n_rows, int64_t n_cols, float scale) {
    float *w = malloc((size_t)(n_rows * n_cols) * sizeof(float));
    for (int64_t i = 0; i < n_rows * n_cols; i++) w[i] = scale * rand_normal(rs);
    return w;
}

// X [n_rows][n] with correlated columns (X = Z A, A random with a few strong directions) and
// column scales spread over two orders of magnitude (what act-order exploits).
static float *correlated_x(uint64_t *rs, int64_t n_rows, int64_t n) {
    float *z = rand_matrix(rs, n_rows, n, 1.0f), *a = rand_matrix(rs, n, n, 1.0f);
    float *x = calloc((size_t)(n_rows * n), sizeof(float));
    for (int64_t k = 0; k < n; k++) a[k * n + k] += 4.0f;
    for (int64_t r = 0; r < n_rows; r++)
        for (int64_t k = 0; k < n; k++)
            for (int64_t c = 0; c < n; c++) x[r * n + c] += z[r * n + k] * a[k * n + c];
    for (int64_t c = 0; c < n; c++) {
        float s = powf(10.0f, (float)(c % 7) / 3.0f - 1.0f);
        for (int64_t r = 0; r < n_rows; r++) x[r * n + c] *= s;
    }
    free(z), free(a);
    return x;
}

static double *hessian_of(const float *x, int64_t n_rows, int64_t n) {
    double *h = calloc((size_t)(n * n), sizeof(double));
    coopt_quant_hessian_add(h, n, x, (int32_t)n_rows, NULL);
    coopt_quant_hessian_finish(h, n, n_rows);
    return h;
}

TEST(quantize_hessian) {
    uint64_t                 rs = 11;
    int64_t                  n = 40, rows = 300;
    float                   *x = rand_matrix(&rs, rows, n, 1.0f);
    struct coopt_threadpool *tp;
    CHECK(t, coopt_threadpool_init(2, &tp) == COOPT_OK);
    double *h = calloc((size_t)(n * n), sizeof(double));
    coopt_quant_hessian_add(h, n, x, 100, tp); // two calls, the second crossing the 256-row split
    coopt_quant_hessian_add(h, n, x + 100 * n, (int32_t)(rows - 100), tp);
    coopt_quant_hessian_finish(h, n, rows);
    double worst = 0;
    for (int64_t i = 0; i < n; i++) {
        for (int64_t k = 0; k < n; k++) {
            double ref = 0;
            for (int64_t r = 0; r < rows; r++) ref += (double)x[r * n + i] * x[r * n + k];
            ref *= 2.0 / (double)rows;
            worst = fmax(worst, fabs(h[i * n + k] - ref) / (1 + fabs(ref)));
        }
    }
    coopt_threadpool_free(tp);
    free(x), free(h);
    CHECKF(t, worst < 1e-5, "hessian rel err %g", worst);
}

TEST(quantize_identity_h_equals_rtn) {
    uint64_t rs = 3;
    int64_t  out = 24, in = 96;
    float   *w  = rand_matrix(&rs, out, in, 0.05f);
    double  *h  = calloc((size_t)(in * in), sizeof(double));
    for (int64_t i = 0; i < in; i++) h[i * in + i] = 1.0;
    const int32_t gss[] = {32, 64, -1};
    for (int sym = 0; sym < 2; sym++) {
        for (size_t g = 0; g < COOPT_ARRAY_LEN(gss); g++) {
            for (int act = 0; act < 2; act++) {
                struct coopt_quant_params p = coopt_quant_default_params();
                p.group_size = gss[g], p.sym = sym, p.act_order = act;
                struct coopt_quant_result a, b;
                CHECK(t, coopt_quant_gptq(w, h, out, in, &p, NULL, &a) == COOPT_OK);
                p.act_order = false;
                CHECK(t, coopt_quant_gptq(w, NULL, out, in, &p, NULL, &b) == COOPT_OK);
                bool same = a.n_groups == b.n_groups && !memcmp(a.q, b.q, (size_t)(out * in)) &&
                            !memcmp(a.scale, b.scale, (size_t)(a.n_groups * out) * 2) &&
                            !memcmp(a.zero, b.zero, (size_t)(a.n_groups * out)) &&
                            !memcmp(a.g_idx, b.g_idx, (size_t)in * 4);
                coopt_quant_result_free(&a), coopt_quant_result_free(&b);
                CHECKF(t, same, "GPTQ(H=I) != RTN for sym %d gs %d act %d", sym, gss[g], act);
            }
        }
    }
    free(w), free(h);
}

// RTN on the grid: every weight within half a step of its value when in range; sym zero is 8.
TEST(quantize_rtn_grid) {
    uint64_t rs = 5;
    int64_t  out = 16, in = 64;
    float   *w = rand_matrix(&rs, out, in, 1.0f), *dq = malloc((size_t)(out * in) * 4);
    for (int sym = 0; sym < 2; sym++) {
        struct coopt_quant_params p = coopt_quant_default_params();
        p.group_size = 32, p.sym = sym;
        struct coopt_quant_result r;
        CHECK(t, coopt_quant_gptq(w, NULL, out, in, &p, NULL, &r) == COOPT_OK);
        CHECK(t, r.n_groups == 2);
        coopt_quant_dequant(&r, dq);
        for (int64_t o = 0; o < out; o++) {
            for (int64_t i = 0; i < in; i++) {
                int64_t g = i / 32;
                float   s = coopt_f16_to_f32(r.scale[g * out + o]);
                CHECK(t, !sym || r.zero[g * out + o] == 8);
                CHECK(t, r.zero[g * out + o] >= 1 && r.zero[g * out + o] <= 15 && r.q[o * in + i] <= 15);
                // f16 scale rounding may clip the extreme value by a hair: allow 0.5 step + 1%
                CHECKF(t, fabsf(dq[o * in + i] - w[o * in + i]) <= 0.51f * s + 1e-6f, "o %lld i %lld: %g vs %g (s %g)",
                       (long long)o, (long long)i, dq[o * in + i], w[o * in + i], s);
            }
        }
        coopt_quant_result_free(&r);
    }
    free(w), free(dq);
}

TEST(quantize_gptq_beats_rtn) {
    uint64_t rs = 7;
    int64_t  out = 32, in = 128, rows = 1024;
    float   *x = correlated_x(&rs, rows, in), *w = rand_matrix(&rs, out, in, 0.05f);
    double  *h = hessian_of(x, rows, in);
    float   *dq = malloc((size_t)(out * in) * 4);
    struct coopt_threadpool *tp;
    CHECK(t, coopt_threadpool_init(2, &tp) == COOPT_OK);
    const int32_t gss[] = {32, 128, -1};
    for (int sym = 0; sym < 2; sym++) {
        for (size_t g = 0; g < COOPT_ARRAY_LEN(gss); g++) {
            struct coopt_quant_params p = coopt_quant_default_params();
            p.group_size = gss[g], p.sym = sym;
            struct coopt_quant_result r;
            CHECK(t, coopt_quant_gptq(w, NULL, out, in, &p, NULL, &r) == COOPT_OK);
            coopt_quant_dequant(&r, dq);
            double rtn = coopt_quant_proxy_loss(w, dq, h, out, in);
            coopt_quant_result_free(&r);
            for (int act = 0; act < 2; act++) {
                p.act_order = act;
                CHECK(t, coopt_quant_gptq(w, h, out, in, &p, tp, &r) == COOPT_OK);
                coopt_quant_dequant(&r, dq);
                double gptq = coopt_quant_proxy_loss(w, dq, h, out, in);
                coopt_quant_result_free(&r);
                CHECKF(t, gptq < 0.8 * rtn, "sym %d gs %d act %d: GPTQ loss %g, RTN %g", sym, gss[g], act, gptq, rtn);
            }
        }
    }
    coopt_threadpool_free(tp);
    free(x), free(w), free(h), free(dq);
}

// Threads change nothing: rows are independent.
TEST(quantize_threads_deterministic) {
    uint64_t rs = 9;
    int64_t  out = 40, in = 64, rows = 256;
    float   *x = correlated_x(&rs, rows, in), *w = rand_matrix(&rs, out, in, 0.05f);
    double  *h = hessian_of(x, rows, in);
    struct coopt_threadpool *tp;
    CHECK(t, coopt_threadpool_init(2, &tp) == COOPT_OK);
    struct coopt_quant_params p = coopt_quant_default_params();
    p.group_size = 32, p.act_order = true;
    struct coopt_quant_result a, b;
    CHECK(t, coopt_quant_gptq(w, h, out, in, &p, NULL, &a) == COOPT_OK);
    CHECK(t, coopt_quant_gptq(w, h, out, in, &p, tp, &b) == COOPT_OK);
    bool same = !memcmp(a.q, b.q, (size_t)(out * in)) && !memcmp(a.scale, b.scale, (size_t)(a.n_groups * out) * 2);
    // act-order: g_idx is position / group_size, so it is not sorted and every group has 32 columns
    int32_t cnt[2] = {0, 0};
    bool    sorted = true;
    for (int64_t i = 0; i < in; i++) {
        cnt[a.g_idx[i]]++;
        if (i && a.g_idx[i] < a.g_idx[i - 1]) sorted = false;
    }
    coopt_quant_result_free(&a), coopt_quant_result_free(&b);
    coopt_threadpool_free(tp);
    free(x), free(w), free(h);
    CHECK(t, same);
    CHECK(t, cnt[0] == 32 && cnt[1] == 32 && !sorted);
}

// pack -> coopt_gptq_repack (the loader's path) -> coopt_gptq_dequant_ref == coopt_quant_dequant.
TEST(quantize_pack_roundtrip) {
    uint64_t rs = 13;
    int64_t  out = 24, in = 192, rows = 256;
    float   *x = correlated_x(&rs, rows, in), *w = rand_matrix(&rs, out, in, 0.05f);
    double  *h = hessian_of(x, rows, in);
    float   *ref = malloc((size_t)(out * in) * 4), *got = malloc((size_t)(out * in) * 4);
    const int32_t gss[] = {32, 64, 128, -1};
    for (int sym = 0; sym < 2; sym++) {
        for (size_t g = 0; g < COOPT_ARRAY_LEN(gss); g++) {
            for (int act = 0; act < 2; act++) {
                struct coopt_quant_params p = coopt_quant_default_params();
                p.group_size = gss[g], p.sym = sym, p.act_order = act;
                struct coopt_quant_result r;
                CHECK(t, coopt_quant_gptq(w, h, out, in, &p, NULL, &r) == COOPT_OK);
                int32_t   G  = r.n_groups;
                int32_t  *qw = malloc((size_t)(in / 8 * out) * 4), *qz = malloc((size_t)(G * out / 8) * 4);
                int32_t  *gi = malloc((size_t)in * 4);
                uint16_t *sc = malloc((size_t)(G * out) * 2);
                CHECK(t, coopt_quant_pack(&r, "test", qw, qz, sc, gi) == COOPT_OK);
                struct coopt_gptq_src src = {
                    .name = "test", .n_in = in, .n_out = out, .bits = 4, .group_size = gss[g], .zeros_v1 = true,
                    .qweight = qw, .qweight_shape = {in / 8, out}, .qweight_dtype = COOPT_DTYPE_I32,
                    .qzeros = qz, .qzeros_shape = {G, out / 8}, .qzeros_dtype = COOPT_DTYPE_I32,
                    .scales = sc, .scales_shape = {G, out}, .scales_dtype = COOPT_DTYPE_F16,
                    .g_idx = gi, .g_idx_len = in, .g_idx_dtype = COOPT_DTYPE_I32,
                };
                struct coopt_gptq_weight *gw = NULL;
                enum coopt_status         st = coopt_gptq_repack(&src, 1, &gw);
                if (st == COOPT_OK) {
                    coopt_gptq_dequant_ref(gw, got);
                    coopt_quant_dequant(&r, ref);
                }
                coopt_gptq_weight_free(gw);
                coopt_quant_result_free(&r);
                free(qw), free(qz), free(gi), free(sc);
                CHECKF(t, st == COOPT_OK, "repack failed: sym %d gs %d act %d", sym, gss[g], act);
                CHECKF(t, !memcmp(ref, got, (size_t)(out * in) * 4), "round trip differs: sym %d gs %d act %d", sym,
                       gss[g], act);
            }
        }
    }
    free(x), free(w), free(h), free(ref), free(got);
}

TEST(quantize_errors) {
    uint64_t                  rs = 17;
    float                    *w  = rand_matrix(&rs, 8, 12, 1.0f);
    double                   *h  = calloc(144, sizeof(double));
    struct coopt_quant_params p  = coopt_quant_default_params();
    struct coopt_quant_result r;
    coopt_log_set_quiet(1);
    p.bits = 9;
    CHECK(t, coopt_quant_gptq(w, NULL, 8, 12, &p, NULL, &r) == COOPT_ERR_INVALID && !r.q);
    p.bits = 4, p.group_size = 0;
    CHECK(t, coopt_quant_gptq(w, NULL, 8, 12, &p, NULL, &r) == COOPT_ERR_INVALID);
    p.group_size = 4, p.act_order = true;
    CHECK(t, coopt_quant_gptq(w, NULL, 8, 12, &p, NULL, &r) == COOPT_ERR_INVALID);
    // indefinite H (diagonal +1, a -1 eigenvalue direction), no dampening helps enough
    for (int i = 0; i < 12; i++) h[i * 12 + i] = 1.0;
    h[0 * 12 + 1] = h[1 * 12 + 0] = 1e6; // eigenvalue 1 - 1e6: damp 100 (the last try) is not enough
    p.act_order = false, p.damp = 0.01;
    CHECK(t, coopt_quant_gptq(w, h, 8, 12, &p, NULL, &r) == COOPT_ERR_FORMAT && !r.q);
    // non-finite H
    h[0] = NAN;
    CHECK(t, coopt_quant_gptq(w, h, 8, 12, &p, NULL, &r) == COOPT_ERR_FORMAT);
    // 12 inputs cannot be packed as GPTQ
    CHECK(t, coopt_quant_gptq(w, NULL, 8, 12, &p, NULL, &r) == COOPT_OK);
    int32_t  qw[64], qz[64], gi[16];
    uint16_t sc[64];
    CHECK(t, coopt_quant_pack(&r, "x", qw, qz, sc, gi) == COOPT_ERR_UNSUPPORTED);
    coopt_quant_result_free(&r);
    // dead input columns (H_ii = 0) quantize to exactly 0 and do not break the factorisation
    memset(h, 0, 144 * sizeof(double));
    for (int i = 1; i < 12; i++) h[i * 12 + i] = 1.0 + i;
    CHECK(t, coopt_quant_gptq(w, h, 8, 12, &p, NULL, &r) == COOPT_OK);
    float dq[96];
    coopt_quant_dequant(&r, dq);
    for (int o = 0; o < 8; o++) CHECK(t, dq[o * 12] == 0.0f);
    coopt_quant_result_free(&r);
    coopt_log_set_quiet(0);
    free(w), free(h);
}

// ---- end to end on story-lmrs ----

static void rm_dir(const char *dir) {
    static const char *files[] = {"config.json", "quantize_config.json", "model.safetensors", "tokenizer.json",
                                  "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                                  "generation_config.json", "deq.safetensors"};
    char p[4096];
    for (size_t i = 0; i < COOPT_ARRAY_LEN(files); i++)
        if (coopt_path_join(p, sizeof(p), dir, files[i])) unlink(p);
    rmdir(dir);
}

static float ctx_last_logits(struct test_ctx *t, struct coopt_model *m, const int32_t *toks, int32_t n, float *out) {
    struct coopt_ctx_params cp = coopt_ctx_default_params();
    cp.kv_type                 = COOPT_DTYPE_F32; // isolate the weight quantization error
    cp.n_ctx = 64, cp.n_seq_max = 1, cp.n_threads = 2;
    struct coopt_ctx *c;
    if (coopt_ctx_init(m, &cp, &c) != COOPT_OK) return NAN;
    int32_t seq, seqs[64];
    coopt_seq_new(c, &seq);
    for (int i = 0; i < n; i++) seqs[i] = seq;
    struct coopt_batch_input b  = {.n_tokens = n, .tokens = toks, .seq_ids = seqs};
    float                    mx = NAN;
    if (coopt_ctx_decode(c, &b) == COOPT_OK) {
        const float *lg = coopt_ctx_logits(c, n - 1);
        int32_t      nv = coopt_model_get_info(m)->n_vocab;
        memcpy(out, lg, (size_t)nv * 4);
        mx = 0;
        for (int i = 0; i < nv; i++) mx = isfinite(lg[i]) ? fmaxf(mx, fabsf(lg[i])) : NAN;
    }
    coopt_ctx_free(c);
    (void)t;
    return mx;
}

TEST(quantize_story_lmrs_end_to_end) {
    char        out[64], deq[128];
    const char *model = test_model_path("story-lmrs"), *calib = test_data_path("tinystories-valid-excerpt.txt");
    if (!coopt_path_exists(model) || !coopt_path_exists(calib)) SKIP(t, "story-lmrs or calibration text missing");
    snprintf(out, sizeof(out), "/tmp/coopt-test-quant-%d", (int)getpid());
    snprintf(deq, sizeof(deq), "%s/deq.safetensors", out);
    const char                *files[] = {calib};
    struct coopt_quantize_opts o       = coopt_quantize_default_opts();
    o.calib_files = files, o.n_calib_files = 1, o.n_calib = 8, o.calib_len = 64, o.n_threads = 2;
    o.qp.act_order = true, o.qp.group_size = 64, o.dump_dequant = deq;
    coopt_log_set_quiet(1);
    enum coopt_status st = coopt_quantize_model(model, out, &o);
    coopt_log_set_quiet(0);
    CHECKF(t, st == COOPT_OK, "quantize: %s", coopt_status_str(st));

    struct coopt_model *qm = NULL, *fm = NULL;
    st = coopt_model_load(out, NULL, &qm);
    if (st == COOPT_OK) st = coopt_model_load(model, NULL, &fm);
    const struct coopt_model_info *qi = qm ? coopt_model_get_info(qm) : NULL;
    bool loaded = st == COOPT_OK && qi->weight_dtype == COOPT_DTYPE_Q4_GPTQ && qm->layers[1].w_down.gptq;
    // the loader's view of every layer equals the dequantized weights the quantizer used
    struct coopt_safetensors *ds = NULL;
    bool                      same = loaded && coopt_safetensors_open(deq, &ds) == COOPT_OK;
    if (same) {
        const struct coopt_weight *w   = &qm->layers[1].w_down;
        float                     *got = malloc((size_t)(w->n_in * w->n_out) * 4);
        coopt_gptq_dequant_ref(w->gptq, got);
        const struct coopt_st_tensor *ref = coopt_safetensors_find(ds, "model.layers.1.mlp.down_proj.weight");
        same = ref && ref->n_bytes == (size_t)(w->n_in * w->n_out) * 4 && !memcmp(got, ref->data, ref->n_bytes);
        free(got);
    }
    coopt_safetensors_free(ds);
    float lq[4096], lf[4096], mq = NAN, mf = NAN;
    int32_t toks[] = {1, 100, 200, 300, 400, 500, 600, 700, 800, 900};
    if (loaded) mq = ctx_last_logits(t, qm, toks, 10, lq), mf = ctx_last_logits(t, fm, toks, 10, lf);
    // quantized logits stay close to the float model's (4-bit noise, not garbage)
    double num = 0, den = 0;
    for (int i = 0; loaded && i < qi->n_vocab; i++)
        num += (lq[i] - lf[i]) * (double)(lq[i] - lf[i]), den += (double)lf[i] * lf[i];
    coopt_model_free(qm), coopt_model_free(fm);
    rm_dir(out);
    CHECKF(t, loaded, "quantized checkpoint did not load as GPTQ");
    CHECK(t, same);
    CHECKF(t, isfinite(mq) && isfinite(mf), "non-finite logits");
    CHECKF(t, sqrt(num / den) < 0.25, "quantized logits differ from float by %.3f (relative)", sqrt(num / den));
}

// GGUF input: stories260K (interleaved Q/K rows, intermediate size 172 padded to 176) with the
// matching HF tokenizer of tinystories-mha-25m. The checkpoint loads through the HF GPTQ path
// (rotate-half RoPE) and must give logits close to the float GGUF model's.
TEST(quantize_stories260k_gguf) {
    const char *gguf = test_model_path("stories260K.gguf"), *tokdir = test_model_path("tinystories-mha-25m");
    const char *calib = test_data_path("tinystories-sample.txt");
    if (!coopt_path_exists(gguf) || !coopt_path_exists(tokdir) || !coopt_path_exists(calib))
        SKIP(t, "stories260K.gguf, tinystories-mha-25m or calibration text missing");
    char out[64];
    snprintf(out, sizeof(out), "/tmp/coopt-test-quant260-%d", (int)getpid());
    const char                *files[] = {calib};
    struct coopt_quantize_opts o       = coopt_quantize_default_opts();
    o.calib_files = files, o.n_calib_files = 1, o.n_calib = 4, o.calib_len = 128, o.n_threads = 2;
    o.qp.group_size = 32, o.tokenizer_dir = tokdir;
    coopt_log_set_quiet(1);
    enum coopt_status st = coopt_quantize_model(gguf, out, &o);
    coopt_log_set_quiet(0);
    CHECKF(t, st == COOPT_OK, "quantize: %s", coopt_status_str(st));
    struct coopt_model *qm = NULL, *fm = NULL;
    st = coopt_model_load(out, NULL, &qm);
    if (st == COOPT_OK) st = coopt_model_load(gguf, NULL, &fm);
    bool ok = st == COOPT_OK && qm->config.ffn_dim == 176 && qm->config.rope_layout == COOPT_ROPE_HALF &&
              coopt_model_get_info(qm)->weight_dtype == COOPT_DTYPE_Q4_GPTQ;
    float   lq[512], lf[512], mq = NAN, mf = NAN;
    int32_t toks[] = {1, 403, 407, 261, 378, 432, 383, 286, 261, 376}; // "Once upon a time, there was a little"
    if (ok) mq = ctx_last_logits(t, qm, toks, 10, lq), mf = ctx_last_logits(t, fm, toks, 10, lf);
    double num = 0, den = 0;
    for (int i = 0; ok && i < 512; i++) num += (lq[i] - lf[i]) * (double)(lq[i] - lf[i]), den += (double)lf[i] * lf[i];
    coopt_model_free(qm), coopt_model_free(fm);
    rm_dir(out);
    CHECKF(t, ok, "checkpoint did not load as a padded rotate-half GPTQ model");
    CHECK(t, isfinite(mq) && isfinite(mf));
    CHECKF(t, sqrt(num / den) < 0.25, "quantized logits differ from float by %.3f (relative)", sqrt(num / den));
}

TEST(quantize_model_errors) {
    const char *model = test_model_path("story-lmrs"), *gguf = test_model_path("stories260K.gguf");
    const char *calib = test_data_path("tinystories-sample.txt");
    if (!coopt_path_exists(model) || !coopt_path_exists(calib)) SKIP(t, "story-lmrs missing");
    const char                *files[] = {calib}, *missing[] = {"/nonexistent/calib.txt"};
    struct coopt_quantize_opts o       = coopt_quantize_default_opts();
    o.calib_files = files, o.n_calib_files = 1, o.n_calib = 2, o.calib_len = 32, o.n_threads = 1;
    coopt_log_set_quiet(1);
    CHECK(t, coopt_quantize_model(gguf, "/tmp/never-written", &o) == COOPT_ERR_UNSUPPORTED); // no --tokenizer-dir
    o.tokenizer_dir = model; // story-lmrs's 2048-piece tokenizer is not stories260K's
    if (coopt_path_exists(gguf)) CHECK(t, coopt_quantize_model(gguf, "/tmp/never-written", &o) == COOPT_ERR_INVALID);
    o.tokenizer_dir = NULL;
    o.qp.bits = 8;
    CHECK(t, coopt_quantize_model(model, "/tmp/never-written", &o) == COOPT_ERR_UNSUPPORTED);
    o.qp.bits = 4, o.gptq = false, o.qp.act_order = true;
    CHECK(t, coopt_quantize_model(model, "/tmp/never-written", &o) == COOPT_ERR_INVALID);
    o.gptq = true, o.qp.act_order = false, o.calib_files = missing;
    CHECK(t, coopt_quantize_model(model, "/tmp/never-written", &o) == COOPT_ERR_IO);
    o.calib_files = files, o.calib_len = 100000; // more tokens per sequence than the text holds
    CHECK(t, coopt_quantize_model(model, "/tmp/never-written", &o) == COOPT_ERR_INVALID);
    o.calib_len = 32;
    CHECK(t, coopt_quantize_model(model, "/nonexistent-dir/sub/out", &o) == COOPT_ERR_IO);
    coopt_log_set_quiet(0);
    CHECK(t, !coopt_path_exists("/tmp/never-written"));
}
