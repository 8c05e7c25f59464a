/*
 * test_convert.c -- coopt convert: identity (G = n_kv_heads), format round trips (bit-exact
 * weights, equal logits), Opt-GQA mean pooling against a direct computation, error paths.
 * Outputs go to a fresh mkdtemp directory that each test removes.
 */
#define _XOPEN_SOURCE 700
#include "test.h"

#include "convert.h"
#include "dtype.h"
#include "model.h"
#include "util.h"

#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---- helpers ----

static bool tmpdir_make(char *buf, size_t cap) {
    const char *base = getenv("TMPDIR");
    snprintf(buf, cap, "%s/coopt-convert-XXXXXX", base && *base ? base : "/tmp");
    return mkdtemp(buf) != NULL;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}
static void tmpdir_remove(const char *dir) { nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

static struct coopt_model *load(const char *path) {
    struct coopt_model_params p = coopt_model_default_params();
    struct coopt_model       *m = NULL;
    return coopt_model_load(path, &p, &m) == COOPT_OK ? m : NULL;
}

// Logits of the last of n tokens (ids i * 7 % n_vocab, from BOS) into out [n_vocab].
static bool last_logits(struct coopt_model *m, int n, float *out) {
    struct coopt_ctx_params cp = coopt_ctx_default_params();
    cp.n_ctx                   = 64;
    cp.n_seq_max               = 1;
    cp.n_threads               = 1;
    struct coopt_ctx *c        = NULL;
    int32_t           toks[32], seqs[32], seq;
    int32_t           nv = m->config.n_vocab;
    if (n > 32 || coopt_ctx_init(m, &cp, &c) != COOPT_OK) return false;
    bool ok = coopt_seq_new(c, &seq) == COOPT_OK;
    for (int i = 0; i < n; i++) toks[i] = i == 0 ? 1 : (i * 7 + 3) % nv, seqs[i] = seq;
    struct coopt_batch_input b = {.n_tokens = n, .tokens = toks, .seq_ids = seqs};
    ok                         = ok && coopt_ctx_decode(c, &b) == COOPT_OK;
    const float *l             = ok ? coopt_ctx_logits(c, n - 1) : NULL;
    if (l) memcpy(out, l, (size_t)nv * sizeof(float));
    coopt_ctx_free(c);
    return l != NULL;
}

static bool weight_same(const struct coopt_weight *a, const struct coopt_weight *b) {
    if (a->dtype != b->dtype || a->n_in != b->n_in || a->n_out != b->n_out) return false;
    size_t n = coopt_dtype_row_bytes(a->dtype, a->n_in) * (size_t)a->n_out;
    if (memcmp(a->data, b->data, n) != 0) return false;
    if (!a->bias != !b->bias) return false;
    return !a->bias || memcmp(a->bias, b->bias, (size_t)a->n_out * sizeof(float)) == 0;
}

// Every weight of a and b bit-identical (same RoPE layout assumed), config equal.
static bool models_same(const struct coopt_model *a, const struct coopt_model *b, char *why, size_t cap) {
    const struct coopt_model_config *ca = &a->config, *cb = &b->config;
    if (ca->n_layers != cb->n_layers || ca->dim != cb->dim || ca->n_heads != cb->n_heads ||
        ca->n_kv_heads != cb->n_kv_heads || ca->head_dim != cb->head_dim || ca->ffn_dim != cb->ffn_dim ||
        ca->n_vocab != cb->n_vocab || ca->norm_eps != cb->norm_eps || ca->rope_theta != cb->rope_theta ||
        ca->tied_embeddings != cb->tied_embeddings || ca->rope_layout != cb->rope_layout) {
        snprintf(why, cap, "config differs");
        return false;
    }
    if (!weight_same(&a->tok_embd, &b->tok_embd) || !weight_same(&a->output, &b->output) ||
        memcmp(a->out_norm, b->out_norm, (size_t)ca->dim * 4) != 0) {
        snprintf(why, cap, "embedding / output differ");
        return false;
    }
    for (int l = 0; l < ca->n_layers; l++) {
        const struct coopt_layer *x = &a->layers[l], *y = &b->layers[l];
        const struct coopt_weight *wx[] = {&x->wq, &x->wk, &x->wv, &x->wo, &x->w_gate, &x->w_up, &x->w_down};
        const struct coopt_weight *wy[] = {&y->wq, &y->wk, &y->wv, &y->wo, &y->w_gate, &y->w_up, &y->w_down};
        for (int i = 0; i < 7; i++) {
            if (!weight_same(wx[i], wy[i])) {
                snprintf(why, cap, "layer %d weight %d differs", l, i);
                return false;
            }
        }
        if (memcmp(x->attn_norm, y->attn_norm, (size_t)ca->dim * 4) ||
            memcmp(x->ffn_norm, y->ffn_norm, (size_t)ca->dim * 4)) {
            snprintf(why, cap, "layer %d norms differ", l);
            return false;
        }
    }
    return true;
}

static enum coopt_status convert(const char *in, const char *out, enum coopt_convert_format to, int32_t g, int dtype) {
    struct coopt_convert_params p = coopt_convert_default_params();
    p.to                          = to;
    p.kv_heads                    = g;
    p.dtype                       = dtype;
    coopt_log_set_quiet(1);
    enum coopt_status st = coopt_convert(in, out, &p);
    coopt_log_set_quiet(0);
    return st;
}

// Converts src with G = n_kv_heads into the same format and checks bit-identical weights and
// identical logits (same bytes, same code path).
static void check_identity(struct test_ctx *t, const char *src, const char *name) {
    char dir[512], out[600], why[128];
    CHECK(t, tmpdir_make(dir, sizeof(dir)));
    snprintf(out, sizeof(out), "%s/%s", dir, name);
    struct coopt_model *a = load(src), *b = NULL;
    float              *la = NULL, *lb = NULL;
    bool                ok = a && convert(src, out, COOPT_CONVERT_AUTO, a->config.n_kv_heads, -1) == COOPT_OK &&
              (b = load(out)) != NULL;
    if (ok) {
        la = malloc((size_t)a->config.n_vocab * 4);
        lb = malloc((size_t)a->config.n_vocab * 4);
        ok = la && lb && models_same(a, b, why, sizeof(why)) && last_logits(a, 9, la) && last_logits(b, 9, lb) &&
             memcmp(la, lb, (size_t)a->config.n_vocab * 4) == 0;
        if (!ok && !why[0]) snprintf(why, sizeof(why), "logits differ");
    } else {
        snprintf(why, sizeof(why), "convert or load failed");
    }
    free(la);
    free(lb);
    coopt_model_free(a);
    coopt_model_free(b);
    tmpdir_remove(dir);
    CHECKF(t, ok, "%s -> %s: %s", src, name, why);
}

// ---- tests ----

TEST(convert_rope_permutation) {
    // llama.cpp's permute: reshape(n_head, 2, d/2, ...).swapaxes(1, 2): interleaved row 2i+s holds
    // rotate-half row s*d/2 + i. For d = 8: 0 4 1 5 2 6 3 7.
    static const int32_t want[8] = {0, 4, 1, 5, 2, 6, 3, 7};
    for (int32_t r = 0; r < 8; r++)
        CHECK(t, coopt_convert_rope_src_row(r, 8, COOPT_ROPE_HALF, COOPT_ROPE_INTERLEAVED) == want[r]);
    for (int32_t d = 2; d <= 128; d += 2) {
        for (int32_t r = 0; r < d; r++) {
            int32_t s = coopt_convert_rope_src_row(r, d, COOPT_ROPE_HALF, COOPT_ROPE_INTERLEAVED);
            CHECK(t, s >= 0 && s < d);
            CHECK(t, coopt_convert_rope_src_row(s, d, COOPT_ROPE_INTERLEAVED, COOPT_ROPE_HALF) == r);
            CHECK(t, coopt_convert_rope_src_row(r, d, COOPT_ROPE_HALF, COOPT_ROPE_HALF) == r);
        }
    }
}

TEST(convert_identity_story_lmrs) {
    const char *src = test_model_path("story-lmrs");
    if (!coopt_path_exists(src)) SKIP(t, "story-lmrs not found");
    check_identity(t, src, "hf");
}

TEST(convert_identity_stories260k) {
    const char *src = test_model_path("stories260K.gguf");
    if (!coopt_path_exists(src)) SKIP(t, "stories260K.gguf not found");
    check_identity(t, src, "out.gguf");
}

// llama2.c -> GGUF (the default for llama2.c): same interleaved layout, so bit-identical.
TEST(convert_llama2c_to_gguf) {
    const char *src = test_model_path("stories260K.bin");
    if (!coopt_path_exists(src)) SKIP(t, "stories260K.bin not found");
    check_identity(t, src, "from-bin");
}

// HF -> GGUF -> HF is bit-exact; the GGUF (other RoPE layout) gives the same logits up to
// f32 summation order in attention; tokenization is the same.
static void check_cross_roundtrip(struct test_ctx *t, const char *src, enum coopt_convert_format mid,
                                  enum coopt_convert_format back) {
    char dir[512], p1[600], p2[600], why[128] = "";
    CHECK(t, tmpdir_make(dir, sizeof(dir)));
    snprintf(p1, sizeof(p1), "%s/mid", dir);
    snprintf(p2, sizeof(p2), "%s/back", dir);
    struct coopt_model *a = load(src), *b = NULL, *c = NULL;
    float              *la = NULL, *lb = NULL;
    bool ok = a && convert(src, p1, mid, 0, -1) == COOPT_OK && convert(p1, p2, back, 0, -1) == COOPT_OK &&
              (b = load(p1)) && (c = load(p2));
    if (!ok) snprintf(why, sizeof(why), "convert or load failed");
    if (ok && !models_same(a, c, why, sizeof(why))) ok = false;
    if (ok) {
        CHECK(t, b->config.rope_layout != a->config.rope_layout);
        size_t nv = (size_t)a->config.n_vocab;
        la        = malloc(nv * 4);
        lb        = malloc(nv * 4);
        ok        = la && lb && last_logits(a, 12, la) && last_logits(b, 12, lb);
        double worst = 0;
        for (size_t i = 0; ok && i < nv; i++) worst = fmax(worst, fabs((double)la[i] - lb[i]));
        if (ok && !(worst <= 1e-4)) {
            snprintf(why, sizeof(why), "logits differ by %g", worst);
            ok = false;
        }
        // the two tokenizers agree on a story
        static const char text[] = "Once upon a time, there was a little girl named Lily. She said: \"Hi, Tom!\"";
        int32_t *ta = NULL, *tb = NULL;
        size_t   na = 0, nb = 0;
        if (ok && (coopt_tokenize(coopt_model_tokenizer(a), text, sizeof(text) - 1, COOPT_TOKENIZE_ADD_BOS, &ta,
                                  &na) != COOPT_OK ||
                   coopt_tokenize(coopt_model_tokenizer(b), text, sizeof(text) - 1, COOPT_TOKENIZE_ADD_BOS, &tb,
                                  &nb) != COOPT_OK ||
                   na != nb || memcmp(ta, tb, na * sizeof(int32_t)) != 0)) {
            snprintf(why, sizeof(why), "tokenization differs (%zu vs %zu tokens)", na, nb);
            ok = false;
        }
        free(ta);
        free(tb);
    }
    free(la);
    free(lb);
    coopt_model_free(a);
    coopt_model_free(b);
    coopt_model_free(c);
    tmpdir_remove(dir);
    CHECKF(t, ok, "%s: %s", src, why);
}

TEST(convert_hf_gguf_hf_roundtrip) {
    const char *src = test_model_path("story-lmrs");
    if (!coopt_path_exists(src)) SKIP(t, "story-lmrs not found");
    check_cross_roundtrip(t, src, COOPT_CONVERT_GGUF, COOPT_CONVERT_HF);
}

TEST(convert_gguf_hf_gguf_roundtrip) {
    const char *src = test_model_path("stories260K.gguf");
    if (!coopt_path_exists(src)) SKIP(t, "stories260K.gguf not found");
    check_cross_roundtrip(t, src, COOPT_CONVERT_HF, COOPT_CONVERT_GGUF);
}

// The multi-head BF16 model (the real subject of MHA -> GQA) through GGUF with G = 8.
TEST(convert_mha25m_bf16_to_gguf) {
    const char *src = test_model_path("tinystories-mha-25m");
    if (!coopt_path_exists(src)) SKIP(t, "tinystories-mha-25m not found");
    char dir[512], out[600], why[96] = "";
    CHECK(t, tmpdir_make(dir, sizeof(dir)));
    snprintf(out, sizeof(out), "%s/mha.gguf", dir);
    struct coopt_model *a = load(src), *b = NULL;
    float               la[512], lb[512];
    bool ok = a && a->config.n_vocab == 512 && convert(src, out, COOPT_CONVERT_AUTO, 8, -1) == COOPT_OK &&
              (b = load(out)) && last_logits(a, 10, la) && last_logits(b, 10, lb);
    if (!ok) snprintf(why, sizeof(why), "convert, load or decode failed");
    ok = ok && b->layers[0].wq.dtype == COOPT_DTYPE_BF16 && b->config.n_kv_heads == 8;
    double worst = 0;
    for (int i = 0; ok && i < 512; i++) worst = fmax(worst, fabs((double)la[i] - lb[i]));
    if (ok && !(worst <= 1e-3)) {
        snprintf(why, sizeof(why), "logits differ by %g", worst);
        ok = false;
    }
    coopt_model_free(a);
    coopt_model_free(b);
    tmpdir_remove(dir);
    CHECKF(t, ok, "%s", why);
}

// --kv-heads G: each new KV head is the mean of its group's heads, row by row; queries unchanged.
static void check_pooled(struct test_ctx *t, const struct coopt_model *a, const struct coopt_model *b, int32_t g) {
    const struct coopt_model_config *c    = &a->config;
    int32_t                          hd   = c->head_dim, pool = c->n_kv_heads / g;
    int64_t                          n_in = c->dim;
    CHECK(t, b->config.n_kv_heads == g && b->config.n_heads == c->n_heads);
    float *src = malloc((size_t)n_in * 4), *dst = malloc((size_t)n_in * 4);
    double *acc = malloc((size_t)n_in * 8);
    CHECK(t, src && dst && acc);
    bool ok = true;
    for (int l = 0; ok && l < c->n_layers; l++) {
        const struct coopt_weight *wa[2] = {&a->layers[l].wk, &a->layers[l].wv};
        const struct coopt_weight *wb[2] = {&b->layers[l].wk, &b->layers[l].wv};
        ok = weight_same(&a->layers[l].wo, &b->layers[l].wo);
        const struct coopt_weight *qa = &a->layers[l].wq, *qb = &b->layers[l].wq; // same rows, maybe permuted
        for (int64_t r = 0; ok && r < qa->n_out; r++) {
            int64_t s = r / hd * hd + coopt_convert_rope_src_row((int32_t)(r % hd), hd, c->rope_layout,
                                                                 b->config.rope_layout);
            ok = memcmp((const float *)qb->data + r * n_in, (const float *)qa->data + s * n_in, (size_t)n_in * 4) == 0;
        }
        for (int k = 0; ok && k < 2; k++) {
            ok = wb[k]->n_out == (int64_t)g * hd && wb[k]->dtype == COOPT_DTYPE_F32;
            for (int64_t r = 0; ok && r < wb[k]->n_out; r++) {
                int64_t h = r / hd, i = r % hd;
                // b is in the other RoPE layout for K only when the formats differ
                if (k == 0) i = coopt_convert_rope_src_row((int32_t)i, hd, c->rope_layout, b->config.rope_layout);
                memset(acc, 0, (size_t)n_in * 8);
                for (int p = 0; p < pool; p++) {
                    int64_t s = (h * pool + p) * hd + i;
                    coopt_dequant_row(wa[k]->dtype, (const uint8_t *)wa[k]->data + s * n_in * 4, src, n_in);
                    for (int64_t j = 0; j < n_in; j++) acc[j] += src[j];
                }
                const float *got = (const float *)wb[k]->data + r * n_in;
                for (int64_t j = 0; ok && j < n_in; j++) ok = got[j] == (float)(acc[j] / pool);
                if (!ok) test_fail(t, __FILE__, __LINE__, "layer %d %s row %lld is not the mean of its group", l,
                                   k ? "v" : "k", (long long)r);
            }
        }
    }
    free(src);
    free(dst);
    free(acc);
    CHECK(t, ok);
}

TEST(convert_kv_heads_pooling) {
    const char *src = test_model_path("story-lmrs");
    if (!coopt_path_exists(src)) SKIP(t, "story-lmrs not found");
    char dir[512], o2[600], o1[600];
    CHECK(t, tmpdir_make(dir, sizeof(dir)));
    snprintf(o2, sizeof(o2), "%s/g2", dir);
    snprintf(o1, sizeof(o1), "%s/g1.gguf", dir);
    struct coopt_model *a = load(src), *b = NULL, *c = NULL;
    float              *l = a ? malloc((size_t)a->config.n_vocab * 4) : NULL;
    bool ok = l && convert(src, o2, COOPT_CONVERT_AUTO, 2, -1) == COOPT_OK && (b = load(o2)) &&
              convert(src, o1, COOPT_CONVERT_AUTO, 1, -1) == COOPT_OK && (c = load(o1));
    if (ok) check_pooled(t, a, b, 2); // HF -> HF, 4 -> 2 KV heads
    if (ok && !t->failed) check_pooled(t, a, c, 1); // HF -> GGUF, 4 -> 1 (pooling + RoPE permutation)
    bool runs = ok && !t->failed && last_logits(b, 8, l) && isfinite(l[0]) && last_logits(c, 8, l) && isfinite(l[0]);
    free(l);
    coopt_model_free(a);
    coopt_model_free(b);
    coopt_model_free(c);
    tmpdir_remove(dir);
    if (t->failed) return;
    CHECK(t, ok);
    CHECK(t, runs);
}

TEST(convert_dtype_q8_0) {
    const char *src = test_model_path("stories260K.gguf");
    if (!coopt_path_exists(src)) SKIP(t, "stories260K.gguf not found");
    char dir[512], out[600];
    CHECK(t, tmpdir_make(dir, sizeof(dir)));
    snprintf(out, sizeof(out), "%s/q8.gguf", dir);
    struct coopt_model *a = load(src), *b = NULL;
    float               la[512], lb[512];
    bool ok = a && convert(src, out, COOPT_CONVERT_AUTO, 2, COOPT_DTYPE_Q8_0) == COOPT_OK && (b = load(out)) &&
              last_logits(a, 8, la) && last_logits(b, 8, lb);
    // ffn_down rows (172) are not a multiple of 32: that tensor falls back to f16
    bool types = ok && b->layers[0].wq.dtype == COOPT_DTYPE_Q8_0 && b->layers[0].w_down.dtype == COOPT_DTYPE_F16 &&
                 b->config.n_kv_heads == 2;
    coopt_model_free(a);
    coopt_model_free(b);
    tmpdir_remove(dir);
    CHECK(t, ok);
    CHECK(t, types);
    CHECK(t, isfinite(lb[0]));
}

TEST(convert_errors) {
    const char *src = test_model_path("story-lmrs");
    if (!coopt_path_exists(src)) SKIP(t, "story-lmrs not found");
    char dir[512], out[600], bad[700];
    CHECK(t, tmpdir_make(dir, sizeof(dir)));
    snprintf(out, sizeof(out), "%s/o", dir);
    snprintf(bad, sizeof(bad), "%s/missing/sub/o.gguf", dir);
    enum coopt_convert_format f;
    CHECK(t, !coopt_convert_format_parse("safetensors", &f));
    CHECK(t, coopt_convert_format_parse("hf", &f) && f == COOPT_CONVERT_HF);
    CHECK(t, convert(src, out, COOPT_CONVERT_AUTO, 3, -1) == COOPT_ERR_INVALID); // 3 does not divide 4
    CHECK(t, convert(src, out, COOPT_CONVERT_AUTO, 8, -1) == COOPT_ERR_INVALID); // more than 4
    CHECK(t, convert(src, out, COOPT_CONVERT_AUTO, -1, -1) == COOPT_ERR_INVALID);
    CHECK(t, convert(src, out, COOPT_CONVERT_HF, 0, COOPT_DTYPE_Q4_0) == COOPT_ERR_INVALID);
    CHECK(t, convert(src, out, COOPT_CONVERT_AUTO, 0, COOPT_DTYPE_Q4_0) == COOPT_ERR_INVALID); // HF in, no .gguf
    CHECK(t, convert(src, out, COOPT_CONVERT_AUTO, 0, COOPT_DTYPE_FP8_E4M3) == COOPT_ERR_INVALID);
    CHECK(t, convert(src, src, COOPT_CONVERT_AUTO, 0, -1) == COOPT_ERR_INVALID); // would overwrite the input
    CHECK(t, convert(src, bad, COOPT_CONVERT_AUTO, 0, -1) == COOPT_ERR_IO);      // GGUF, not writable
    snprintf(bad, sizeof(bad), "%s/missing/sub", dir);
    CHECK(t, convert(src, bad, COOPT_CONVERT_HF, 0, -1) == COOPT_ERR_IO);        // HF dir, not creatable
    snprintf(bad, sizeof(bad), "%s/nothing-here", dir);
    CHECK(t, convert(bad, out, COOPT_CONVERT_AUTO, 0, -1) != COOPT_OK);
    CHECK(t, !coopt_path_exists(out)); // nothing was written by the failures above
    tmpdir_remove(dir);
}
