/*
 * test_sampler.c -- greedy, top-k, top-p, min-p, temperature, repetition penalty, seeding, ties
 * and degenerate logits.
 *
 * Distribution tests draw N samples and compute Pearson's chi-square against the expected
 * probabilities; they pass when chi2 is below the p = 0.001 critical value for k-1 degrees of
 * freedom (a correct sampler fails such a check one time in a thousand seeds; the seeds are
 * fixed, so the tests are deterministic). Each such test also checks that a wrong expectation
 * (another temperature) is rejected, so the tolerance is known to have power.
 */
#include "coopt.h"
#include "pick.h"
#include "sampler.h"
#include "test.h"
#include "util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// chi-square critical values at p = 0.001, by degrees of freedom
static double chi2_crit(int df) {
    static const double crit[] = {0, 10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32, 26.12, 27.88, 29.59};
    return df >= 1 && df <= 10 ? crit[df] : 1e300;
}

static void softmax_t(const float *logits, int n, float temp, double *p) {
    double mx = -INFINITY, sum = 0;
    for (int i = 0; i < n; i++) mx = logits[i] > mx ? logits[i] : mx;
    for (int i = 0; i < n; i++) sum += p[i] = logits[i] == -INFINITY ? 0 : exp((logits[i] - mx) / temp);
    for (int i = 0; i < n; i++) p[i] /= sum;
}

// Chi-square of counts against probabilities (bins with p == 0 must be empty: else returns inf).
static double chi2(const int64_t *counts, const double *p, int n, int64_t total) {
    double x = 0;
    for (int i = 0; i < n; i++) {
        double e = p[i] * (double)total;
        if (e == 0) {
            if (counts[i]) return INFINITY;
            continue;
        }
        x += ((double)counts[i] - e) * ((double)counts[i] - e) / e;
    }
    return x;
}

static struct coopt_sampler_params plain_params(float temp, uint64_t seed) {
    struct coopt_sampler_params p = coopt_sampler_default_params();
    p.temp                        = temp;
    p.top_k                       = 0;
    p.top_p                       = 1.0f;
    p.min_p                       = 0.0f;
    p.seed                        = seed;
    return p;
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static void draw(struct coopt_sampler *s, const float *logits, int n, int64_t n_draws, int64_t *counts) {
    memset(counts, 0, (size_t)n * sizeof(int64_t));
    for (int64_t i = 0; i < n_draws; i++) {
        int32_t tok = coopt_sampler_sample(s, logits);
        if (tok >= 0 && tok < n) counts[tok]++;
    }
}

TEST(sampler_defaults) {
    struct coopt_sampler_params p = coopt_sampler_default_params();
    CHECK(t, p.temp == 0.8f && p.top_k == 40 && p.top_p == 0.95f && p.min_p == 0.05f);
    CHECK(t, p.repeat_penalty == 1.0f && p.repeat_last_n == 64 && p.seed == 0);
    // seed 0 is seeded from the clock: two samplers still produce valid tokens
    struct coopt_sampler *s = NULL;
    CHECK(t, coopt_sampler_init(&p, 50, &s) == COOPT_OK);
    float    logits[50];
    uint64_t r = 3;
    test_fill_uniform(&r, logits, 50, -1, 1);
    for (int i = 0; i < 100; i++) {
        int32_t tok = coopt_sampler_sample(s, logits);
        CHECK(t, tok >= 0 && tok < 50);
    }
    coopt_sampler_free(s);
}

TEST(sampler_greedy_argmax) {
    enum { N = 1000 };
    float                       logits[N];
    uint64_t                    r = 11;
    struct coopt_sampler_params p = coopt_sampler_default_params();
    p.temp                        = 0;
    struct coopt_sampler *s       = NULL;
    CHECK(t, coopt_sampler_init(&p, N, &s) == COOPT_OK);
    for (int it = 0; it < 50; it++) {
        test_fill_uniform(&r, logits, N, -10, 10);
        CHECK(t, coopt_sampler_sample(s, logits) == argmax(logits, N));
    }
    p.temp = -1; // negative is greedy too
    coopt_sampler_free(s);
    CHECK(t, coopt_sampler_init(&p, N, &s) == COOPT_OK);
    CHECK(t, coopt_sampler_sample(s, logits) == argmax(logits, N));
    coopt_sampler_free(s);
}

TEST(sampler_top_k1_is_greedy) {
    enum { N = 5000 };
    static float                logits[N];
    uint64_t                    r = 12;
    struct coopt_sampler_params p = plain_params(1.5f, 99);
    p.top_k                       = 1;
    struct coopt_sampler *s       = NULL;
    CHECK(t, coopt_sampler_init(&p, N, &s) == COOPT_OK);
    for (int it = 0; it < 100; it++) {
        test_fill_uniform(&r, logits, N, -3, 3);
        CHECK(t, coopt_sampler_sample(s, logits) == argmax(logits, N));
    }
    coopt_sampler_free(s);
}

TEST(sampler_top_p_tiny_is_greedy) {
    enum { N = 32000 }; // no top-k: exercises the partial sort over the whole vocabulary
    static float                logits[N];
    uint64_t                    r = 13;
    struct coopt_sampler_params p = plain_params(1.0f, 5);
    p.top_p                       = 1e-6f;
    struct coopt_sampler *s       = NULL;
    CHECK(t, coopt_sampler_init(&p, N, &s) == COOPT_OK);
    for (int it = 0; it < 30; it++) {
        test_fill_uniform(&r, logits, N, -2, 2);
        CHECK(t, coopt_sampler_sample(s, logits) == argmax(logits, N));
    }
    coopt_sampler_free(s);
}

TEST(sampler_top_p_mass) {
    // p = [0.5, 0.3, 0.2]: top_p 0.75 keeps {0, 1} (0.5 < 0.75 <= 0.8), in ratio 5:3
    float                       logits[3] = {logf(0.5f), logf(0.3f), logf(0.2f)};
    struct coopt_sampler_params p         = plain_params(1.0f, 21);
    p.top_p                               = 0.75f;
    struct coopt_sampler *s               = NULL;
    CHECK(t, coopt_sampler_init(&p, 3, &s) == COOPT_OK);
    int64_t counts[3];
    draw(s, logits, 3, 20000, counts);
    double want[3] = {0.625, 0.375, 0};
    double x       = chi2(counts, want, 3, 20000);
    CHECKF(t, x < chi2_crit(1), "chi2 %.2f (counts %lld %lld %lld)", x, (long long)counts[0], (long long)counts[1],
           (long long)counts[2]);
    double wrong[3] = {0.5, 0.3, 0.2}; // without top-p
    CHECK(t, chi2(counts, wrong, 3, 20000) > chi2_crit(2));
    coopt_sampler_free(s);
    // top-p comes before temperature: at temp 2 it still keeps {0, 1} (temperature first would
    // flatten p to [0.415, 0.322, 0.263] and keep all three); the survivors get softmax(l / 2)
    p.temp = 2.0f;
    CHECK(t, coopt_sampler_init(&p, 3, &s) == COOPT_OK);
    draw(s, logits, 3, 20000, counts);
    double hot[3] = {sqrt(0.5) / (sqrt(0.5) + sqrt(0.3)), sqrt(0.3) / (sqrt(0.5) + sqrt(0.3)), 0};
    x             = chi2(counts, hot, 3, 20000);
    CHECKF(t, x < chi2_crit(1), "temp 2: chi2 %.2f (counts %lld %lld %lld)", x, (long long)counts[0],
           (long long)counts[1], (long long)counts[2]);
    coopt_sampler_free(s);
}

TEST(sampler_top_p_large_vocab) {
    // 32k tokens: 40 with high logits carry almost all the mass; compare the kept set with a
    // full sort done here
    enum { N = 32000, HOT = 40 };
    static float  logits[N];
    static int    order[N];
    static double prob[N];
    uint64_t      r = 14;
    for (int i = 0; i < N; i++) logits[i] = test_rand_normal(&r);
    for (int i = 0; i < HOT; i++) logits[(i * 797) % N] = 12 + test_rand_normal(&r);
    softmax_t(logits, N, 1.0f, prob);
    for (int i = 0; i < N; i++) order[i] = i;
    // selection sort of the top 200 is enough: the kept set is within the hot tokens
    for (int i = 0; i < 200; i++) {
        int b = i;
        for (int j = i + 1; j < N; j++)
            if (logits[order[j]] > logits[order[b]]) b = j;
        int tmp = order[i]; order[i] = order[b]; order[b] = tmp;
    }
    const float top_p = 0.9f;
    double      cum = 0;
    int         keep = 0;
    while (cum < top_p) cum += prob[order[keep++]];
    CHECK(t, keep > 3 && keep < HOT);
    static bool in_set[N];
    for (int i = 0; i < keep; i++) in_set[order[i]] = true;

    struct coopt_sampler_params p = plain_params(1.0f, 77);
    p.top_p                       = top_p;
    struct coopt_sampler *s       = NULL;
    CHECK(t, coopt_sampler_init(&p, N, &s) == COOPT_OK);
    static int64_t counts[N];
    draw(s, logits, N, 3000, counts);
    for (int i = 0; i < N; i++) {
        CHECKF(t, in_set[i] || counts[i] == 0, "token %d (p %.3g) outside top-p drawn %lld times", i, prob[i],
               (long long)counts[i]);
        // every kept token with an expected count >= 20 shows up
        CHECK(t, !in_set[i] || prob[i] / cum * 3000 < 20 || counts[i] > 0);
    }
    coopt_sampler_free(s);
}

TEST(sampler_top_k_set) {
    // both top-k paths (heap for k <= n/16, quickselect above): at a huge temperature the draws
    // are uniform over exactly the k largest logits (20 expected draws each)
    enum { NMAX = 1000 };
    static float   logits[NMAX];
    static int64_t counts[NMAX];
    uint64_t       r = 16;
    for (int trial = 0; trial < 63; trial++) {
        int     n = trial < 3 ? 1000 : 200;
        int32_t k = trial == 0 ? 10 : trial == 1 ? 62 : trial == 2 ? 300 : 1 + (int32_t)(test_rand_u64(&r) % 199);
        test_fill_uniform(&r, logits, (size_t)n, -5, 5);
        float kth = 0; // the k-th largest logit, by counting
        for (int i = 0; i < n; i++) {
            int above = 0;
            for (int q = 0; q < n; q++) above += logits[q] > logits[i];
            if (above == k - 1) kth = logits[i];
        }
        struct coopt_sampler_params p = plain_params(1e6f, 500 + trial);
        p.top_k                       = k;
        struct coopt_sampler *s       = NULL;
        CHECK(t, coopt_sampler_init(&p, n, &s) == COOPT_OK);
        draw(s, logits, n, 20 * k, counts);
        for (int i = 0; i < n; i++) {
            bool in = logits[i] >= kth;
            CHECKF(t, in ? counts[i] > 0 : counts[i] == 0, "n %d k %d token %d logit %g (k-th %g) drawn %lld times", n,
                   k, i, logits[i], kth, (long long)counts[i]);
        }
        coopt_sampler_free(s);
    }
}

TEST(sampler_top_p_random) {
    // random logits; top_p halfway between two cumulative sums of the sorted softmax, so the
    // kept set is unambiguous; the draws must follow the renormalized softmax (chi2, df k-1)
    uint64_t r = 17;
    for (int trial = 0; trial < 6; trial++) {
        enum { N = 12 };
        float  logits[N];
        double prob[N], want[N];
        int    order[N];
        test_fill_uniform(&r, logits, N, -2, 2);
        softmax_t(logits, N, 1.0f, prob);
        for (int i = 0; i < N; i++) order[i] = i;
        for (int i = 0; i < N; i++)
            for (int j = i + 1; j < N; j++)
                if (logits[order[j]] > logits[order[i]]) {
                    int tmp = order[i]; order[i] = order[j]; order[j] = tmp;
                }
        int    keep = 2 + trial; // 2..7 tokens
        double cum_before = 0;
        for (int i = 0; i < keep - 1; i++) cum_before += prob[order[i]];
        float  top_p = (float)(cum_before + 0.5 * prob[order[keep - 1]]);
        double kept  = cum_before + prob[order[keep - 1]];
        memset(want, 0, sizeof(want));
        for (int i = 0; i < keep; i++) want[order[i]] = prob[order[i]] / kept;
        struct coopt_sampler_params p = plain_params(1.0f, 900 + trial);
        p.top_p                       = top_p;
        struct coopt_sampler *s       = NULL;
        CHECK(t, coopt_sampler_init(&p, N, &s) == COOPT_OK);
        int64_t counts[N];
        draw(s, logits, N, 20000, counts);
        double x = chi2(counts, want, N, 20000);
        CHECKF(t, x < chi2_crit(keep - 1), "trial %d keep %d: chi2 %.2f", trial, keep, x);
        coopt_sampler_free(s);
    }
}

TEST(sampler_top_p_cut) {
    // 300 random cases, vocab 17..200 (large enough to partition): top_p halfway inside the
    // keep-th token's mass; every draw must be among the keep largest, and each of those with
    // an expected count >= 15 must be drawn
    uint64_t r = 18;
    enum { NMAX = 200, DRAWS = 400 };
    static float   logits[NMAX];
    static double  prob[NMAX];
    static int     order[NMAX];
    static int64_t counts[NMAX];
    int            n_partitioned = 0;
    for (int trial = 0; trial < 300; trial++) {
        int n = 17 + (int)(test_rand_u64(&r) % (NMAX - 16));
        test_fill_uniform(&r, logits, (size_t)n, -4, 4);
        softmax_t(logits, n, 1.0f, prob);
        for (int i = 0; i < n; i++) order[i] = i;
        for (int i = 0; i < 12; i++) // the 12 largest, in order
            for (int j = i + 1; j < n; j++)
                if (logits[order[j]] > logits[order[i]]) {
                    int tmp = order[i]; order[i] = order[j]; order[j] = tmp;
                }
        int    keep = 1 + (int)(test_rand_u64(&r) % 10);
        double cum  = 0;
        for (int i = 0; i < keep - 1; i++) cum += prob[order[i]];
        struct coopt_sampler_params p = plain_params(1.0f, 3000 + trial);
        p.top_p                       = (float)(cum + 0.5 * prob[order[keep - 1]]);
        struct coopt_sampler *s       = NULL;
        CHECK(t, coopt_sampler_init(&p, n, &s) == COOPT_OK);
        draw(s, logits, n, DRAWS, counts);
        double kept = cum + prob[order[keep - 1]];
        for (int i = 0; i < n; i++) {
            bool in = false;
            for (int q = 0; q < keep; q++) in |= order[q] == i;
            CHECKF(t, in || counts[i] == 0, "trial %d n %d keep %d: token %d outside top-p drawn %lld times", trial, n,
                   keep, i, (long long)counts[i]);
            CHECKF(t, !in || prob[i] / kept * DRAWS < 15 || counts[i] > 0, "trial %d: kept token %d never drawn", trial,
                   i);
        }
        n_partitioned += n > 17;
        coopt_sampler_free(s);
    }
    CHECK(t, n_partitioned > 250);
}

TEST(sampler_min_p_filters) {
    // min_p 0.1: threshold logit = 3 + log(0.1) = 0.70, so tokens 0, 1, 2 stay and 3 (0.5) goes
    float                       logits[5] = {3, 2, 1, 0.5f, -7};
    struct coopt_sampler_params p         = plain_params(1.0f, 31);
    p.min_p                               = 0.1f;
    struct coopt_sampler *s               = NULL;
    CHECK(t, coopt_sampler_init(&p, 5, &s) == COOPT_OK);
    int64_t counts[5];
    draw(s, logits, 5, 20000, counts);
    CHECK(t, counts[3] == 0 && counts[4] == 0);
    double want[5];
    softmax_t(logits, 3, 1.0f, want);
    want[3] = want[4] = 0;
    double x = chi2(counts, want, 5, 20000);
    CHECKF(t, x < chi2_crit(2), "chi2 %.2f", x);
    coopt_sampler_free(s);
    // min_p above 1 keeps only the best token
    p.min_p = 2.0f;
    CHECK(t, coopt_sampler_init(&p, 5, &s) == COOPT_OK);
    for (int i = 0; i < 100; i++) CHECK(t, coopt_sampler_sample(s, logits) == 0);
    coopt_sampler_free(s);
}

TEST(sampler_temperature_distribution) {
    // 8 tokens, 20000 draws, chi2 < 24.32 (df 7, p = 0.001) against softmax(logits / temp)
    float    logits[8] = {1.0f, 0.2f, -0.5f, 2.0f, 0.0f, -1.5f, 1.2f, 0.7f};
    float    temps[3]  = {0.7f, 1.0f, 1.6f};
    int64_t  counts[8];
    double   want[8], wrong[8];
    for (int k = 0; k < 3; k++) {
        struct coopt_sampler_params p = plain_params(temps[k], 1000 + k);
        struct coopt_sampler       *s = NULL;
        CHECK(t, coopt_sampler_init(&p, 8, &s) == COOPT_OK);
        draw(s, logits, 8, 20000, counts);
        softmax_t(logits, 8, temps[k], want);
        double x = chi2(counts, want, 8, 20000);
        CHECKF(t, x < chi2_crit(7), "temp %g: chi2 %.2f >= %.2f", temps[k], x, chi2_crit(7));
        // power: the same counts reject a 25% different temperature
        softmax_t(logits, 8, temps[k] * 1.25f, wrong);
        CHECKF(t, chi2(counts, wrong, 8, 20000) > chi2_crit(7), "temp %g: a wrong temperature passes", temps[k]);
        coopt_sampler_free(s);
    }
    // top-k 3 at temp 0.9: the three largest, renormalized (df 2)
    struct coopt_sampler_params p = plain_params(0.9f, 2024);
    p.top_k                       = 3;
    struct coopt_sampler *s       = NULL;
    CHECK(t, coopt_sampler_init(&p, 8, &s) == COOPT_OK);
    draw(s, logits, 8, 20000, counts);
    float top3[8] = {-INFINITY, -INFINITY, -INFINITY, 2.0f, -INFINITY, -INFINITY, 1.2f, -INFINITY};
    top3[0]       = 1.0f;
    softmax_t(top3, 8, 0.9f, want);
    double x = chi2(counts, want, 8, 20000);
    CHECKF(t, x < chi2_crit(2), "top-k: chi2 %.2f", x);
    coopt_sampler_free(s);
}

TEST(sampler_seed_determinism) {
    enum { N = 100, L = 300 };
    float    logits[N];
    uint64_t r = 15;
    test_fill_uniform(&r, logits, N, -1, 1);
    int32_t                     a[L], b[L], c[L];
    struct coopt_sampler_params p = coopt_sampler_default_params();
    p.top_k                       = 0;
    p.min_p                       = 0;
    struct coopt_sampler *s1 = NULL, *s2 = NULL, *s3 = NULL;
    p.seed = 42;
    CHECK(t, coopt_sampler_init(&p, N, &s1) == COOPT_OK);
    CHECK(t, coopt_sampler_init(&p, N, &s2) == COOPT_OK);
    p.seed = 43;
    CHECK(t, coopt_sampler_init(&p, N, &s3) == COOPT_OK);
    for (int i = 0; i < L; i++) {
        a[i] = coopt_sampler_sample(s1, logits);
        b[i] = coopt_sampler_sample(s2, logits);
        c[i] = coopt_sampler_sample(s3, logits);
    }
    CHECK(t, memcmp(a, b, sizeof(a)) == 0);
    int same = 0;
    for (int i = 0; i < L; i++) same += a[i] == c[i];
    CHECKF(t, same < L / 4, "seeds 42 and 43 agree on %d of %d draws", same, L);
    // reset restarts the same random sequence
    coopt_sampler_reset(s1);
    for (int i = 0; i < L; i++) CHECK(t, coopt_sampler_sample(s1, logits) == a[i]);
    coopt_sampler_free(s1);
    coopt_sampler_free(s2);
    coopt_sampler_free(s3);
}

TEST(sampler_repeat_penalty) {
    struct coopt_sampler_params p = plain_params(0, 1);
    p.repeat_penalty              = 1.5f;
    p.repeat_last_n               = 2;
    struct coopt_sampler *s       = NULL;
    CHECK(t, coopt_sampler_init(&p, 8, &s) == COOPT_OK);
    // positive logit: divided (2.0 / 1.5 = 1.33 < 1.9)
    float pos[8] = {2.0f, 1.9f, 0, 0, 0, 0, 0, 0};
    CHECK(t, coopt_sampler_sample(s, pos) == 0);
    coopt_sampler_accept(s, 0);
    CHECK(t, coopt_sampler_sample(s, pos) == 1);
    CHECK(t, pos[0] == 2.0f); // logits are not modified
    // the window: after two other tokens, token 0 is no longer penalized
    coopt_sampler_accept(s, 5);
    coopt_sampler_accept(s, 6);
    CHECK(t, coopt_sampler_sample(s, pos) == 0);
    // negative logit: multiplied (-1 * 1.5 = -1.5 < -1.2)
    float neg[8] = {-1.0f, -1.2f, -9, -9, -9, -9, -9, -9};
    coopt_sampler_reset(s);
    CHECK(t, coopt_sampler_sample(s, neg) == 0);
    coopt_sampler_accept(s, 0);
    CHECK(t, coopt_sampler_sample(s, neg) == 1);
    // a token twice in the window is penalized once: 2.0 / 1.5 = 1.33 > 1.2 (twice would be 0.89)
    float twice[8] = {2.0f, 1.2f, 0, 0, 0, 0, 0, 0};
    coopt_sampler_reset(s);
    coopt_sampler_accept(s, 0);
    coopt_sampler_accept(s, 0);
    CHECK(t, coopt_sampler_sample(s, twice) == 0);
    coopt_sampler_accept(s, 99); // out of range: ignored
    coopt_sampler_accept(s, -1);
    CHECK(t, coopt_sampler_sample(s, twice) == 0);
    coopt_sampler_free(s);
    // penalty 1 is off
    p.repeat_penalty = 1.0f;
    CHECK(t, coopt_sampler_init(&p, 8, &s) == COOPT_OK);
    coopt_sampler_accept(s, 0);
    CHECK(t, coopt_sampler_sample(s, pos) == 0);
    coopt_sampler_free(s);
}

TEST(sampler_ties) {
    float                       flat[6] = {1, 1, 1, 1, 1, 1};
    float                       two[4]  = {1, 3, 3, 2};
    struct coopt_sampler_params p       = plain_params(0, 1);
    struct coopt_sampler       *s       = NULL;
    CHECK(t, coopt_sampler_init(&p, 6, &s) == COOPT_OK);
    CHECK(t, coopt_sampler_sample(s, flat) == 0);
    coopt_sampler_free(s);
    CHECK(t, coopt_sampler_init(&p, 4, &s) == COOPT_OK);
    CHECK(t, coopt_sampler_sample(s, two) == 1);
    coopt_sampler_free(s);
    // top-k 1 with temperature keeps the lower id of a tie too
    p       = plain_params(1.0f, 3);
    p.top_k = 1;
    CHECK(t, coopt_sampler_init(&p, 4, &s) == COOPT_OK);
    for (int i = 0; i < 20; i++) CHECK(t, coopt_sampler_sample(s, two) == 1);
    coopt_sampler_free(s);
    // equal logits with temperature: uniform (df 5)
    p = plain_params(0.8f, 4);
    CHECK(t, coopt_sampler_init(&p, 6, &s) == COOPT_OK);
    int64_t counts[6];
    double  want[6] = {1 / 6.0, 1 / 6.0, 1 / 6.0, 1 / 6.0, 1 / 6.0, 1 / 6.0};
    draw(s, flat, 6, 12000, counts);
    CHECK(t, chi2(counts, want, 6, 12000) < chi2_crit(5));
    coopt_sampler_free(s);
}

TEST(sampler_n_vocab_1) {
    float                       one = 0.3f;
    struct coopt_sampler_params p   = coopt_sampler_default_params();
    p.seed                          = 9;
    p.repeat_penalty                = 1.3f;
    struct coopt_sampler *s         = NULL;
    CHECK(t, coopt_sampler_init(&p, 1, &s) == COOPT_OK);
    for (int i = 0; i < 10; i++) {
        CHECK(t, coopt_sampler_sample(s, &one) == 0);
        coopt_sampler_accept(s, 0);
    }
    coopt_sampler_free(s);
    p.temp = 0;
    CHECK(t, coopt_sampler_init(&p, 1, &s) == COOPT_OK);
    CHECK(t, coopt_sampler_sample(s, &one) == 0);
    coopt_sampler_free(s);
}

TEST(sampler_inf_nan_logits) {
    enum { N = 64 };
    float logits[N];
    for (int i = 0; i < N; i++) logits[i] = -INFINITY;
    logits[10] = 0.5f;
    logits[20] = 0.1f;
    logits[30] = NAN;
    logits[40] = -3.0f;
    // every configuration: only finite tokens are drawn, in the right proportions
    struct coopt_sampler_params cfg[3] = {plain_params(1.0f, 5), coopt_sampler_default_params(),
                                          plain_params(1.0f, 6)};
    cfg[1].seed                        = 7;
    cfg[1].repeat_penalty              = 1.2f;
    cfg[2].top_p                       = 0.99f; // partial sort with -inf entries around
    for (int k = 0; k < 3; k++) {
        struct coopt_sampler *s = NULL;
        CHECK(t, coopt_sampler_init(&cfg[k], N, &s) == COOPT_OK);
        coopt_sampler_accept(s, 10);
        coopt_sampler_accept(s, 5); // a -inf token in the history stays -inf
        int64_t counts[N];
        draw(s, logits, N, 4000, counts);
        for (int i = 0; i < N; i++) CHECKF(t, counts[i] == 0 || i == 10 || i == 20 || i == 40, "cfg %d token %d", k, i);
        CHECK(t, counts[10] > 0 && counts[20] > 0);
        coopt_sampler_free(s);
    }
    // all -inf (and NaN): a valid token, no crash
    for (int i = 0; i < N; i++) logits[i] = i % 2 ? NAN : -INFINITY;
    struct coopt_sampler_params p = plain_params(1.0f, 8);
    struct coopt_sampler       *s = NULL;
    CHECK(t, coopt_sampler_init(&p, N, &s) == COOPT_OK);
    CHECK(t, coopt_sampler_sample(s, logits) == 0);
    // +inf takes all the mass
    logits[7] = INFINITY;
    logits[9] = 3.0f;
    for (int i = 0; i < 50; i++) CHECK(t, coopt_sampler_sample(s, logits) == 7);
    coopt_sampler_free(s);
    p.temp = 0;
    CHECK(t, coopt_sampler_init(&p, N, &s) == COOPT_OK);
    CHECK(t, coopt_sampler_sample(s, logits) == 7);
    coopt_sampler_free(s);
}

TEST(sampler_invalid_params) {
    struct coopt_sampler_params p = coopt_sampler_default_params();
    struct coopt_sampler       *s = (struct coopt_sampler *)1;
    CHECK(t, coopt_sampler_init(&p, 0, &s) == COOPT_ERR_INVALID && s == NULL);
    p.repeat_penalty = 0;
    CHECK(t, coopt_sampler_init(&p, 10, &s) == COOPT_ERR_INVALID && s == NULL);
    p                = coopt_sampler_default_params();
    p.temp           = NAN;
    CHECK(t, coopt_sampler_init(&p, 10, &s) == COOPT_ERR_INVALID && s == NULL);
    p               = coopt_sampler_default_params();
    p.repeat_last_n = -1;
    CHECK(t, coopt_sampler_init(&p, 10, &s) == COOPT_ERR_INVALID && s == NULL);
    coopt_sampler_free(NULL);
}

TEST(sampler_fast_scan_matches_plain) {
    // Without a repetition penalty the sampler skips logit blocks under a bound of the k-th
    // largest (top-k) or takes a vector maximum (greedy); with one it scans every logit. A penalty
    // whose only history token has logit 0 changes no value (0 * penalty), so both samplers see the
    // same row and, with one seed, must draw the same tokens. Rows: heavy-tailed random logits at
    // vocabulary sizes, with NaN, -inf, ties at the top, and all-equal or mostly -inf rows.
    static float  logits[128256];
    const int32_t ns[] = {256, 1000, 32000, 32001, 128256};
    uint64_t      r    = 99;
    for (size_t q = 0; q < sizeof(ns) / sizeof(ns[0]); q++) {
        const int32_t n = ns[q];
        for (int kind = 0; kind < 4; kind++) {
            for (int32_t i = 0; i < n; i++) {
                double u  = (double)(test_rand_u64(&r) >> 11) / 9007199254740992.0;
                logits[i] = kind == 2 ? 1.0f : (float)(-log(1.0 - u) * 3.0 - 5.0); // exponential tail
                if (kind == 3 && i % 97 != 5) logits[i] = -INFINITY;
            }
            if (kind == 1) { // ties at the top and scattered NaN / -inf
                for (int32_t i = 0; i < n; i += 37) logits[i] = NAN;
                for (int32_t i = 11; i < n; i += 53) logits[i] = -INFINITY;
                logits[n / 3] = logits[n / 2] = logits[n - 1] = 100.0f;
                logits[n / 5] = logits[n / 7] = 99.0f;
            }
            const int32_t z = 1 + n / 11; // the penalty's history token: logit 0, unchanged by it
            logits[z]        = 0.0f;
            const int32_t ks[] = {1, 2, 3, 40, n / 16};
            for (size_t kk = 0; kk < sizeof(ks) / sizeof(ks[0]); kk++) {
                for (int greedy = 0; greedy < 2; greedy++) {
                    struct coopt_sampler_params p = coopt_sampler_default_params();
                    p.top_k = ks[kk], p.seed = 1000 + kk, p.temp = greedy ? 0.0f : 1.5f, p.top_p = 0.99f, p.min_p = 0.001f;
                    struct coopt_sampler *a = NULL, *b = NULL;
                    CHECK(t, coopt_sampler_init(&p, n, &a) == COOPT_OK);
                    p.repeat_penalty = 2.0f;
                    CHECK(t, coopt_sampler_init(&p, n, &b) == COOPT_OK);
                    coopt_sampler_accept(b, z);
                    for (int d = 0; d < 50; d++) {
                        int32_t ta = coopt_sampler_sample(a, logits), tb = coopt_sampler_sample(b, logits);
                        CHECKF(t, ta == tb, "n %d kind %d top_k %d greedy %d draw %d: fast scan %d, plain scan %d", n,
                               kind, ks[kk], greedy, d, ta, tb);
                    }
                    coopt_sampler_free(a);
                    coopt_sampler_free(b);
                }
            }
        }
    }
}

// ---- timing (not a check): COOPT_SAMPLER_BENCH=1 ./build/coopt-test sampler_bench ----

// 1000 calls of coopt_sampler_sample on one row of uniform logits in [-5, 5) at two vocabulary
// sizes, with the default parameters and greedy; us per call on stderr (docs/BENCHMARKS.md).
TEST(sampler_bench) {
    if (!getenv("COOPT_SAMPLER_BENCH")) SKIP(t, "set COOPT_SAMPLER_BENCH=1 to time the sampler");
    static float  logits[128256];
    const int32_t ns[] = {32000, 128256};
    uint64_t      r    = 3;
    for (size_t q = 0; q < sizeof(ns) / sizeof(ns[0]); q++) {
        test_fill_uniform(&r, logits, (size_t)ns[q], -5, 5);
        for (int greedy = 0; greedy < 2; greedy++) {
            struct coopt_sampler_params p = coopt_sampler_default_params();
            p.seed = 1, p.temp = greedy ? 0.0f : p.temp;
            struct coopt_sampler *s = NULL;
            CHECK(t, coopt_sampler_init(&p, ns[q], &s) == COOPT_OK);
            int64_t t0 = coopt_time_us(), acc = 0;
            for (int i = 0; i < 1000; i++) acc += coopt_sampler_sample(s, logits);
            fprintf(stderr, "bench: sampler n_vocab %d %s: %.1f us per call (%lld)\n", ns[q], greedy ? "greedy" : "defaults",
                    (double)(coopt_time_us() - t0) / 1000.0, (long long)(acc & 1));
            coopt_sampler_free(s);
        }
    }
}

// ---- the sampler's tail shared with the device (pick.h) ----

// pick_expf against exp in double over its range [-86, 0] (the sampler's arguments are never
// positive) and a little beyond: within 2 ulp of the float nearest exp(x), exactly 1 at 0,
// exactly 0 below -86, and monotonic on a fine grid.
TEST(pick_expf_accuracy) {
    double worst = 0;
    float  prev  = 0;
    for (int64_t i = -8600000; i <= 500000; i++) {
        const float  x = (float)i * 1e-5f, y = pick_expf(x);
        const double e = exp((double)x), ulp = ldexp(1.0, ilogb(e) - 23);
        if (x > -86.0f) worst = fmax(worst, fabs((double)y - e) / ulp);
        else CHECKF(t, y == 0.0f, "pick_expf(%.7g) = %g, want 0", x, y);
        CHECKF(t, y >= prev, "pick_expf not monotonic at %.7g", x);
        prev = y;
    }
    CHECKF(t, worst <= 2.0, "pick_expf: %.2f ulp", worst);
    CHECK(t, pick_expf(0.0f) == 1.0f && pick_expf(-0.0f) == 1.0f && pick_expf(-86.5f) == 0.0f &&
                 pick_expf(-INFINITY) == 0.0f && pick_expf(NAN) == 0.0f && pick_expf(100.0f) == INFINITY);
}

// coopt_pick_row (what the CPU backend's sample op runs, and the device must match) draws what
// coopt_sampler_sample draws from the same state, with the random state advanced alike -- a
// greedy sampler's state (top_k 1) gives its argmax, ties at the maximum to the lower id; and
// coopt_sampler_pick_state refuses the samplers it cannot serve.
TEST(sampler_pick_row) {
    uint64_t      s    = 5;
    const int32_t ns[] = {100, 512, 4097, 32000};
    for (size_t a = 0; a < COOPT_ARRAY_LEN(ns); a++) {
        const int32_t n = ns[a];
        float        *x = test_rand_array(&s, (size_t)n, -8, 8);
        for (int32_t i = 0; i < n; i += 11) x[i] = i % 2 ? NAN : -INFINITY;
        x[n / 2] = x[n / 2 + 1]; // a tie
        x[n - 5] = x[n - 2] = 9.0f; // the largest, twice
        for (int q = 0; q < 5; q++) {
            struct coopt_sampler_params sp = coopt_sampler_default_params();
            sp.seed = 77 + (uint64_t)q, sp.temp = q == 1 ? 0.2f : q == 4 ? 0.0f : 3.0f, sp.top_k = q == 2 ? 64 : q == 3 ? 1 : 40;
            sp.top_p = q == 3 ? 1.0f : 0.9f, sp.min_p = q == 0 ? 0.05f : 0.0f;
            struct coopt_sampler *smp = NULL;
            struct pick_state     ps;
            if (coopt_sampler_init(&sp, n, &smp) != COOPT_OK || !coopt_sampler_pick_state(smp, &ps)) {
                coopt_sampler_free(smp), free(x);
                CHECKF(t, false, "n %d params %d: not chainable", n, q);
            }
            for (int d = 0; d < 20; d++) {
                const int32_t want = coopt_sampler_sample(smp, x), got = coopt_pick_row(x, n, &ps);
                uint64_t      rng[4];
                coopt_sampler_get_rng(smp, rng);
                if (got != want || memcmp(rng, ps.rng, sizeof(rng))) {
                    coopt_sampler_free(smp), free(x);
                    CHECKF(t, false, "n %d params %d draw %d: pick_row %d, sampler %d (or the random state differs)", n,
                           q, d, got, want);
                }
            }
            coopt_sampler_free(smp);
        }
        free(x);
    }
    // greedy (as top_k 1), and the refusals: a penalty, top_k 0 / 65, a vocabulary too large for
    // top_k 64 (65 segments)
    struct {
        float   temp, pen;
        int32_t k, n;
        bool    ok;
    } const cases[] = {{0.8f, 1.0f, 40, 32000, true},     {0.0f, 1.0f, 40, 32000, true}, {0.8f, 1.1f, 40, 32000, false},
                       {0.8f, 1.0f, 0, 32000, false},     {0.8f, 1.0f, 65, 32000, false}, {0.8f, 1.0f, 64, 262144, true},
                       {0.8f, 1.0f, 64, 262145, false},   {0.8f, 1.0f, 40, 262145, true}};
    for (size_t i = 0; i < COOPT_ARRAY_LEN(cases); i++) {
        struct coopt_sampler_params sp = coopt_sampler_default_params();
        sp.temp = cases[i].temp, sp.repeat_penalty = cases[i].pen, sp.top_k = cases[i].k;
        struct coopt_sampler *smp = NULL;
        struct pick_state     ps;
        CHECK(t, coopt_sampler_init(&sp, cases[i].n, &smp) == COOPT_OK);
        const bool got = coopt_sampler_pick_state(smp, &ps), chain = coopt_sampler_chainable(smp);
        coopt_sampler_free(smp);
        CHECKF(t, got == cases[i].ok && chain == (cases[i].ok || cases[i].temp == 0.0f),
               "case %zu: pick_state %d (want %d), chainable %d", i, got, cases[i].ok, chain);
    }
}
