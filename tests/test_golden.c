/*
 * test_golden.c -- end-to-end logits of the real test models against an independent float64
 * numpy reference (scripts/ref_llama.py), through the public API only (include/coopt.h).
 * Models come from $COOPT_MODELS (test_model_path); a test SKIPs only if its model is missing.
 *
 * Golden files, written by `python3 scripts/make_golden.py` (see its header), one pair per case:
 *   tests/golden/<name>.json        {"model": "<path relative to $COOPT_MODELS>",
 *                                    "alt_models": [...] (optional, same weights, other format),
 *                                    "n_vocab": V, "prompts": [[ids...], ...] (P prompts),
 *                                    "steps": N, "greedy_tokens": [[N ids], ...],
 *                                    "logit_scale": max|logit|, ...
 *                                    stories260K only: "story_tokens": [40 ids], "story_text"}
 *   tests/golden/<name>.logits.bin  float32 little-endian [P][N+1][V]: per prompt, the logits of
 *                                    the last prompt token after prefill, then the logits after
 *                                    feeding each greedy token in turn.
 *
 * Protocol (what the engine is asked to do): each prompt is prefilled in ONE coopt_ctx_decode
 * call with want_logits only on its last token, then each greedy token is fed in its own call.
 * The engine's argmax must equal the golden greedy token at every step (exact), and every logits
 * row must be near the golden row.
 *
 * Tolerance (GOLDEN_TOL): |got - ref| <= 2e-5 * scale + 2e-5 * |ref|, scale = max|ref logit| of
 * the file (14.5 .. 19.5). The reference is float64; the engine accumulates in float32. The same
 * reference run in float32 drifts by <= 6e-7 * scale ("f32_rel_err" in the JSON), and in float32
 * with strictly sequential dot products (the worst summation order an engine would use) by
 * <= 1.2e-6 * scale on these models (dims <= 1376, <= 8 layers, <= 45 positions): the tolerance
 * leaves ~20x room for other summation orders, SIMD lanes and approximate expf. It is >= 150x
 * below the smallest top-1/top-2 gap in the files (>= 0.13), so the greedy check is not fragile.
 * It is tighter than a loose 1e-4 on purpose: a throwaway naive f32 engine (sequential dot
 * products, f32 RoPE angles) passes every test here, and the same engine with RMSNorm eps 1e-6
 * instead of 1e-5 (or the reverse) fails golden_story_lmrs and golden_tinystories_mha (errors of
 * 1.1 and 2.6 times the tolerance); a wrong RoPE pair layout or theta moves logits by > 0.1 *
 * scale. Batched vs alone and .bin vs .gguf compare the engine with itself: only summation order
 * may differ, so they use 1e-5 and 1e-6 of the scale.
 */
#include "coopt.h"
#include "test.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define GOLDEN_TOL 2e-5       // atol (times the logit scale) and rtol vs the float64 reference
#define GOLDEN_TOL_BATCH 1e-5 // batched vs the same sequences decoded alone (times the scale)
#define GOLDEN_TOL_SAMEW 1e-6 // llama2.c .bin vs GGUF of the same weights (times the scale)
#define GOLDEN_MAX_PROMPTS 8

static const char k_readme_story[] = "Once upon a time, there was a little girl named Lily. "
                                     "She loved to play outside in the park.";

// ---- golden files ----

struct golden {
    char     name[64];
    char     model[256];     // relative to $COOPT_MODELS
    char     alt_model[256]; // "" if none
    int32_t  n_vocab, steps, n_prompts;
    int32_t *prompts[GOLDEN_MAX_PROMPTS]; // [prompt_len[p]]
    int32_t  prompt_len[GOLDEN_MAX_PROMPTS];
    int32_t *greedy[GOLDEN_MAX_PROMPTS]; // [steps]
    int32_t *story;                      // [n_story] or NULL
    int32_t  n_story;
    double   scale;  // max |logit| over the file
    float   *logits; // [n_prompts][steps + 1][n_vocab]
};

static const float *golden_row(const struct golden *g, int p, int s) {
    return g->logits + ((size_t)p * (size_t)(g->steps + 1) + (size_t)s) * (size_t)g->n_vocab;
}

static void golden_free(struct golden *g) {
    for (int p = 0; p < GOLDEN_MAX_PROMPTS; p++) {
        free(g->prompts[p]);
        free(g->greedy[p]);
    }
    free(g->story);
    free(g->logits);
    memset(g, 0, sizeof(*g));
}

// Fails the test (and returns false) from a helper that returns bool.
#define GCHECK(t, c, ...)                                                                          \
    do {                                                                                           \
        if (!(c)) {                                                                                \
            test_fail((t), __FILE__, __LINE__, __VA_ARGS__);                                       \
            return false;                                                                          \
        }                                                                                          \
    } while (0)

// A JSON array of token ids -> malloc'd int32 array; NULL if not an array of ids in [0, n_vocab).
static int32_t *json_ids(const cJSON *a, int32_t n_vocab, int32_t *n_out) {
    *n_out = 0;
    if (!cJSON_IsArray(a)) return NULL;
    int      n   = cJSON_GetArraySize(a);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(n > 0 ? n : 1));
    if (!ids) return NULL;
    for (int i = 0; i < n; i++) {
        const cJSON *v = cJSON_GetArrayItem(a, i);
        if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble >= n_vocab) {
            free(ids);
            return NULL;
        }
        ids[i] = (int32_t)v->valuedouble;
    }
    *n_out = n;
    return ids;
}

static bool read_all(const char *path, char **data, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return false;
    bool ok = fseek(f, 0, SEEK_END) == 0;
    long n  = ok ? ftell(f) : -1;
    ok      = ok && n >= 0 && fseek(f, 0, SEEK_SET) == 0;
    char *b = ok ? malloc((size_t)n + 1) : NULL;
    ok      = b && fread(b, 1, (size_t)n, f) == (size_t)n;
    fclose(f);
    if (!ok) {
        free(b);
        return false;
    }
    b[n]  = 0;
    *data = b;
    *size = (size_t)n;
    return true;
}

static bool golden_parse(struct test_ctx *t, struct golden *g, const cJSON *j) {
    const cJSON *model = cJSON_GetObjectItem(j, "model");
    const cJSON *nv    = cJSON_GetObjectItem(j, "n_vocab");
    const cJSON *steps = cJSON_GetObjectItem(j, "steps");
    const cJSON *pr    = cJSON_GetObjectItem(j, "prompts");
    const cJSON *gr    = cJSON_GetObjectItem(j, "greedy_tokens");
    const cJSON *alt   = cJSON_GetObjectItem(j, "alt_models");
    const cJSON *story = cJSON_GetObjectItem(j, "story_tokens");
    GCHECK(t, cJSON_IsString(model) && cJSON_IsNumber(nv) && cJSON_IsNumber(steps),
           "%s.json: missing model/n_vocab/steps", g->name);
    GCHECK(t,
           cJSON_IsArray(pr) && cJSON_IsArray(gr) &&
               cJSON_GetArraySize(pr) == cJSON_GetArraySize(gr),
           "%s.json: prompts/greedy_tokens", g->name);
    snprintf(g->model, sizeof(g->model), "%s", model->valuestring);
    if (cJSON_IsArray(alt) && cJSON_IsString(cJSON_GetArrayItem(alt, 0)))
        snprintf(g->alt_model, sizeof(g->alt_model), "%s", cJSON_GetArrayItem(alt, 0)->valuestring);
    g->n_vocab   = (int32_t)nv->valuedouble;
    g->steps     = (int32_t)steps->valuedouble;
    g->n_prompts = cJSON_GetArraySize(pr);
    GCHECK(t,
           g->n_vocab > 0 && g->steps >= 0 && g->n_prompts > 0 &&
               g->n_prompts <= GOLDEN_MAX_PROMPTS,
           "%s.json: bad sizes", g->name);
    for (int p = 0; p < g->n_prompts; p++) {
        int32_t n_greedy = 0;
        g->prompts[p]    = json_ids(cJSON_GetArrayItem(pr, p), g->n_vocab, &g->prompt_len[p]);
        g->greedy[p]     = json_ids(cJSON_GetArrayItem(gr, p), g->n_vocab, &n_greedy);
        GCHECK(t, g->prompts[p] && g->prompt_len[p] > 0 && g->greedy[p] && n_greedy == g->steps,
               "%s.json: prompt %d", g->name, p);
    }
    if (story) {
        g->story = json_ids(story, g->n_vocab, &g->n_story);
        GCHECK(t, g->story && g->n_story > 0, "%s.json: story_tokens", g->name);
    }
    return true;
}

// Loads tests/golden/<name>.json and .logits.bin; fails the test on any inconsistency.
static bool golden_load(struct test_ctx *t, const char *name, struct golden *g) {
    memset(g, 0, sizeof(*g));
    snprintf(g->name, sizeof(g->name), "%s", name);
    const uint16_t one = 1;
    GCHECK(t, *(const uint8_t *)&one == 1, "golden logits are little-endian; big-endian host");

    char   path[512], *text = NULL;
    size_t size = 0;
    snprintf(path, sizeof(path), "%s.json", name);
    GCHECK(t, read_all(test_golden_path(path), &text, &size),
           "cannot read %s (run from the repo root)", test_golden_path(path));
    cJSON *j = cJSON_Parse(text);
    free(text);
    GCHECK(t, j, "%s: invalid JSON", test_golden_path(path));
    bool ok = golden_parse(t, g, j);
    cJSON_Delete(j);
    if (!ok) return false;

    snprintf(path, sizeof(path), "%s.logits.bin", name);
    char *raw = NULL;
    GCHECK(t, read_all(test_golden_path(path), &raw, &size), "cannot read %s",
           test_golden_path(path));
    size_t n = (size_t)g->n_prompts * (size_t)(g->steps + 1) * (size_t)g->n_vocab;
    if (size != n * sizeof(float)) {
        free(raw);
        GCHECK(t, false, "%s: %zu bytes, expected %zu", test_golden_path(path), size,
               n * sizeof(float));
    }
    g->logits = (float *)raw; // malloc'd, suitably aligned for float
    g->scale  = 0;
    for (size_t i = 0; i < n; i++) {
        double a = g->logits[i] < 0 ? -(double)g->logits[i] : (double)g->logits[i];
        if (a > g->scale) g->scale = a;
    }
    GCHECK(t, g->scale > 0, "%s: all-zero logits", test_golden_path(path));
    return true;
}

// ---- engine helpers ----

// Everything a test allocates; run_free() releases it whatever point the test stopped at.
struct run {
    struct golden       g;
    struct coopt_model *m, *m2;
    struct coopt_ctx   *c, *c2;
    float              *alone;   // [n_prompts][steps + 1][n_vocab], engine, each prompt alone
    float              *alone2;  // same, second model
    int32_t            *tok_ids; // from coopt_tokenize
};

static void run_free(struct run *r) {
    coopt_ctx_free(r->c);
    coopt_ctx_free(r->c2);
    coopt_model_free(r->m);
    coopt_model_free(r->m2);
    free(r->alone);
    free(r->alone2);
    free(r->tok_ids);
    golden_free(&r->g);
}

static int32_t argmax(const float *x, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i; // first maximum, like numpy.argmax
    return best;
}

// True if the model file/directory exists; otherwise records a skip.
static bool model_present(struct test_ctx *t, const char *rel) {
    const char *path = test_model_path(rel);
    if (access(path, F_OK) == 0) return true;
    char why[600];
    snprintf(why, sizeof(why), "model not found: %s (set COOPT_MODELS)", path);
    test_skip(t, why);
    return false;
}

static bool open_model(struct test_ctx *t, const struct golden *g, const char *rel,
                       struct coopt_model **m, struct coopt_ctx **c) {
    struct coopt_model_params mp = coopt_model_default_params();
    enum coopt_status         st = coopt_model_load(test_model_path(rel), &mp, m);
    GCHECK(t, st == COOPT_OK && *m, "coopt_model_load(%s): %s", rel, coopt_status_str(st));
    const struct coopt_model_info *info = coopt_model_get_info(*m);
    GCHECK(t, info && info->n_vocab == g->n_vocab, "%s: n_vocab %d, golden %d", rel,
           info ? info->n_vocab : -1, g->n_vocab);
    struct coopt_ctx_params cp = coopt_ctx_default_params();
    cp.kv_type                 = COOPT_DTYPE_F32;
    st                         = coopt_ctx_init(*m, &cp, c);
    GCHECK(t, st == COOPT_OK && *c, "coopt_ctx_init(%s): %s", rel, coopt_status_str(st));
    return true;
}

// Compares one engine logits row with golden row (p, s), then the engine's greedy choice.
static bool check_row(struct test_ctx *t, const struct golden *g, const char *what, int p, int s,
                      const float *got) {
    const float *ref = golden_row(g, p, s);
    if (!test_near(t, __FILE__, __LINE__, got, ref, (size_t)g->n_vocab, GOLDEN_TOL * g->scale,
                   GOLDEN_TOL)) {
        char prev[sizeof(t->msg)];
        snprintf(prev, sizeof(prev), "%s", t->msg);
        snprintf(t->msg, sizeof(t->msg), "%.80s prompt %d step %d: %.900s", what, p, s, prev);
        return false;
    }
    if (s < g->steps) {
        int32_t tok = argmax(got, g->n_vocab);
        GCHECK(t, tok == g->greedy[p][s],
               "%s prompt %d step %d: greedy token %d (logit %g), golden %d (logit %g)", what, p, s,
               tok, (double)got[tok], g->greedy[p][s], (double)got[g->greedy[p][s]]);
    }
    return true;
}

static bool decode(struct test_ctx *t, struct coopt_ctx *c, int32_t n, const int32_t *tokens,
                   const int32_t *seq_ids, const uint8_t *want) {
    struct coopt_batch_input b = {
        .n_tokens = n, .tokens = tokens, .seq_ids = seq_ids, .want_logits = want};
    enum coopt_status st = coopt_ctx_decode(c, &b);
    GCHECK(t, st == COOPT_OK, "coopt_ctx_decode(%d tokens): %s", n, coopt_status_str(st));
    return true;
}

// Decodes golden prompt p alone in a new sequence of c (prefill in one call, then one call per
// greedy token), checks each row against the golden file and stores the rows in
// out [steps + 1][n_vocab].
static bool decode_alone(struct test_ctx *t, const struct golden *g, struct coopt_ctx *c,
                         const char *what, int p, float *out) {
    int32_t           seq = -1;
    enum coopt_status st  = coopt_seq_new(c, &seq);
    GCHECK(t, st == COOPT_OK && seq >= 0, "coopt_seq_new: %s", coopt_status_str(st));
    int32_t  n    = g->prompt_len[p];
    int32_t *seqs = malloc(sizeof(int32_t) * (size_t)n);
    uint8_t *want = calloc((size_t)n, 1);
    if (!seqs || !want) {
        free(seqs);
        free(want);
        GCHECK(t, false, "out of memory");
    }
    for (int32_t i = 0; i < n; i++) seqs[i] = seq;
    want[n - 1] = 1; // prefill in one call, logits of the last prompt token only
    bool ok     = decode(t, c, n, g->prompts[p], seqs, want);
    free(seqs);
    free(want);
    if (!ok) return false;
    for (int s = 0; s <= g->steps; s++) {
        if (s > 0) {
            uint8_t w1 = 1;
            if (!decode(t, c, 1, &g->greedy[p][s - 1], &seq, &w1)) return false;
        }
        const float *l = coopt_ctx_logits(c, s == 0 ? n - 1 : 0);
        GCHECK(t, l, "%s prompt %d step %d: coopt_ctx_logits returned NULL", what, p, s);
        float *row = out + (size_t)s * (size_t)g->n_vocab;
        memcpy(row, l, sizeof(float) * (size_t)g->n_vocab);
        if (!check_row(t, g, what, p, s, row)) return false;
    }
    GCHECK(t, coopt_seq_len(c, seq) == n + g->steps, "%s prompt %d: seq_len %d, expected %d", what,
           p, coopt_seq_len(c, seq), n + g->steps);
    coopt_seq_free(c, seq);
    return true;
}

static float *rows_alloc(const struct golden *g) {
    return malloc(sizeof(float) * (size_t)g->n_prompts * (size_t)(g->steps + 1) *
                  (size_t)g->n_vocab);
}

static float *rows_at(const struct golden *g, float *rows, int p) {
    return rows + (size_t)p * (size_t)(g->steps + 1) * (size_t)g->n_vocab;
}

// Loads golden <name> and its model (or its first alt_models entry), decodes every prompt alone.
static bool case_alone(struct test_ctx *t, struct run *r, const char *name, bool alt) {
    if (!golden_load(t, name, &r->g)) return false;
    GCHECK(t, !alt || r->g.alt_model[0], "%s.json: no alt_models", name);
    const char *rel = alt ? r->g.alt_model : r->g.model;
    if (!model_present(t, rel)) return false;
    if (!open_model(t, &r->g, rel, &r->m, &r->c)) return false;
    r->alone = rows_alloc(&r->g);
    GCHECK(t, r->alone, "out of memory");
    for (int p = 0; p < r->g.n_prompts; p++)
        if (!decode_alone(t, &r->g, r->c, rel, p, rows_at(&r->g, r->alone, p))) return false;
    return true;
}

// ---- tests ----

TEST(golden_story_lmrs) {
    // HF safetensors F32, tied embeddings (only lm_head.weight stored), rotate-half RoPE, GQA 8/4.
    // Three prompts of 6, 15 and 18 tokens, each in its own sequence.
    struct run r = {0};
    case_alone(t, &r, "story-lmrs", false);
    run_free(&r);
}

static void batched_body(struct test_ctx *t, struct run *r) {
    if (!case_alone(t, r, "story-lmrs", false)) return;
    const struct golden    *g  = &r->g;
    struct coopt_ctx_params cp = coopt_ctx_default_params();
    cp.kv_type                 = COOPT_DTYPE_F32;
    enum coopt_status st       = coopt_ctx_init(r->m, &cp, &r->c2);
    CHECKF(t, st == COOPT_OK, "coopt_ctx_init: %s", coopt_status_str(st));

    int32_t seq[GOLDEN_MAX_PROMPTS], last[GOLDEN_MAX_PROMPTS], n = 0;
    for (int p = 0; p < g->n_prompts; p++) {
        st = coopt_seq_new(r->c2, &seq[p]);
        CHECKF(t, st == COOPT_OK, "coopt_seq_new: %s", coopt_status_str(st));
        n += g->prompt_len[p];
    }
    // Ragged prefill of all prompts in one call: [prompt 0 | prompt 1 | prompt 2].
    int32_t tokens[256], seqs[256];
    uint8_t want[256] = {0};
    CHECK(t, n <= 256);
    int32_t k = 0;
    for (int p = 0; p < g->n_prompts; p++) {
        for (int32_t i = 0; i < g->prompt_len[p]; i++, k++) {
            tokens[k] = g->prompts[p][i];
            seqs[k]   = seq[p];
        }
        last[p]     = k - 1;
        want[k - 1] = 1;
    }
    if (!decode(t, r->c2, n, tokens, seqs, want)) return;
    for (int s = 0; s <= g->steps; s++) {
        if (s > 0) { // one decode call with the next token of every sequence
            for (int p = 0; p < g->n_prompts; p++) {
                tokens[p] = g->greedy[p][s - 1];
                seqs[p]   = seq[p];
                want[p]   = 1;
                last[p]   = p;
            }
            if (!decode(t, r->c2, g->n_prompts, tokens, seqs, want)) return;
        }
        for (int p = 0; p < g->n_prompts; p++) {
            const float *l = coopt_ctx_logits(r->c2, last[p]);
            CHECKF(t, l, "batched step %d prompt %d: coopt_ctx_logits(%d) returned NULL", s, p,
                   last[p]);
            if (!check_row(t, g, "batched", p, s, l)) return;
            const float *alone = rows_at(g, r->alone, p) + (size_t)s * (size_t)g->n_vocab;
            CHECK_NEAR(t, l, alone, (size_t)g->n_vocab, GOLDEN_TOL_BATCH * g->scale,
                       GOLDEN_TOL_BATCH);
        }
    }
    for (int p = 0; p < g->n_prompts; p++)
        CHECKF(t, coopt_seq_len(r->c2, seq[p]) == g->prompt_len[p] + g->steps, "seq %d len %d", p,
               coopt_seq_len(r->c2, seq[p]));
}

TEST(golden_story_lmrs_batched) {
    // The same three prompts as golden_story_lmrs, as one ragged batch: prefill of all three in
    // one call (the 18-token prompt crosses a 16-token KV page, the 15-token one crosses it while
    // decoding), then one call per step holding one token of each sequence. Logits must match
    // the golden file and the sequences decoded alone.
    struct run r = {0};
    batched_body(t, &r);
    run_free(&r);
}

TEST(golden_tinystories_mha) {
    // HF sharded BF16 safetensors, multi-head attention (8/8), head_dim 64, untied LM head.
    struct run r = {0};
    case_alone(t, &r, "tinystories-mha-25m", false);
    run_free(&r);
}

TEST(golden_stories260k_gguf) {
    // GGUF F32, interleaved-pair RoPE layout, GQA 8/4, head_dim 8.
    struct run r = {0};
    case_alone(t, &r, "stories260K", false);
    run_free(&r);
}

static void bin_body(struct test_ctx *t, struct run *r) {
    // The llama2.c checkpoint holds the GGUF's weights bit for bit: same golden logits, and the
    // same engine logits as the GGUF up to summation order.
    if (!case_alone(t, r, "stories260K", true)) return;
    const struct golden *g = &r->g;
    CHECK(t, strcmp(g->alt_model, "stories260K.bin") == 0);
    if (access(test_model_path(g->model), F_OK) != 0) return; // GGUF absent: golden check only
    if (!open_model(t, g, g->model, &r->m2, &r->c2)) return;
    r->alone2 = rows_alloc(g);
    CHECK(t, r->alone2);
    for (int p = 0; p < g->n_prompts; p++) {
        if (!decode_alone(t, g, r->c2, g->model, p, rows_at(g, r->alone2, p))) return;
        CHECK_NEAR(t, rows_at(g, r->alone, p), rows_at(g, r->alone2, p),
                   (size_t)(g->steps + 1) * (size_t)g->n_vocab, GOLDEN_TOL_SAMEW * g->scale, 0);
    }
}

TEST(golden_stories260k_bin) {
    struct run r = {0};
    bin_body(t, &r);
    run_free(&r);
}

static void story_body(struct test_ctx *t, struct run *r) {
    // Text in, text out: tokenize "Once upon a time" with the GGUF's own vocabulary, greedy-decode
    // 40 tokens, detokenize; must give the story of llama2.c's run.c at temperature 0.
    if (!golden_load(t, "stories260K", &r->g)) return;
    struct golden *g = &r->g;
    CHECK(t, g->story && g->n_story >= 30);
    if (!model_present(t, g->model)) return;
    if (!open_model(t, g, g->model, &r->m, &r->c)) return;
    const struct coopt_tokenizer *tok = coopt_model_tokenizer(r->m);
    CHECK(t, tok);

    static const char prompt[] = "Once upon a time";
    size_t            n        = 0;
    enum coopt_status st =
        coopt_tokenize(tok, prompt, strlen(prompt), COOPT_TOKENIZE_ADD_BOS, &r->tok_ids, &n);
    CHECKF(t, st == COOPT_OK, "coopt_tokenize: %s", coopt_status_str(st));
    CHECKF(t,
           n == (size_t)g->prompt_len[0] &&
               memcmp(r->tok_ids, g->prompts[0], n * sizeof(int32_t)) == 0,
           "tokenize(\"%s\") gave %zu tokens (first %d), golden %d tokens [1, 403, 407, 261, 378]",
           prompt, n, n ? r->tok_ids[0] : -1, g->prompt_len[0]);

    int32_t seq = -1;
    st          = coopt_seq_new(r->c, &seq);
    CHECKF(t, st == COOPT_OK, "coopt_seq_new: %s", coopt_status_str(st));
    int32_t seqs[64];
    uint8_t want[64] = {0};
    CHECK(t, n <= 64);
    for (size_t i = 0; i < n; i++) seqs[i] = seq;
    want[n - 1] = 1;
    if (!decode(t, r->c, (int32_t)n, r->tok_ids, seqs, want)) return;

    char               text[4096] = "";
    size_t             len        = 0;
    struct coopt_detok d;
    coopt_detok_reset(&d);
    for (size_t i = 0; i < n; i++)
        len += coopt_detok_push(&d, tok, r->tok_ids[i], text + len, sizeof(text) - len);
    const float *l = coopt_ctx_logits(r->c, (int32_t)n - 1);
    for (int32_t i = 0; i < g->n_story; i++) {
        CHECKF(t, l, "story step %d: coopt_ctx_logits returned NULL", i);
        int32_t next = argmax(l, g->n_vocab);
        CHECKF(t, next == g->story[i], "story token %d: got %d, golden %d (text so far: \"%s\")", i,
               next, g->story[i], text);
        len += coopt_detok_push(&d, tok, next, text + len, sizeof(text) - len);
        uint8_t w1 = 1;
        if (i + 1 < g->n_story) {
            if (!decode(t, r->c, 1, &next, &seq, &w1)) return;
            l = coopt_ctx_logits(r->c, 0);
        }
    }
    len += coopt_detok_flush(&d, text + len, sizeof(text) - len);
    CHECK(t, len < sizeof(text));
    const char *s = text;
    while (*s == ' ') s++; // SentencePiece's '▁' on the first word: the leading space is kept
    CHECKF(t, strncmp(s, k_readme_story, strlen(k_readme_story)) == 0, "story text \"%s\"", text);
}

TEST(golden_stories260k_story) {
    struct run r = {0};
    story_body(t, &r);
    run_free(&r);
}
