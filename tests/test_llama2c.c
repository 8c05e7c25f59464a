/*
 * test_llama2c.c -- llama2.c checkpoints: stories260K.bin has the same config and bit-identical
 * weights as stories260K.gguf (Q/K rows included: neither file is permuted); the version-1
 * export layout; untied classifiers; size checks, version 2 and tokenizer search errors.
 */
#include "model.h"
#include "test.h"
#include "tokenizer.h"
#include "util.h"

#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>


static struct coopt_model *new_model(void) {
    struct coopt_model *m = calloc(1, sizeof(*m));
    m->gen_temp = NAN, m->gen_top_p = NAN, m->gen_top_k = -1;
    return m;
}

static bool write_file(const char *path, const void *a, size_t na, const void *b, size_t nb) {
    FILE *f = fopen(path, "wb");
    if (!f) return false;
    bool ok = fwrite(a, 1, na, f) == na && (nb == 0 || fwrite(b, 1, nb, f) == nb);
    return fclose(f) == 0 && ok;
}

// Loads `path` with COOPT_TOKENIZER set to `tok` (NULL: unset); restores the variable.
static enum coopt_status load(const char *path, const char *tok, struct coopt_model **out) {
    const char *old  = getenv("COOPT_TOKENIZER");
    char       *keep = old ? strdup(old) : NULL;
    if (tok) setenv("COOPT_TOKENIZER", tok, 1);
    else unsetenv("COOPT_TOKENIZER");
    *out                 = new_model();
    enum coopt_status st = coopt_llama2c_load_model(*out, path);
    if (keep) setenv("COOPT_TOKENIZER", keep, 1);
    else unsetenv("COOPT_TOKENIZER");
    free(keep);
    return st;
}

static bool same_w(const struct coopt_weight *a, const struct coopt_weight *b) {
    return a->dtype == b->dtype && a->n_in == b->n_in && a->n_out == b->n_out &&
           memcmp(a->data, b->data, (size_t)(a->n_in * a->n_out) * 4) == 0;
}
static bool same_v(const float *a, const float *b, int n) { return memcmp(a, b, (size_t)n * 4) == 0; }

// Every weight of a equals b bit for bit; returns the name of the first difference or NULL.
static const char *compare_models(const struct coopt_model *a, const struct coopt_model *b) {
    const struct coopt_model_config *x = &a->config, *y = &b->config;
    if (x->dim != y->dim || x->ffn_dim != y->ffn_dim || x->n_layers != y->n_layers || x->n_heads != y->n_heads ||
        x->n_kv_heads != y->n_kv_heads || x->n_vocab != y->n_vocab || x->head_dim != y->head_dim ||
        x->norm_eps != y->norm_eps || x->rope_theta != y->rope_theta || x->rope_layout != y->rope_layout ||
        x->tied_embeddings != y->tied_embeddings)
        return "config";
    if (!same_w(&a->tok_embd, &b->tok_embd)) return "tok_embd";
    if (!same_w(&a->output, &b->output)) return "output";
    if (!same_v(a->out_norm, b->out_norm, x->dim)) return "out_norm";
    for (int l = 0; l < x->n_layers; l++) {
        const struct coopt_layer *p = &a->layers[l], *q = &b->layers[l];
        if (!same_v(p->attn_norm, q->attn_norm, x->dim) || !same_v(p->ffn_norm, q->ffn_norm, x->dim)) return "norm";
        if (!same_w(&p->wq, &q->wq)) return "wq";
        if (!same_w(&p->wk, &q->wk)) return "wk";
        if (!same_w(&p->wv, &q->wv)) return "wv";
        if (!same_w(&p->wo, &q->wo)) return "wo";
        if (!same_w(&p->w_gate, &q->w_gate)) return "w_gate";
        if (!same_w(&p->w_up, &q->w_up)) return "w_up";
        if (!same_w(&p->w_down, &q->w_down)) return "w_down";
    }
    return NULL;
}

TEST(llama2c_stories_matches_gguf) {
    const char *bin = test_model_path("stories260K.bin"), *gg = test_model_path("stories260K.gguf");
    if (!coopt_path_exists(bin) || !coopt_path_exists(gg)) SKIP(t, "stories260K.bin/.gguf not found");
    struct coopt_model *a, *b = new_model();
    enum coopt_status   sa = load(bin, NULL, &a); // finds tok512.bin beside the checkpoint
    enum coopt_status   sb = coopt_gguf_load_model(b, gg);
    const struct coopt_model_config *c = &a->config;
    bool cfg = c->dim == 64 && c->ffn_dim == 172 && c->n_layers == 5 && c->n_heads == 8 && c->n_kv_heads == 4 &&
               c->n_vocab == 512 && c->head_dim == 8 && c->tied_embeddings && c->n_ctx_train == 512 &&
               c->rope_layout == COOPT_ROPE_INTERLEAVED && a->output.data == a->tok_embd.data;
    bool        tok  = a->tokenizer && coopt_tokenizer_n_vocab(a->tokenizer) == 512;
    const char *diff = sa == COOPT_OK && sb == COOPT_OK ? compare_models(a, b) : "load";
    coopt_model_free(a);
    coopt_model_free(b);
    CHECK(t, sa == COOPT_OK && sb == COOPT_OK);
    CHECK(t, cfg && tok);
    CHECKF(t, diff == NULL, "first difference: %s", diff);
}

// Builds a version-1 export (and an untied legacy file) from stories260K.bin in a temp dir.
TEST(llama2c_v1_and_untied) {
    const char *bin = test_model_path("stories260K.bin"), *tokf = test_model_path("tok512.bin");
    char       *data;
    size_t      n;
    if (coopt_read_file(bin, &data, &n) != COOPT_OK) SKIP(t, "stories260K.bin not found");
    char tokpath[1024];
    snprintf(tokpath, sizeof(tokpath), "%s", tokf);
    int32_t h[7];
    memcpy(h, data, 28);
    int64_t dim = h[0], hid = h[1], L = h[2], kvd = h[4] * (h[0] / h[3]), V = h[5], S = h[6], hs = h[0] / h[3];
    const float *f = (const float *)(data + 28);
    // legacy offsets (floats)
    int64_t o_emb = 0, o_ra = V * dim, o_wq = o_ra + L * dim, o_wk = o_wq + L * dim * dim, o_wv = o_wk + L * kvd * dim;
    int64_t o_wo = o_wv + L * kvd * dim, o_rf = o_wo + L * dim * dim, o_w1 = o_rf + L * dim, o_w2 = o_w1 + L * hid * dim;
    int64_t o_w3 = o_w2 + L * hid * dim, o_fin = o_w3 + L * hid * dim, o_end = o_fin + dim + S * hs;
    CHECK(t, (size_t)o_end * 4 + 28 == n);
    size_t   nv1 = 256 + (size_t)(o_end - S * hs) * 4;
    uint8_t *v1  = calloc(1, nv1);
    uint32_t magic = 0x616b3432;
    int32_t  ver   = 1;
    memcpy(v1, &magic, 4), memcpy(v1 + 4, &ver, 4), memcpy(v1 + 8, h, 28);
    v1[36]     = 1; // shared classifier
    float *dst = (float *)(v1 + 256);
    struct { int64_t off, len; } order[] = {
        {o_ra, L * dim}, {o_rf, L * dim}, {o_fin, dim}, {o_emb, V * dim}, {o_wq, L * dim * dim},
        {o_wk, L * kvd * dim}, {o_wv, L * kvd * dim}, {o_wo, L * dim * dim}, {o_w1, L * hid * dim},
        {o_w2, L * hid * dim}, {o_w3, L * hid * dim},
    };
    for (size_t i = 0; i < COOPT_ARRAY_LEN(order); i++) {
        memcpy(dst, f + order[i].off, (size_t)order[i].len * 4);
        dst += order[i].len;
    }
    char dir[256], p1[512], p2[512], p3[512];
    const char *base = getenv("TMPDIR");
    snprintf(dir, sizeof(dir), "%s/coopt-l2c-XXXXXX", base && *base ? base : "/tmp");
    bool ok = mkdtemp(dir) != NULL;
    snprintf(p1, sizeof(p1), "%s/v1.bin", dir);
    snprintf(p2, sizeof(p2), "%s/untied.bin", dir);
    snprintf(p3, sizeof(p3), "%s/v2.bin", dir);
    ok = ok && write_file(p1, v1, nv1, NULL, 0);
    // untied legacy: negative vocab, classifier = the embedding scaled by 2 appended
    float *wcls = malloc((size_t)(V * dim) * 4);
    for (int64_t i = 0; i < V * dim; i++) wcls[i] = f[o_emb + i] * 2;
    int32_t neg = -h[5];
    memcpy(data + 20, &neg, 4);
    ok = ok && write_file(p2, data, n, wcls, (size_t)(V * dim) * 4);
    ver = 2;
    memcpy(v1 + 4, &ver, 4);
    ok = ok && write_file(p3, v1, nv1, NULL, 0);

    struct coopt_model *ref, *m1, *m2, *m3;
    enum coopt_status   s0 = load(bin, NULL, &ref);
    enum coopt_status   s1 = load(p1, tokpath, &m1);
    enum coopt_status   s2 = load(p2, tokpath, &m2);
    int                 q  = test_quiet_begin();
    enum coopt_status   s3 = load(p3, tokpath, &m3);
    test_quiet_end(q);
    const char *d1 = s0 == COOPT_OK && s1 == COOPT_OK ? compare_models(ref, m1) : "load";
    bool untied = s2 == COOPT_OK && !m2->config.tied_embeddings && m2->output.data != m2->tok_embd.data &&
                  ((const float *)m2->output.data)[777] == 2 * ((const float *)m2->tok_embd.data)[777] &&
                  m2->config.n_vocab == 512;
    coopt_model_free(ref);
    coopt_model_free(m1);
    coopt_model_free(m2);
    coopt_model_free(m3);
    unlink(p1), unlink(p2), unlink(p3), rmdir(dir);
    free(v1), free(wcls), free(data);
    CHECK(t, ok && s0 == COOPT_OK && s1 == COOPT_OK && s2 == COOPT_OK);
    CHECKF(t, d1 == NULL, "v1 export differs from legacy: %s", d1);
    CHECK(t, untied);
    CHECK(t, s3 == COOPT_ERR_UNSUPPORTED);
}

TEST(llama2c_errors) {
    const char *bin = test_model_path("stories260K.bin");
    char       *data;
    size_t      n;
    if (coopt_read_file(bin, &data, &n) != COOPT_OK) SKIP(t, "stories260K.bin not found");
    char dir[256], p[512], tokpath[1024], missing[600];
    snprintf(tokpath, sizeof(tokpath), "%s", test_model_path("tok512.bin"));
    const char *base = getenv("TMPDIR");
    snprintf(dir, sizeof(dir), "%s/coopt-l2c-XXXXXX", base && *base ? base : "/tmp");
    CHECK(t, mkdtemp(dir) != NULL);
    snprintf(p, sizeof(p), "%s/m.bin", dir);
    snprintf(missing, sizeof(missing), "%s/nope.bin", dir);
    // truncations (every size check), a header of zeros, an inconsistent header
    size_t cuts[] = {1, 3, 27, 28, 29, 1000, n / 2, n - 4, n - 1};
    int    bad = -1, q = test_quiet_begin();
    enum coopt_status st = COOPT_OK;
    struct coopt_model *m = NULL;
    for (size_t i = 0; i < COOPT_ARRAY_LEN(cuts) && bad < 0; i++) {
        st = write_file(p, data, cuts[i], NULL, 0) ? load(p, tokpath, &m) : COOPT_ERR_IO;
        coopt_model_free(m), m = NULL;
        if (st != COOPT_ERR_FORMAT) bad = (int)i;
    }
    enum coopt_status extra = COOPT_OK, zeros = COOPT_OK, heads = COOPT_OK, notok = COOPT_OK, envmiss = COOPT_OK,
                      found = COOPT_ERR_IO;
    if (bad < 0) {
        // one float too many
        float z = 0;
        extra   = write_file(p, data, n, &z, 4) ? load(p, tokpath, &m) : COOPT_ERR_IO;
        coopt_model_free(m), m = NULL;
        uint8_t zero[28] = {0};
        zeros            = write_file(p, zero, 28, NULL, 0) ? load(p, tokpath, &m) : COOPT_ERR_IO;
        coopt_model_free(m), m = NULL;
        int32_t three = 3; // n_kv_heads 3 does not divide n_heads 8
        memcpy(data + 16, &three, 4);
        heads = write_file(p, data, n, NULL, 0) ? load(p, tokpath, &m) : COOPT_ERR_IO;
        coopt_model_free(m), m = NULL;
        int32_t four = 4;
        memcpy(data + 16, &four, 4);
        // the valid model with no tokenizer beside it, then COOPT_TOKENIZER naming a missing file
        notok = write_file(p, data, n, NULL, 0) ? load(p, NULL, &m) : COOPT_ERR_FORMAT;
        coopt_model_free(m), m = NULL;
        envmiss = load(p, missing, &m);
        coopt_model_free(m), m = NULL;
        // tok512.bin copied beside it is found by name
        char  *tk;
        size_t tn;
        char   tp[600];
        snprintf(tp, sizeof(tp), "%s/tok512.bin", dir);
        if (coopt_read_file(tokpath, &tk, &tn) == COOPT_OK && write_file(tp, tk, tn, NULL, 0)) {
            found = load(p, NULL, &m);
            coopt_model_free(m), m = NULL;
            free(tk);
        }
        unlink(tp);
    }
    test_quiet_end(q);
    unlink(p);
    rmdir(dir);
    free(data);
    CHECKF(t, bad < 0, "cut at %zu bytes: got %s", bad >= 0 ? cuts[bad] : 0, coopt_status_str(st));
    CHECK(t, extra == COOPT_ERR_FORMAT && zeros == COOPT_ERR_FORMAT && heads == COOPT_ERR_FORMAT);
    CHECK(t, notok == COOPT_ERR_IO && envmiss == COOPT_ERR_IO);
    CHECK(t, found == COOPT_OK);
}
