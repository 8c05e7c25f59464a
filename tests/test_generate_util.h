/*
 * test_generate_util.h -- the check of coopt_ctx_generate shared by the CPU test (test_context.c)
 * and the CUDA test (test_cuda_decode.c): greedy generation with the choice made by the backend
 * against the host loop on the same model and backend (decode, read the logits, the sampler's
 * greedy choice, decode that token). Include after test.h.
 *
 * Everything is compared exactly: both contexts run the same single-token steps with the same
 * kernels (the argmax or the draw reads the logits, it does not change them), so tokens and
 * logits must be bit-identical. With `sampled`, the generation draws with a sampler (the
 * defaults at temperature 1.5, so the draws are not the argmax, seed fixed) and the host loop
 * draws with coopt_sampler_sample from a sampler of the same seed: the same tokens, and the
 * generation's sampler ends with the random state the host loop's had after the last token
 * reported.
 */
#ifndef COOPT_TEST_GENERATE_UTIL_H
#define COOPT_TEST_GENERATE_UTIL_H

#include "coopt.h"
#include "sampler.h"
#include "test.h"

#include <stdlib.h>
#include <string.h>

#define GEN_P 10 // prompt tokens
#define GEN_N 24 // tokens fed by the full generation

// on_token: records the tokens; returns false once `stop_after` of them were taken (-1: never)
struct gen_rec {
    int32_t toks[GEN_N + 1];
    int     n, stop_after, calls;
    int32_t rejected;
};

static inline bool gen_rec_fn(void *ud, int32_t tok) {
    struct gen_rec *r = (struct gen_rec *)ud;
    r->calls++;
    if (r->stop_after >= 0 && r->n == r->stop_after) {
        r->rejected = tok;
        return false;
    }
    if (r->n <= GEN_N) r->toks[r->n++] = tok;
    return true;
}

// Decodes n tokens of seq one call; returns the status.
static inline enum coopt_status gen_feed(struct coopt_ctx *c, int32_t seq, const int32_t *toks, int32_t n) {
    int32_t seqs[GEN_P];
    for (int32_t i = 0; i < n && i < GEN_P; i++) seqs[i] = seq;
    struct coopt_batch_input b = {.n_tokens = n, .tokens = toks, .seq_ids = seqs};
    return n <= GEN_P ? coopt_ctx_decode(c, &b) : COOPT_ERR_INVALID;
}

// The logits after a fresh sequence of r was fed prompt, then toks[0..n) one decode each. Copied
// to out[nv]; the sequence is freed. Returns false on a decode failure.
static inline bool gen_ref_logits(struct coopt_ctx *r, const int32_t *prompt, const int32_t *toks, int n, int32_t nv,
                                  float *out) {
    int32_t s = -1;
    if (coopt_seq_new(r, &s) != COOPT_OK) return false;
    bool ok = gen_feed(r, s, prompt, GEN_P) == COOPT_OK;
    for (int i = 0; i < n && ok; i++) ok = gen_feed(r, s, toks + i, 1) == COOPT_OK;
    const float *l = ok ? coopt_ctx_logits(r, n > 0 ? 0 : GEN_P - 1) : NULL;
    if (l) memcpy(out, l, (size_t)nv * sizeof(float));
    coopt_seq_free(r, s);
    return l != NULL;
}

// The random state after the generation's last report equals want (sampled), or is untouched.
static inline bool gen_rng_is(struct test_ctx *t, struct coopt_sampler *smp, const uint64_t want[4], const char *what,
                              const char *kn) {
    uint64_t got[4];
    coopt_sampler_get_rng(smp, got);
    if (memcmp(got, want, sizeof(got)) == 0) return true;
    test_fail(t, __FILE__, __LINE__, "%s KV, %s: the sampler's random state after the generation is not the host loop's", kn,
              what);
    return false;
}

// The whole check on model m with the given KV type and page size, greedy or sampled. Returns
// false after a FAIL.
static inline bool check_generate(struct test_ctx *t, struct coopt_model *m, enum coopt_dtype kvt, int32_t page_size,
                                  bool sampled) {
    const int32_t           nv = coopt_model_get_info(m)->n_vocab;
    struct coopt_ctx_params cp = coopt_ctx_default_params();
    cp.n_ctx = GEN_P + GEN_N + 8, cp.n_seq_max = 2, cp.n_batch = 32, cp.page_size = page_size, cp.kv_type = kvt;
    struct coopt_ctx     *r = NULL, *g = NULL;
    struct coopt_sampler *smp = NULL, *gsmp = NULL; // the host loop's, the generation's
    struct coopt_sampler_params sp = coopt_sampler_default_params();
    sp.repeat_penalty = 1, sp.seed = 4242;
    sp.temp           = sampled ? 1.5f : 0.0f;
    float *lr = (float *)malloc((size_t)nv * sizeof(float));
    bool   ok = lr && coopt_ctx_init(m, &cp, &r) == COOPT_OK && coopt_ctx_init(m, &cp, &g) == COOPT_OK &&
              coopt_sampler_init(&sp, nv, &smp) == COOPT_OK && coopt_sampler_init(&sp, nv, &gsmp) == COOPT_OK;
    const char *kn = sampled ? (kvt == COOPT_DTYPE_F32 ? "f32 (sampled)" : kvt == COOPT_DTYPE_F16 ? "f16 (sampled)" : "fp8 (sampled)")
                             : coopt_dtype_name(kvt);
    int32_t     prompt[GEN_P], ref[GEN_N + 1], s = -1, fed = -1;
    uint64_t    rng_after[GEN_N + 1][4]; // the host loop's random state after drawing ref[i]
    int         n_distinct = 0;          // (sampled) draws that are not the argmax: the test sees real draws
    if (ok && !coopt_sampler_chainable(gsmp)) {
        test_fail(t, __FILE__, __LINE__, "%s KV: the sampler is not chainable", kn);
        ok = false;
    }
    uint64_t    rng = 77;
    for (int i = 0; i < GEN_P; i++) prompt[i] = (int32_t)(test_rand_u64(&rng) % (uint64_t)nv);
    if (!ok) test_fail(t, __FILE__, __LINE__, "%s KV: context or sampler init failed", kn);

    // the host loop: ref[0] from the prompt's logits, ref[i] the choice after feeding ref[0..i)
    if (ok) ok = coopt_seq_new(r, &s) == COOPT_OK && gen_feed(r, s, prompt, GEN_P) == COOPT_OK;
    for (int i = 0; i <= GEN_N && ok; i++) {
        ok     = (i == 0 || gen_feed(r, s, ref + i - 1, 1) == COOPT_OK) && coopt_ctx_logits(r, i ? 0 : GEN_P - 1);
        const float *l = ok ? coopt_ctx_logits(r, i ? 0 : GEN_P - 1) : NULL;
        ref[i]         = ok ? coopt_sampler_sample(smp, l) : -1;
        coopt_sampler_get_rng(smp, rng_after[i]);
        if (ok) {
            int32_t am = 0;
            for (int32_t j = 1; j < nv; j++) am = l[j] > l[am] ? j : am;
            n_distinct += ref[i] != am;
        }
    }
    if (ok && sampled && n_distinct < 3) {
        test_fail(t, __FILE__, __LINE__, "%s KV: only %d of %d draws differ from the argmax", kn, n_distinct, GEN_N + 1);
        ok = false;
    }
    uint64_t rng0[4]; // the generation's sampler has drawn ref[0] (as coopt run does before generating)
    memcpy(rng0, rng_after[0], sizeof(rng0));
    if (s >= 0) coopt_seq_free(r, s), s = -1;
    if (!ok) test_fail(t, __FILE__, __LINE__, "%s KV: reference decode failed", kn);

    // 1: the full generation reports ref[1..N) in order, feeds N tokens, and a decode after it
    // continues the sequence exactly as the host loop's
    struct gen_rec rec = {.stop_after = -1};
    if (ok) ok = coopt_seq_new(g, &s) == COOPT_OK && gen_feed(g, s, prompt, GEN_P) == COOPT_OK;
    coopt_sampler_set_rng(gsmp, rng0);
    enum coopt_status st = ok ? coopt_ctx_generate(g, s, ref[0], GEN_N, sampled ? gsmp : NULL, gen_rec_fn, &rec, &fed)
                              : COOPT_ERR_INVALID;
    if (ok && (st != COOPT_OK || fed != GEN_N || rec.n != GEN_N - 1 || coopt_seq_len(g, s) != GEN_P + GEN_N ||
               coopt_ctx_logits(g, 0) != NULL)) {
        test_fail(t, __FILE__, __LINE__, "%s KV: generate: %s, %d fed, %d reported, length %d (want ok, %d, %d, %d, no logits)",
                  kn, coopt_status_str(st), fed, rec.n, coopt_seq_len(g, s), GEN_N, GEN_N - 1, GEN_P + GEN_N);
        ok = false;
    }
    for (int i = 0; i < GEN_N - 1 && ok; i++)
        if (rec.toks[i] != ref[i + 1]) {
            test_fail(t, __FILE__, __LINE__, "%s KV: generated token %d is %d, the host loop's %d", kn, i + 1, rec.toks[i],
                      ref[i + 1]);
            ok = false;
        }
    if (ok) ok = gen_rng_is(t, gsmp, sampled ? rng_after[GEN_N - 1] : rng0, "full", kn);
    if (ok) ok = gen_feed(g, s, ref + GEN_N, 1) == COOPT_OK && coopt_ctx_logits(g, 0) &&
                 gen_ref_logits(r, prompt, ref, GEN_N + 1, nv, lr);
    if (ok && memcmp(coopt_ctx_logits(g, 0), lr, (size_t)nv * sizeof(float)) != 0) {
        test_fail(t, __FILE__, __LINE__, "%s KV: logits after the generation differ from the host loop's", kn);
        ok = false;
    }
    if (s >= 0) coopt_seq_free(g, s), s = -1;

    // 2: on_token stops after k tokens: k + 1 fed, the step that ran ahead with the rejected token
    // is taken back (k = 1 and 5 take back the first position of a page when page_size is 4), and
    // a different token decoded next lands where the host loop puts it
    const int ks[] = {0, 1, 2, 5};
    for (size_t q = 0; q < sizeof(ks) / sizeof(ks[0]) && ok; q++) {
        int k = ks[q];
        rec   = (struct gen_rec){.stop_after = k, .rejected = -1};
        ok    = coopt_seq_new(g, &s) == COOPT_OK && gen_feed(g, s, prompt, GEN_P) == COOPT_OK;
        coopt_sampler_set_rng(gsmp, rng0);
        st = ok ? coopt_ctx_generate(g, s, ref[0], GEN_N, sampled ? gsmp : NULL, gen_rec_fn, &rec, &fed) : COOPT_ERR_INVALID;
        if (!ok || st != COOPT_OK || fed != k + 1 || rec.n != k || rec.rejected != ref[k + 1] ||
            coopt_seq_len(g, s) != GEN_P + k + 1) {
            test_fail(t, __FILE__, __LINE__, "%s KV, stop after %d: %s, %d fed, rejected %d (want %d), length %d", kn, k,
                      coopt_status_str(st), fed, rec.rejected, ref[k + 1], coopt_seq_len(g, s));
            ok = false;
            break;
        }
        if (!gen_rng_is(t, gsmp, sampled ? rng_after[k + 1] : rng0, "stopped", kn)) {
            ok = false;
            break;
        }
        int32_t path[GEN_N + 1];
        memcpy(path, ref, (size_t)(k + 1) * sizeof(int32_t));
        path[k + 1] = (ref[k + 1] + 1) % nv;
        ok          = gen_feed(g, s, path + k + 1, 1) == COOPT_OK && coopt_ctx_logits(g, 0) &&
             gen_ref_logits(r, prompt, path, k + 2, nv, lr);
        if (ok && memcmp(coopt_ctx_logits(g, 0), lr, (size_t)nv * sizeof(float)) != 0) {
            test_fail(t, __FILE__, __LINE__, "%s KV, stop after %d: the next decode differs from the host loop's", kn, k);
            ok = false;
        }
        coopt_seq_free(g, s), s = -1;
    }

    // 3: arguments, limits and a full context
    if (ok) ok = coopt_seq_new(g, &s) == COOPT_OK && gen_feed(g, s, prompt, GEN_P) == COOPT_OK;
    if (ok) {
        rec         = (struct gen_rec){.stop_after = -1};
        struct coopt_sampler *q = sampled ? gsmp : NULL;
        bool args = coopt_ctx_generate(g, 1, ref[0], 4, q, NULL, NULL, &fed) == COOPT_ERR_INVALID && fed == 0 && // seq 1 is not live
                    coopt_ctx_generate(g, 9, ref[0], 4, q, NULL, NULL, NULL) == COOPT_ERR_INVALID &&
                    coopt_ctx_generate(g, s, nv, 4, q, NULL, NULL, &fed) == COOPT_ERR_INVALID && fed == 0 &&
                    coopt_ctx_generate(g, s, ref[0], -1, q, NULL, NULL, &fed) == COOPT_ERR_INVALID &&
                    coopt_seq_len(g, s) == GEN_P && coopt_ctx_generate(g, s, ref[0], 0, q, gen_rec_fn, &rec, &fed) == COOPT_OK &&
                    fed == 0 && coopt_seq_len(g, s) == GEN_P &&
                    coopt_ctx_generate(g, s, ref[0], 1, q, gen_rec_fn, &rec, &fed) == COOPT_OK && fed == 1 && rec.calls == 0 &&
                    coopt_seq_len(g, s) == GEN_P + 1;
        if (!args) test_fail(t, __FILE__, __LINE__, "%s KV: bad arguments or limits 0 / 1 handled wrongly", kn);
        ok = args;
    }
    if (ok) { // GEN_P + 1 held, n_ctx - that left: CTX_FULL once the next step does not fit
        int left = cp.n_ctx - GEN_P - 1;
        rec      = (struct gen_rec){.stop_after = -1};
        st       = coopt_ctx_generate(g, s, ref[1], 1000, sampled ? gsmp : NULL, gen_rec_fn, &rec, &fed);
        if (st != COOPT_ERR_CTX_FULL || fed != left || rec.calls != left - 1 || coopt_seq_len(g, s) != cp.n_ctx) {
            test_fail(t, __FILE__, __LINE__, "%s KV: full context: %s, %d fed (want %d), %d reported, length %d", kn,
                      coopt_status_str(st), fed, left, rec.calls, coopt_seq_len(g, s));
            ok = false;
        }
    }
    if (ok && sampled) { // a sampler whose choice needs the host: refused before anything runs
        struct coopt_sampler_params bp = sp;
        struct coopt_sampler       *bad = NULL;
        bp.repeat_penalty = 1.1f;
        int32_t len = coopt_seq_len(g, s);
        ok = coopt_sampler_init(&bp, nv, &bad) == COOPT_OK && !coopt_sampler_chainable(bad) &&
             coopt_ctx_generate(g, s, ref[0], 4, bad, NULL, NULL, &fed) == COOPT_ERR_INVALID && fed == 0 &&
             coopt_seq_len(g, s) == len;
        coopt_sampler_free(bad);
        if (!ok) test_fail(t, __FILE__, __LINE__, "%s KV: a sampler with a repetition penalty was not refused", kn);
    }
    coopt_sampler_free(smp);
    coopt_sampler_free(gsmp);
    coopt_ctx_free(r);
    coopt_ctx_free(g);
    free(lr);
    return ok;
}

// ---- a batch drawn by its samplers (context_batch_samplers, cuda_batch_samplers) ----

#define BS_SEQ 4

static inline struct coopt_sampler *bs_sampler(int k, int32_t nv) {
    struct coopt_sampler_params sp = coopt_sampler_default_params();
    sp.seed                        = 100 + (uint64_t)k;
    if (k == 1) sp.temp = 0.0f;
    if (k == 2) sp.top_k = 7, sp.temp = 1.3f;
    if (k == 3) sp.repeat_penalty = 1.3f;
    struct coopt_sampler *s = NULL;
    return coopt_sampler_init(&sp, nv, &s) == COOPT_OK ? s : NULL;
}

// The check of context_batch_samplers (test_context.c) on model m, context n_batch nb.
static inline bool check_batch_samplers(struct test_ctx *t, struct coopt_model *m, enum coopt_dtype kvt, int32_t nb) {
    struct coopt_ctx_params cp = coopt_ctx_default_params();
    cp.n_ctx = 64, cp.n_seq_max = BS_SEQ, cp.n_batch = nb, cp.kv_type = kvt, cp.page_size = 16;
    struct coopt_ctx     *c = NULL, *r = NULL;
    int32_t               nv = coopt_model_get_info(m)->n_vocab, seq[BS_SEQ], toks[6 * BS_SEQ], sids[6 * BS_SEQ];
    struct coopt_sampler *sc[6 * BS_SEQ] = {0}, *sr[BS_SEQ] = {0}, *own[BS_SEQ] = {0};
    bool ok = coopt_ctx_init(m, &cp, &c) == COOPT_OK && coopt_ctx_init(m, &cp, &r) == COOPT_OK;
    for (int k = 0; k < BS_SEQ && ok; k++) {
        int32_t a = -1, b = -1;
        own[k] = bs_sampler(k, nv), sr[k] = bs_sampler(k, nv);
        ok     = own[k] && sr[k] && coopt_seq_new(c, &a) == COOPT_OK && coopt_seq_new(r, &b) == COOPT_OK && a == b;
        seq[k] = a;
    }
    if (!ok) test_fail(t, __FILE__, __LINE__, "%s KV: context / sampler setup failed", coopt_dtype_name(kvt));
    int32_t n = 6 * BS_SEQ; // the prompt: 6 tokens a sequence, interleaved; samplers on each sequence's last
    for (int i = 0; i < n; i++) toks[i] = 3 + (i * 37) % (nv - 3), sids[i] = seq[i % BS_SEQ];
    for (int i = 0; i < n; i++) sc[i] = i >= n - BS_SEQ ? own[i % BS_SEQ] : NULL;
    if (ok) { // one sampler drawing for two tokens: refused, nothing decoded
        struct coopt_sampler    *dup[6 * BS_SEQ] = {0};
        uint8_t                  want[6 * BS_SEQ] = {0};
        want[0] = want[1] = 1, dup[0] = dup[1] = own[0];
        struct coopt_batch_input in = {.n_tokens = n, .tokens = toks, .seq_ids = sids, .want_logits = want, .samplers = dup};
        if (coopt_ctx_decode(c, &in) != COOPT_ERR_INVALID || coopt_seq_len(c, seq[0]) != 0 ||
            coopt_ctx_token(c, 0) != -1 || coopt_ctx_token(c, 1) != -1) {
            test_fail(t, __FILE__, __LINE__, "a sampler drawing twice in one batch was not refused");
            ok = false;
        }
    }
    for (int round = 0; round < 7 && ok; round++) {
        struct coopt_batch_input in = {.n_tokens = n, .tokens = toks, .seq_ids = sids, .samplers = sc};
        struct coopt_batch_input ir = {.n_tokens = n, .tokens = toks, .seq_ids = sids};
        ok = coopt_ctx_decode(c, &in) == COOPT_OK && coopt_ctx_decode(r, &ir) == COOPT_OK;
        if (!ok) {
            test_fail(t, __FILE__, __LINE__, "%s KV, round %d: decode failed", coopt_dtype_name(kvt), round);
            break;
        }
        int32_t next[BS_SEQ];
        for (int i = n - BS_SEQ; i < n && ok; i++) {
            const int k = i % BS_SEQ;
            const int32_t want = coopt_sampler_sample(sr[k], coopt_ctx_logits(r, i));
            const bool    host = k == 3; // the penalty: drawn on the host from the logits
            const float  *l    = coopt_ctx_logits(c, i);
            const int32_t got = coopt_ctx_token(c, i), again = coopt_ctx_token(c, i);
            uint64_t      ga[4], gb[4];
            coopt_sampler_get_rng(own[k], ga), coopt_sampler_get_rng(sr[k], gb);
            if (got != want || again != got || memcmp(ga, gb, sizeof(ga)) != 0 || (l != NULL) != host) {
                test_fail(t, __FILE__, __LINE__,
                          "%s KV, round %d, sampler %d: token %d (again %d), host %d; random state %s; logits %s",
                          coopt_dtype_name(kvt), round, k, got, again, want, memcmp(ga, gb, sizeof(ga)) ? "differs" : "same",
                          l ? "present" : "absent");
                ok = false;
            }
            coopt_sampler_accept(own[k], got), coopt_sampler_accept(sr[k], want);
            next[k] = got;
        }
        if (ok && n > BS_SEQ && coopt_ctx_token(c, 0) != -1) {
            test_fail(t, __FILE__, __LINE__, "a token without a sampler has a drawn token");
            ok = false;
        }
        n = BS_SEQ; // the next round: one token a sequence
        for (int k = 0; k < BS_SEQ; k++) toks[k] = next[k], sids[k] = seq[k], sc[k] = own[k];
    }
    for (int k = 0; k < BS_SEQ; k++) coopt_sampler_free(own[k]), coopt_sampler_free(sr[k]);
    coopt_ctx_free(c);
    coopt_ctx_free(r);
    return ok;
}

#endif // COOPT_TEST_GENERATE_UTIL_H
