/*
 * test_eval.c -- the evaluation arithmetic (src/eval.c) on literal values: log-softmax,
 * perplexity and its error, KL divergence (exact and through quantized baseline records),
 * percentiles, the baseline file and the LAMBADA split.
 */
#include "eval.h"
#include "test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NEAR(a, b, tol) (fabs((double)(a) - (double)(b)) <= (tol))

TEST(eval_log_softmax_large_logits) {
    // 1000 would overflow exp() without the max shift; values from Python's math in double
    const float  l[3]   = {1000, 1001, 1002};
    const double ref[3] = {-2.4076059644444285, -1.4076059644444285, -0.40760596444442854};
    double       out[3];
    coopt_eval_log_softmax(l, 3, out);
    for (int i = 0; i < 3; i++) CHECKF(t, NEAR(out[i], ref[i], 1e-12), "i=%d got %.17g want %.17g", i, out[i], ref[i]);
    CHECK(t, NEAR(coopt_eval_nll(l, 3, 0), 2.4076059644444285, 1e-12));
    int32_t am = -1;
    double  lse = coopt_eval_logsumexp(l, 3, &am);
    CHECK(t, am == 2 && NEAR(lse, 1002.4076059644444, 1e-9));
    // very negative logits: no underflow to -inf, ties give the first index
    const float neg[4] = {-1e30f, -5e4f, -5e4f, -1e30f};
    lse                = coopt_eval_logsumexp(neg, 4, &am);
    CHECK(t, am == 1 && NEAR(lse, -5e4 + log(2.0), 1e-6));
    CHECK(t, isfinite(coopt_eval_nll(neg, 4, 0)));
}

TEST(eval_ppl_error_formula) {
    // nll = 1, 2, 3: PPL = e^2, var = 14/3 - 4 = 2/3, err = e^2 * sqrt((2/3) / 2)
    struct coopt_eval_ppl a = {0};
    CHECK(t, coopt_eval_ppl_value(&a) == 0 && coopt_eval_ppl_error(&a) < 0);
    coopt_eval_ppl_add(&a, 1);
    CHECK(t, coopt_eval_ppl_error(&a) < 0); // undefined for one value
    coopt_eval_ppl_add(&a, 2);
    coopt_eval_ppl_add(&a, 3);
    CHECK(t, a.count == 3);
    CHECK(t, NEAR(coopt_eval_ppl_value(&a), 7.38905609893065, 1e-12));
    CHECK(t, NEAR(coopt_eval_ppl_error(&a), 4.266073527774857, 1e-12));
    // constant nll: zero variance is reported as undefined, like llama.cpp
    struct coopt_eval_ppl c = {0};
    for (int i = 0; i < 5; i++) coopt_eval_ppl_add(&c, 0.5);
    CHECK(t, coopt_eval_ppl_error(&c) < 0);
}

TEST(eval_stats) {
    const float v[4] = {1, 2, 3, 4};
    CHECK(t, coopt_eval_percentile(v, 4, 0.5) == 2.5);
    CHECK(t, NEAR(coopt_eval_percentile(v, 4, 0.9), 3.7, 1e-12));
    CHECK(t, coopt_eval_percentile(v, 4, 0) == 1 && coopt_eval_percentile(v, 4, 1) == 4);
    CHECK(t, coopt_eval_median(v, 4) == 2.5 && coopt_eval_median(v, 3) == 2);
    float s[5] = {3, -1, 2, 0, 2};
    coopt_eval_sort(s, 5);
    CHECK(t, s[0] == -1 && s[1] == 0 && s[2] == 2 && s[3] == 2 && s[4] == 3);
    // proportion 0.5 of 5 items: sqrt(0.25 / 4)
    CHECK(t, NEAR(coopt_eval_binomial_stderr(0.5, 5), 0.25, 1e-15));
    CHECK(t, coopt_eval_binomial_stderr(1.0, 100) == 0 && coopt_eval_binomial_stderr(0.5, 1) == 0);
    double m, u;
    coopt_eval_mean_unc(30, 100, 10, &m, &u); // llama.cpp gives no uncertainty for <= 10 values
    CHECK(t, m == 3 && u == 0);
    // 0,1 repeated 6 times: mean 0.5, var 0.25, unc sqrt(0.25 / 11)
    coopt_eval_mean_unc(6, 6, 12, &m, &u);
    CHECK(t, m == 0.5 && NEAR(u, sqrt(0.25 / 11), 1e-15));
    CHECK(t, NEAR(coopt_eval_cov(6, 6, 6, 12), 0.25 / 11, 1e-15));
}

TEST(eval_kld_exact_known) {
    // P = (1/4, 3/4), Q = (1/2, 1/2): KL = 1/4 ln(1/2) + 3/4 ln(3/2)
    const float p[2] = {0, logf(3)}, q[2] = {5, 5};
    CHECK(t, NEAR(coopt_eval_kld_exact(p, q, 2), 0.13081203594113697, 1e-7));
    CHECK(t, NEAR(coopt_eval_kld_exact(p, p, 2), 0, 1e-15));
    CHECK(t, NEAR(coopt_eval_kld_exact(q, q, 2), 0, 1e-15));
}

TEST(eval_lp_record_roundtrip) {
    enum { NV = 101 };
    uint64_t rng = 7;
    float    l[NV];
    test_fill_uniform(&rng, l, NV, -20, 8);
    l[42] = 9; // the unique top token
    CHECK(t, coopt_eval_lp_record_len(NV) == 106 && coopt_eval_lp_record_len(100) == 104);
    uint16_t rec[106];
    double   nll = coopt_eval_lp_encode(l, NV, 3, rec);
    CHECK(t, NEAR(nll, coopt_eval_nll(l, NV, 3), 1e-12));
    double lp[NV];
    coopt_eval_log_softmax(l, NV, lp);
    double step = 16.0 / 65535;
    for (int i = 0; i < NV; i++) {
        if (lp[i] < lp[42] - 16) continue; // below the record's range: stored as its floor
        double got = coopt_eval_lp_get(rec, i);
        CHECKF(t, NEAR(got, lp[i], step * 0.51 + 1e-6), "i=%d got %.9f want %.9f", i, got, lp[i]);
    }
    // identical logits: KLD ~ 0 (quantization only), same top token, same nll
    struct coopt_eval_kld_token r;
    coopt_eval_kld_token(l, rec, NV, 3, &r);
    CHECKF(t, fabs(r.kld) < 1e-4, "kld %g", r.kld);
    CHECK(t, r.same_top && NEAR(r.nll, r.nll_base, step) && fabs(r.p_diff) < 1e-4);
    // a target far below the top token (outside the 16-nat range) still decodes exactly
    l[5] = -40;
    nll  = coopt_eval_lp_encode(l, NV, 5, rec);
    CHECKF(t, NEAR(coopt_eval_lp_get(rec, 5), -nll, 1e-4), "got %.6f want %.6f", coopt_eval_lp_get(rec, 5), -nll);
    coopt_eval_kld_token(l, rec, NV, 5, &r);
    CHECK(t, NEAR(r.nll_base, r.nll, 1e-4) && fabs(r.kld) < 1e-3);
    // all logits equal: scale 0, every log-prob decodes to -log(n)
    float flat[4] = {2, 2, 2, 2};
    coopt_eval_lp_encode(flat, 4, 0, rec);
    CHECK(t, NEAR(coopt_eval_lp_get(rec, 3), -log(4.0), 1e-6));
}

TEST(eval_kld_token_known) {
    // base P = (1/4, 3/4) stored as a record, current Q = (1/2, 1/2)
    const float p[2] = {0, logf(3)}, q[2] = {0, 0};
    uint16_t    rec[6];
    coopt_eval_lp_encode(p, 2, 0, rec);
    struct coopt_eval_kld_token r;
    coopt_eval_kld_token(q, rec, 2, 0, &r);
    CHECKF(t, NEAR(r.kld, 0.13081203594113697, 1e-4), "kld %.8f", r.kld);
    CHECK(t, NEAR(r.nll, log(2.0), 1e-12) && NEAR(r.nll_base, log(4.0), 1e-4));
    CHECK(t, NEAR(r.p_diff, 0.25, 1e-4));
    CHECK(t, !r.same_top); // Q's argmax is token 0 (first of a tie), P's is token 1
    struct coopt_eval_kld a = {0};
    coopt_eval_kld_add(&a, &r);
    coopt_eval_kld_add(&a, &r);
    CHECK(t, a.count == 2 && a.n_same_top == 0 && NEAR(a.sum_kld, 2 * r.kld, 1e-15));
    CHECK(t, NEAR(a.max_p_diff, 0.25, 1e-4));
}

static const char *tmp_path(char *buf, size_t cap, const char *tag) {
    snprintf(buf, cap, "/tmp/coopt-test-eval-%d-%s.bin", (int)getpid(), tag);
    return buf;
}

TEST(eval_base_file) {
    char                   path[256];
    struct coopt_eval_base b;
    tmp_path(path, sizeof(path), "base");
    enum { NCTX = 8, NV = 5, NCH = 2 };
    int32_t toks[NCTX * NCH];
    for (int i = 0; i < NCTX * NCH; i++) toks[i] = i % NV;
    CHECK(t, coopt_eval_base_create(path, NCTX, NV, NCH, toks, &b) == COOPT_OK);
    CHECK(t, b.n_scored == 3 && b.rec_len == 10); // 8 - 1 - 4 scored; 5 -> 6 + 4 uint16
    uint16_t recs[3 * 10], back[3 * 10];
    for (int c = 0; c < NCH; c++) {
        for (int i = 0; i < 30; i++) recs[i] = (uint16_t)(c * 1000 + i);
        CHECK(t, coopt_eval_base_write_chunk(&b, recs) == COOPT_OK);
    }
    CHECK(t, coopt_eval_base_write_chunk(&b, recs) == COOPT_ERR_INVALID); // one chunk too many
    CHECK(t, coopt_eval_base_close(&b) == COOPT_OK);

    CHECK(t, coopt_eval_base_open(path, &b) == COOPT_OK);
    CHECK(t, b.n_ctx == NCTX && b.n_vocab == NV && b.n_chunk == NCH);
    CHECK(t, memcmp(b.tokens, toks, sizeof(toks)) == 0);
    for (int c = 0; c < NCH; c++) {
        CHECK(t, coopt_eval_base_read_chunk(&b, back) == COOPT_OK);
        CHECK(t, back[0] == c * 1000 && back[29] == c * 1000 + 29);
    }
    CHECK(t, coopt_eval_base_read_chunk(&b, back) == COOPT_ERR_INVALID);
    coopt_eval_base_close(&b);

    // truncated by one byte: refused at open, naming both sizes
    CHECK(t, truncate(path, 20 + 4 * NCTX * NCH + 2 * 2 * 30 - 1) == 0);
    CHECK(t, coopt_eval_base_open(path, &b) == COOPT_ERR_FORMAT);
    CHECK(t, b.f == NULL && b.tokens == NULL);
    // wrong magic
    FILE *f = fopen(path, "wb");
    CHECK(t, f != NULL);
    fwrite("_notlog_", 1, 8, f);
    fclose(f);
    CHECK(t, coopt_eval_base_open(path, &b) == COOPT_ERR_FORMAT);
    // header with a token outside the vocabulary
    toks[3] = NV;
    CHECK(t, coopt_eval_base_create(path, NCTX, NV, 1, toks, &b) == COOPT_OK);
    CHECK(t, coopt_eval_base_write_chunk(&b, recs) == COOPT_OK);
    coopt_eval_base_close(&b);
    CHECK(t, coopt_eval_base_open(path, &b) == COOPT_ERR_FORMAT);
    unlink(path);
    CHECK(t, coopt_eval_base_open(path, &b) == COOPT_ERR_IO);
    CHECK(t, coopt_eval_base_create(path, 2, NV, 1, toks, &b) == COOPT_ERR_FORMAT); // n_ctx too small
}

TEST(eval_lambada_split) {
    const char *s = "the cat sat on the mat";
    size_t      w, n = coopt_eval_lambada_split(s, strlen(s), &w);
    CHECK(t, n == 18 && !memcmp(s, "the cat sat on the", n));
    CHECK(t, w == 19 && !strcmp(s + w, "mat")); // target = " " + "mat"
    CHECK(t, coopt_eval_lambada_split("word", 4, &w) == 0 && w == 0);
    // the last word can contain newlines; the split is on ' ' only
    const char *nl = "said\n\nhe went home";
    n              = coopt_eval_lambada_split(nl, strlen(nl), &w);
    CHECK(t, n == 13 && !strcmp(nl + w, "home"));
    // trailing space of the context (double space): split gives "a b " / " c"; rstrip moves it
    const char *ds = "a b  c";
    n              = coopt_eval_lambada_split(ds, strlen(ds), &w);
    CHECK(t, n == 4 && coopt_eval_rstrip_len(ds, n) == 3);
    CHECK(t, coopt_eval_rstrip_len("a b\n", 4) == 3);
    CHECK(t, coopt_eval_rstrip_len("abc", 3) == 3 && coopt_eval_rstrip_len(" \t\r\n", 4) == 0);
    CHECK(t, coopt_eval_rstrip_len("x\xc2\xa0 ", 4) == 1);       // U+00A0 and a space
    CHECK(t, coopt_eval_rstrip_len("x\xe3\x80\x80", 4) == 1);    // U+3000
    CHECK(t, coopt_eval_rstrip_len("x\xe2\x80\x8a", 4) == 1);    // U+200A
    CHECK(t, coopt_eval_rstrip_len("x\xe2\x80\x8b", 4) == 4);    // U+200B is not whitespace
    CHECK(t, coopt_eval_rstrip_len("x\xc3\xa0", 3) == 3);        // U+00E0 ends in 0xa0 too
}
