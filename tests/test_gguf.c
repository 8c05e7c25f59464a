/*
 * test_gguf.c -- GGUF reader, writer and llama loader: the real stories260K.gguf, files made
 * by the writer, and corrupt variants (built by the writer or by patching bytes) that must all
 * give the right status without a crash or a leak.
 */
#include "dtype.h"
#include "gguf.h"
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

// ---- helpers ----


// A fresh temp directory path; files go in it and are removed by the test.
static bool make_tmpdir(char *dir, size_t cap) {
    const char *base = getenv("TMPDIR");
    snprintf(dir, cap, "%s/coopt-gguf-XXXXXX", base && *base ? base : "/tmp");
    return mkdtemp(dir) != NULL;
}

// Parses a heap copy of exactly n bytes (so ASan sees any over-read).
static enum coopt_status parse_copy(const uint8_t *data, size_t n) {
    uint8_t *copy = malloc(n ? n : 1);
    if (n) memcpy(copy, data, n);
    struct coopt_gguf *g  = NULL;
    enum coopt_status  st = coopt_gguf_parse(copy, n, "test.gguf", &g);
    if (st == COOPT_OK) {
        // exercise the getters on whatever parsed
        int saved = test_quiet_begin();
        for (int64_t i = 0; i < g->n_kv; i++) {
            uint32_t u;
            float    f;
            coopt_gguf_get_u32(g, g->kv[i].key, false, &u);
            coopt_gguf_get_f32(g, g->kv[i].key, false, &f);
        }
        test_quiet_end(saved);
    } else if (g != NULL) {
        st = COOPT_ERR_INVALID; // out-param must be NULL on failure
    }
    coopt_gguf_close(g);
    free(copy);
    return st;
}

static uint8_t *find_bytes(uint8_t *hay, size_t n, const char *needle) {
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (memcmp(hay + i, needle, k) == 0) return hay + i;
    return NULL;
}

static enum coopt_status fill_ramp(void *user, struct coopt_gguf_sink *sink) {
    const int *n = user;
    // stream in small pieces to exercise the sink
    for (int i = 0; i < *n; i++) {
        float v = (float)i * 0.5f;
        enum coopt_status st = coopt_gguf_sink_write(sink, &v, 4);
        if (st != COOPT_OK) return st;
    }
    return COOPT_OK;
}

// A small file with every value type, a nested array, alignment 64 and three tensors, read
// into memory (caller frees). Returns NULL on failure.
static uint8_t *small_file(const char *dir, size_t *size, uint32_t alignment) {
    static float   mat[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    static uint8_t q8[34];
    static int     ramp_n = 6;
    for (int i = 0; i < 34; i++) q8[i] = (uint8_t)i;
    char path[512];
    snprintf(path, sizeof(path), "%s/small.gguf", dir);
    struct coopt_gguf_writer *w;
    if (coopt_gguf_writer_init(&w) != COOPT_OK) return NULL;
    int8_t             i8s[3]   = {-1, 2, -3};
    uint16_t           u16s[2]  = {65535, 7};
    double             f64s[2]  = {0.25, -1e300};
    int64_t            i64s[2]  = {-5, INT64_MAX};
    const char *const  strs[3]  = {"a", "", "hello"};
    const int64_t      ne_m[2]  = {4, 2}, ne_q[1] = {32}, ne_r[1] = {6};
    bool ok = coopt_gguf_writer_set_alignment(w, alignment) == COOPT_OK &&
              coopt_gguf_writer_set_str(w, "general.architecture", "llama") == COOPT_OK &&
              coopt_gguf_writer_set_str(w, "general.name", "small") == COOPT_OK &&
              coopt_gguf_writer_set_u32(w, "test.u32", 4000000000u) == COOPT_OK &&
              coopt_gguf_writer_set_i32(w, "test.i32", -7) == COOPT_OK &&
              coopt_gguf_writer_set_u64(w, "test.u64", 1ull << 40) == COOPT_OK &&
              coopt_gguf_writer_set_f32(w, "test.f32", 1.5f) == COOPT_OK &&
              coopt_gguf_writer_set_bool(w, "test.bool", true) == COOPT_OK &&
              coopt_gguf_writer_set_arr(w, "test.arr_i8", COOPT_GGUF_I8, i8s, 3) == COOPT_OK &&
              coopt_gguf_writer_set_arr(w, "test.arr_u16", COOPT_GGUF_U16, u16s, 2) == COOPT_OK &&
              coopt_gguf_writer_set_arr(w, "test.arr_f64", COOPT_GGUF_F64, f64s, 2) == COOPT_OK &&
              coopt_gguf_writer_set_arr(w, "test.arr_i64", COOPT_GGUF_I64, i64s, 2) == COOPT_OK &&
              coopt_gguf_writer_set_arr_str(w, "test.arr_str", strs, NULL, 3) == COOPT_OK &&
              coopt_gguf_writer_add_tensor(w, "mat", COOPT_GGML_F32, 2, ne_m, mat, NULL, NULL) == COOPT_OK &&
              coopt_gguf_writer_add_tensor(w, "q8x", COOPT_GGML_Q8_0, 1, ne_q, q8, NULL, NULL) == COOPT_OK &&
              coopt_gguf_writer_add_tensor(w, "ramp", COOPT_GGML_F32, 1, ne_r, NULL, fill_ramp, &ramp_n) == COOPT_OK;
    // nested array: array of 2 arrays of u32 (hand-encoded, copied through copy_kv)
    uint8_t  nested[12 + 2 * (12 + 8)];
    uint32_t et = COOPT_GGUF_ARRAY, eu = COOPT_GGUF_U32, v[2] = {11, 22};
    uint64_t n2 = 2;
    uint8_t *p  = nested;
    memcpy(p, &et, 4), memcpy(p + 4, &n2, 8), p += 12;
    for (int k = 0; k < 2; k++) memcpy(p, &eu, 4), memcpy(p + 4, &n2, 8), memcpy(p + 12, v, 8), p += 20;
    struct coopt_gguf_kv kv = {.key = "test.nested", .val = {.type = COOPT_GGUF_ARRAY, .raw = nested, .raw_bytes = sizeof(nested)}};
    ok = ok && coopt_gguf_writer_copy_kv(w, &kv) == COOPT_OK;
    ok = ok && coopt_gguf_writer_write(w, path) == COOPT_OK;
    coopt_gguf_writer_free(w);
    char  *data = NULL;
    size_t n    = 0;
    if (ok && coopt_read_file(path, &data, &n) != COOPT_OK) ok = false;
    unlink(path);
    *size = n;
    return ok ? (uint8_t *)data : (free(data), NULL);
}

// ---- the real file ----

TEST(gguf_parse_stories) {
    struct coopt_gguf *g;
    enum coopt_status  st = coopt_gguf_open(test_model_path("stories260K.gguf"), &g);
    if (st == COOPT_ERR_IO) SKIP(t, "stories260K.gguf not found (set COOPT_MODELS)");
    CHECK(t, st == COOPT_OK);
    CHECK(t, g->version == 3 && g->n_tensors == 48 && g->n_kv == 19 && g->alignment == 32);
    CHECK(t, g->data_offset % 32 == 0);
    uint32_t u = 0;
    CHECK(t, coopt_gguf_get_u32(g, "llama.block_count", true, &u) == COOPT_OK && u == 5);
    CHECK(t, coopt_gguf_get_u32(g, "llama.embedding_length", true, &u) == COOPT_OK && u == 64);
    CHECK(t, coopt_gguf_get_u32(g, "llama.feed_forward_length", true, &u) == COOPT_OK && u == 172);
    int32_t i = 0;
    CHECK(t, coopt_gguf_get_i32(g, "llama.attention.head_count_kv", true, &i) == COOPT_OK && i == 4);
    uint64_t u64 = 0;
    CHECK(t, coopt_gguf_get_u64(g, "llama.context_length", true, &u64) == COOPT_OK && u64 == 2048);
    float f = 0;
    CHECK(t, coopt_gguf_get_f32(g, "llama.attention.layer_norm_rms_epsilon", true, &f) == COOPT_OK && f == 1e-5f);
    CHECK(t, coopt_gguf_get_f32(g, "llama.attention.head_count", true, &f) == COOPT_OK && f == 8.0f); // int -> f32
    const char *s;
    size_t      len;
    CHECK(t, coopt_gguf_get_str(g, "general.architecture", true, &s, &len) == COOPT_OK && len == 5 &&
                 memcmp(s, "llama", 5) == 0);
    // padding_token_id is 0xffffffff: out of int32 range
    int saved = test_quiet_begin();
    enum coopt_status bad_i32 = coopt_gguf_get_i32(g, "tokenizer.ggml.padding_token_id", true, &i);
    enum coopt_status bad_str = coopt_gguf_get_str(g, "llama.block_count", true, &s, &len);
    enum coopt_status missing = coopt_gguf_get_u32(g, "llama.nope", true, &u);
    test_quiet_end(saved);
    CHECK(t, bad_i32 == COOPT_ERR_FORMAT && bad_str == COOPT_ERR_FORMAT && missing == COOPT_ERR_FORMAT);
    u = 77;
    CHECK(t, coopt_gguf_get_u32(g, "llama.nope", false, &u) == COOPT_OK && u == 77); // default kept

    struct coopt_gguf_value arr;
    CHECK(t, coopt_gguf_get_arr(g, "tokenizer.ggml.tokens", true, &arr) == COOPT_OK);
    CHECK(t, arr.elem_type == COOPT_GGUF_STRING && arr.n == 512);
    const char *ptrs[512];
    uint32_t    lens[512];
    CHECK(t, coopt_gguf_arr_strings(g, "tokenizer.ggml.tokens", &arr, ptrs, lens) == COOPT_OK);
    CHECK(t, lens[0] == 5 && memcmp(ptrs[0], "<unk>", 5) == 0);
    CHECK(t, lens[1] == 3 && memcmp(ptrs[1], "<s>", 3) == 0);
    CHECK(t, lens[3] == 6 && memcmp(ptrs[3], "<0x00>", 6) == 0);

    const struct coopt_gguf_tensor *te = coopt_gguf_find_tensor(g, "token_embd.weight");
    CHECK(t, te && te->ggml_type == COOPT_GGML_F32 && te->n_dims == 2 && te->ne[0] == 64 && te->ne[1] == 512);
    CHECK(t, te->n_bytes == 64 * 512 * 4 && (const uint8_t *)te->data == g->base + g->data_offset + te->offset);
    CHECK(t, coopt_gguf_find_tensor(g, "blk.4.ffn_down.weight") != NULL);
    CHECK(t, coopt_gguf_find_tensor(g, "blk.5.ffn_down.weight") == NULL);
    coopt_gguf_close(g);
}

static struct coopt_model *new_model(void) {
    struct coopt_model *m = calloc(1, sizeof(*m));
    m->gen_temp = NAN, m->gen_top_p = NAN, m->gen_top_k = -1;
    return m;
}

TEST(gguf_load_model_stories) {
    const char *path = test_model_path("stories260K.gguf");
    if (!coopt_path_exists(path)) SKIP(t, "stories260K.gguf not found (set COOPT_MODELS)");
    struct coopt_model *m  = new_model();
    enum coopt_status   st = coopt_gguf_load_model(m, path);
    CHECKF(t, st == COOPT_OK, "status %s", coopt_status_str(st));
    const struct coopt_model_config *c = &m->config;
    CHECK(t, c->dim == 64 && c->ffn_dim == 172 && c->n_layers == 5 && c->n_heads == 8 && c->n_kv_heads == 4);
    CHECK(t, c->n_vocab == 512 && c->head_dim == 8 && c->n_ctx_train == 2048 && c->sliding_window == 0);
    CHECK(t, c->norm_eps == 1e-5f && c->rope_theta == 10000.0f && c->rope_layout == COOPT_ROPE_INTERLEAVED);
    CHECK(t, c->rope_scaling == COOPT_ROPE_SCALING_NONE);
    CHECK(t, c->tied_embeddings && m->output.data == m->tok_embd.data); // stored twice, identical bytes
    CHECK(t, m->tok_embd.dtype == COOPT_DTYPE_F32 && m->tok_embd.n_in == 64 && m->tok_embd.n_out == 512);
    const struct coopt_layer *l = &m->layers[3];
    CHECK(t, l->wq.n_in == 64 && l->wq.n_out == 64 && l->wk.n_out == 32 && l->wv.n_out == 32);
    CHECK(t, l->w_gate.n_in == 64 && l->w_gate.n_out == 172 && l->w_down.n_in == 172 && l->w_down.n_out == 64);
    CHECK(t, l->attn_norm && l->ffn_norm && m->out_norm && isfinite(l->attn_norm[63]));
    CHECK(t, m->tokenizer && coopt_tokenizer_n_vocab(m->tokenizer) == 512);
    CHECK(t, coopt_tokenizer_bos(m->tokenizer) == 1 && coopt_tokenizer_eos(m->tokenizer) == 2);
    coopt_model_free(m);

    struct coopt_tokenizer *tok;
    CHECK(t, coopt_gguf_load_tokenizer(path, &tok) == COOPT_OK);
    CHECK(t, coopt_tokenizer_n_vocab(tok) == 512);
    coopt_tokenizer_free(tok);
}

// ---- writer ----

TEST(gguf_writer_small) {
    char dir[256];
    CHECK(t, make_tmpdir(dir, sizeof(dir)));
    size_t   n;
    uint8_t *data = small_file(dir, &n, 64);
    rmdir(dir);
    CHECK(t, data != NULL);
    struct coopt_gguf *g;
    CHECK(t, coopt_gguf_parse(data, n, "small.gguf", &g) == COOPT_OK);
    CHECK(t, g->version == 3 && g->alignment == 64 && g->data_offset % 64 == 0 && g->n_tensors == 3);
    uint32_t u;
    int32_t  i;
    uint64_t u64;
    float    f;
    bool     b = false;
    CHECK(t, coopt_gguf_get_u32(g, "test.u32", true, &u) == COOPT_OK && u == 4000000000u);
    CHECK(t, coopt_gguf_get_i32(g, "test.i32", true, &i) == COOPT_OK && i == -7);
    CHECK(t, coopt_gguf_get_u64(g, "test.u64", true, &u64) == COOPT_OK && u64 == 1ull << 40);
    CHECK(t, coopt_gguf_get_f32(g, "test.f32", true, &f) == COOPT_OK && f == 1.5f);
    CHECK(t, coopt_gguf_get_f32(g, "test.i32", true, &f) == COOPT_OK && f == -7.0f);
    CHECK(t, coopt_gguf_get_bool(g, "test.bool", true, &b) == COOPT_OK && b);
    int saved = test_quiet_begin();
    enum coopt_status neg_u32 = coopt_gguf_get_u32(g, "test.i32", true, &u); // -7 is not a u32
    enum coopt_status big_i32 = coopt_gguf_get_i32(g, "test.u32", true, &i); // 4e9 is not an i32
    test_quiet_end(saved);
    CHECK(t, neg_u32 == COOPT_ERR_FORMAT && big_i32 == COOPT_ERR_FORMAT);

    struct coopt_gguf_value a;
    int32_t                 iv[3];
    float                   fv[3];
    CHECK(t, coopt_gguf_get_arr(g, "test.arr_i8", true, &a) == COOPT_OK && a.n == 3);
    CHECK(t, coopt_gguf_arr_i32(g, "test.arr_i8", &a, iv) == COOPT_OK && iv[0] == -1 && iv[1] == 2 && iv[2] == -3);
    CHECK(t, coopt_gguf_get_arr(g, "test.arr_u16", true, &a) == COOPT_OK);
    CHECK(t, coopt_gguf_arr_i32(g, "test.arr_u16", &a, iv) == COOPT_OK && iv[0] == 65535 && iv[1] == 7);
    CHECK(t, coopt_gguf_get_arr(g, "test.arr_f64", true, &a) == COOPT_OK);
    CHECK(t, coopt_gguf_arr_f32(g, "test.arr_f64", &a, fv) == COOPT_OK && fv[0] == 0.25f && isinf(fv[1]));
    CHECK(t, coopt_gguf_get_arr(g, "test.arr_i64", true, &a) == COOPT_OK);
    saved                     = test_quiet_begin();
    enum coopt_status big_i64 = coopt_gguf_arr_i32(g, "test.arr_i64", &a, iv);
    test_quiet_end(saved);
    CHECK(t, big_i64 == COOPT_ERR_FORMAT);
    const char *sp[3];
    uint32_t    sl[3];
    CHECK(t, coopt_gguf_get_arr(g, "test.arr_str", true, &a) == COOPT_OK);
    CHECK(t, coopt_gguf_arr_strings(g, "test.arr_str", &a, sp, sl) == COOPT_OK);
    CHECK(t, sl[0] == 1 && sl[1] == 0 && sl[2] == 5 && memcmp(sp[2], "hello", 5) == 0);
    CHECK(t, coopt_gguf_get_arr(g, "test.nested", true, &a) == COOPT_OK);
    CHECK(t, a.elem_type == COOPT_GGUF_ARRAY && a.n == 2 && a.n_bytes == 40);

    const struct coopt_gguf_tensor *tm = coopt_gguf_find_tensor(g, "mat");
    const struct coopt_gguf_tensor *tq = coopt_gguf_find_tensor(g, "q8x");
    const struct coopt_gguf_tensor *tr = coopt_gguf_find_tensor(g, "ramp");
    CHECK(t, tm && tq && tr);
    CHECK(t, tm->ne[0] == 4 && tm->ne[1] == 2 && tm->n_bytes == 32 && ((const float *)tm->data)[7] == 8.0f);
    CHECK(t, tq->n_bytes == 34 && ((const uint8_t *)tq->data)[33] == 33 && tq->offset % 64 == 0);
    CHECK(t, tr->n_bytes == 24 && ((const float *)tr->data)[5] == 2.5f && tr->offset % 64 == 0);
    enum coopt_dtype dt;
    CHECK(t, coopt_gguf_tensor_dtype(g, tq, &dt) == COOPT_OK && dt == COOPT_DTYPE_Q8_0);
    coopt_gguf_close(g);
    free(data);
}

static enum coopt_status fill_short(void *user, struct coopt_gguf_sink *sink) {
    float v = 1;
    return coopt_gguf_sink_write(sink, &v, 4); // the tensor needs 8 bytes
}

TEST(gguf_writer_errors) {
    char dir[256], path[512];
    CHECK(t, make_tmpdir(dir, sizeof(dir)));
    snprintf(path, sizeof(path), "%s/bad.gguf", dir);
    struct coopt_gguf_writer *w;
    CHECK(t, coopt_gguf_writer_init(&w) == COOPT_OK);
    int64_t ne[2] = {2, 1}, ne_q[1] = {33};
    float   x[2]  = {1, 2};
    int     saved = test_quiet_begin();
    enum coopt_status s1 = coopt_gguf_writer_set_alignment(w, 48);
    enum coopt_status s2 = coopt_gguf_writer_add_tensor(w, "q", COOPT_GGML_Q8_0, 1, ne_q, x, NULL, NULL);
    enum coopt_status s3 = coopt_gguf_writer_add_tensor(w, "u", 99, 1, ne, x, NULL, NULL);
    enum coopt_status s4 = coopt_gguf_writer_add_tensor(w, "a", COOPT_GGML_F32, 2, ne, x, NULL, NULL);
    enum coopt_status s5 = coopt_gguf_writer_add_tensor(w, "a", COOPT_GGML_F32, 2, ne, x, NULL, NULL);
    enum coopt_status s6 = coopt_gguf_writer_add_tensor(w, "b", COOPT_GGML_F32, 2, ne, NULL, fill_short, NULL);
    enum coopt_status s7 = coopt_gguf_writer_write(w, path);
    test_quiet_end(saved);
    coopt_gguf_writer_free(w);
    bool left = coopt_path_exists(path);
    rmdir(dir);
    CHECK(t, s1 == COOPT_ERR_INVALID && s2 == COOPT_ERR_INVALID && s3 == COOPT_ERR_INVALID);
    CHECK(t, s4 == COOPT_OK && s5 == COOPT_ERR_INVALID && s6 == COOPT_OK);
    CHECK(t, s7 == COOPT_ERR_INVALID && !left); // short fill: error, partial file removed
}

// Copies `g` into a new file, dropping tensor `skip` and substituting tensor `replace_name` by
// one of ggml type `replace_type` (same shape) when given; then applies a string override.
static enum coopt_status rewrite(const struct coopt_gguf *g, const char *path, const char *skip,
                                 const char *replace_name, uint32_t replace_type, const char *arch) {
    struct coopt_gguf_writer *w;
    enum coopt_status         st = coopt_gguf_writer_init(&w);
    if (st != COOPT_OK) return st;
    static uint8_t zeros[1 << 16];
    for (int64_t i = 0; st == COOPT_OK && i < g->n_kv; i++) st = coopt_gguf_writer_copy_kv(w, &g->kv[i]);
    if (st == COOPT_OK && arch) st = coopt_gguf_writer_set_str(w, "general.architecture", arch);
    for (int64_t i = 0; st == COOPT_OK && i < g->n_tensors; i++) {
        const struct coopt_gguf_tensor *t = &g->tensors[i];
        if (skip && strcmp(t->name, skip) == 0) continue;
        if (replace_name && strcmp(t->name, replace_name) == 0) {
            int64_t ne[4] = {t->ne[0] < 256 ? 256 : t->ne[0], t->ne[1], 1, 1};
            st = coopt_gguf_writer_add_tensor(w, t->name, replace_type, t->n_dims, ne, zeros, NULL, NULL);
            continue;
        }
        st = coopt_gguf_writer_add_tensor(w, t->name, t->ggml_type, t->n_dims, t->ne, t->data, NULL, NULL);
    }
    if (st == COOPT_OK) st = coopt_gguf_writer_write(w, path);
    coopt_gguf_writer_free(w);
    return st;
}

TEST(gguf_writer_roundtrip_stories) {
    struct coopt_gguf *a, *b;
    if (coopt_gguf_open(test_model_path("stories260K.gguf"), &a) != COOPT_OK) SKIP(t, "stories260K.gguf not found");
    char dir[256], path[512];
    CHECK(t, make_tmpdir(dir, sizeof(dir)));
    snprintf(path, sizeof(path), "%s/rt.gguf", dir);
    enum coopt_status st = rewrite(a, path, NULL, NULL, 0, NULL);
    enum coopt_status st2 = st == COOPT_OK ? coopt_gguf_open(path, &b) : st;
    unlink(path); // the mapping stays valid
    rmdir(dir);
    if (st != COOPT_OK || st2 != COOPT_OK) coopt_gguf_close(a);
    CHECK(t, st == COOPT_OK && st2 == COOPT_OK);
    bool same = a->n_kv == b->n_kv && a->n_tensors == b->n_tensors && a->alignment == b->alignment;
    for (int64_t i = 0; same && i < a->n_kv; i++) {
        const struct coopt_gguf_kv *x = &a->kv[i], *y = &b->kv[i];
        same = strcmp(x->key, y->key) == 0 && x->val.type == y->val.type && x->val.raw_bytes == y->val.raw_bytes &&
               memcmp(x->val.raw, y->val.raw, x->val.raw_bytes) == 0;
    }
    for (int64_t i = 0; same && i < a->n_tensors; i++) {
        const struct coopt_gguf_tensor *x = &a->tensors[i], *y = &b->tensors[i];
        same = strcmp(x->name, y->name) == 0 && x->ggml_type == y->ggml_type && x->n_dims == y->n_dims &&
               memcmp(x->ne, y->ne, sizeof(x->ne)) == 0 && x->n_bytes == y->n_bytes &&
               memcmp(x->data, y->data, x->n_bytes) == 0 && x->offset == y->offset;
    }
    // the original was written with the same layout rules, so even the file sizes agree
    // (the writer does not pad after the last tensor; the original may)
    bool sized = b->size <= a->size && a->size - b->size < a->alignment;
    coopt_gguf_close(a);
    coopt_gguf_close(b);
    CHECK(t, same);
    CHECK(t, sized);
}

// ---- corrupt files ----

TEST(gguf_corrupt_truncated_prefixes) {
    char dir[256];
    CHECK(t, make_tmpdir(dir, sizeof(dir)));
    size_t   n;
    uint8_t *data = small_file(dir, &n, 32);
    rmdir(dir);
    CHECK(t, data != NULL);
    CHECK(t, parse_copy(data, n) == COOPT_OK);
    int    saved = test_quiet_begin();
    size_t bad   = SIZE_MAX;
    for (size_t k = 0; k < n && bad == SIZE_MAX; k++) {
        enum coopt_status st = parse_copy(data, k);
        if (st != COOPT_ERR_FORMAT) bad = k;
    }
    test_quiet_end(saved);
    free(data);
    CHECKF(t, bad == SIZE_MAX, "prefix of %zu bytes (of %zu) did not give COOPT_ERR_FORMAT", bad, n);
}

TEST(gguf_corrupt_patched) {
    char dir[256];
    CHECK(t, make_tmpdir(dir, sizeof(dir)));
    size_t   n;
    uint8_t *orig = small_file(dir, &n, 32);
    rmdir(dir);
    CHECK(t, orig != NULL);
    uint8_t *d = malloc(n);
    struct {
        const char       *what;
        enum coopt_status want;
    } cases[] = {
        {"bad magic", COOPT_ERR_FORMAT},
        {"version 1", COOPT_ERR_UNSUPPORTED},
        {"version 4", COOPT_ERR_UNSUPPORTED},
        {"big-endian", COOPT_ERR_UNSUPPORTED},
        {"huge n_kv", COOPT_ERR_FORMAT},
        {"huge n_tensors", COOPT_ERR_FORMAT},
        {"string length past EOF", COOPT_ERR_FORMAT},
        {"key length past EOF", COOPT_ERR_FORMAT},
        {"huge array count", COOPT_ERR_FORMAT},
        {"array of unknown type", COOPT_ERR_FORMAT},
        {"unknown value type", COOPT_ERR_FORMAT},
        {"tensor offset out of range", COOPT_ERR_FORMAT},
        {"misaligned offset", COOPT_ERR_FORMAT},
        {"unknown ggml type", COOPT_ERR_UNSUPPORTED},
        {"n_dims 5", COOPT_ERR_FORMAT},
        {"n_dims 0", COOPT_ERR_FORMAT},
        {"ne overflow", COOPT_ERR_FORMAT},
        {"q8 row not a block multiple", COOPT_ERR_FORMAT},
        {"duplicate tensor", COOPT_ERR_FORMAT},
        {"duplicate key", COOPT_ERR_FORMAT},
        {"bad alignment", COOPT_ERR_FORMAT},
        {"NUL in key", COOPT_ERR_FORMAT},
    };
    int saved = test_quiet_begin();
    int fail  = -1;
    enum coopt_status got = COOPT_OK;
    for (int c = 0; c < (int)COOPT_ARRAY_LEN(cases) && fail < 0; c++) {
        memcpy(d, orig, n);
        // field locations: after a key name come its u32 type and the value; after a tensor
        // name come u32 n_dims, ne[n_dims] u64, u32 type, u64 offset
        uint8_t *name_kv   = find_bytes(d, n, "general.name") + 12;
        uint8_t *arr_str   = find_bytes(d, n, "test.arr_str") + 12;
        uint8_t *t_mat     = find_bytes(d, n, "mat\x02") + 3; // name "mat" then n_dims 2
        uint8_t *t_q8      = find_bytes(d, n, "q8x\x01") + 3;
        uint32_t u32;
        uint64_t u64;
        switch (c) {
        case 0: d[0] = 'X'; break;
        case 1: u32 = 1, memcpy(d + 4, &u32, 4); break;
        case 2: u32 = 4, memcpy(d + 4, &u32, 4); break;
        case 3: u32 = 3u << 24, memcpy(d + 4, &u32, 4); break;
        case 4: u64 = 1ull << 60, memcpy(d + 16, &u64, 8); break;
        case 5: u64 = 1ull << 60, memcpy(d + 8, &u64, 8); break;
        case 6: u64 = n, memcpy(name_kv + 4, &u64, 8); break;                 // general.name value length
        case 7: u64 = UINT64_MAX - 3, memcpy(name_kv - 12 - 8, &u64, 8); break; // the key's own length
        case 8: u64 = 1ull << 62, memcpy(arr_str + 8, &u64, 8); break;         // elem type u32 then count
        case 9: u32 = 77, memcpy(arr_str + 4, &u32, 4); break;
        case 10: u32 = 13, memcpy(name_kv, &u32, 4); break;
        case 11: u64 = 1ull << 20, memcpy(t_mat + 4 + 16 + 4, &u64, 8); break;
        case 12: memcpy(&u64, t_q8 + 4 + 8 + 4, 8), u64 += 4, memcpy(t_q8 + 4 + 8 + 4, &u64, 8); break;
        case 13: u32 = 99, memcpy(t_mat + 4 + 16, &u32, 4); break;
        case 14: u32 = 5, memcpy(t_mat, &u32, 4); break;
        case 15: u32 = 0, memcpy(t_mat, &u32, 4); break;
        case 16: u64 = 1ull << 62, memcpy(t_mat + 4, &u64, 8), memcpy(t_mat + 12, &u64, 8); break;
        case 17: u64 = 33, memcpy(t_q8 + 4, &u64, 8); break;
        case 18: memcpy(t_mat - 3, "q8x", 3); break;
        case 19: memcpy(find_bytes(d, n, "test.i32"), "test.u32", 8); break;
        case 20: memcpy(find_bytes(d, n, "general.alignment") + 21, "\x30", 1); break; // 32 -> 48
        case 21: *find_bytes(d, n, "test.bool") = 0; break;
        }
        got = parse_copy(d, n);
        if (got != cases[c].want) fail = c;
    }
    test_quiet_end(saved);
    free(d);
    free(orig);
    CHECKF(t, fail < 0, "case '%s': got %s, expected %s", fail >= 0 ? cases[fail].what : "",
           coopt_status_str(got), fail >= 0 ? coopt_status_str(cases[fail].want) : "");
}

// ---- loader errors on rewritten copies of stories260K.gguf ----

TEST(gguf_load_model_errors) {
    struct coopt_gguf *g;
    if (coopt_gguf_open(test_model_path("stories260K.gguf"), &g) != COOPT_OK) SKIP(t, "stories260K.gguf not found");
    char dir[256], path[512];
    if (!make_tmpdir(dir, sizeof(dir))) coopt_gguf_close(g);
    CHECK(t, dir[0]);
    snprintf(path, sizeof(path), "%s/m.gguf", dir);
    struct {
        const char       *what, *skip, *replace, *arch;
        uint32_t          type;
        enum coopt_status want;
    } cases[] = {
        {"unknown architecture", NULL, NULL, "gpt2", 0, COOPT_ERR_UNSUPPORTED},
        {"missing tensor", "blk.3.attn_q.weight", NULL, NULL, 0, COOPT_ERR_FORMAT},
        {"missing norm", "output_norm.weight", NULL, NULL, 0, COOPT_ERR_FORMAT},
        {"unsupported type", NULL, "blk.1.ffn_up.weight", NULL, COOPT_GGML_Q6_K, COOPT_ERR_UNSUPPORTED},
        {"untied output", "output.weight", NULL, NULL, 0, COOPT_OK},
    };
    int               fail = -1;
    enum coopt_status got  = COOPT_OK;
    bool              tied = false;
    for (int c = 0; c < (int)COOPT_ARRAY_LEN(cases) && fail < 0; c++) {
        got = rewrite(g, path, cases[c].skip, cases[c].replace, cases[c].type, cases[c].arch);
        if (got != COOPT_OK) {
            fail = c;
            break;
        }
        struct coopt_model *m     = new_model();
        int                 saved = test_quiet_begin();
        got                       = coopt_gguf_load_model(m, path);
        test_quiet_end(saved);
        if (c == 4) tied = m->config.tied_embeddings && m->output.data == m->tok_embd.data;
        coopt_model_free(m);
        unlink(path);
        if (got != cases[c].want) fail = c;
    }
    coopt_gguf_close(g);
    unlink(path);
    rmdir(dir);
    CHECKF(t, fail < 0, "case '%s': got %s, expected %s", fail >= 0 ? cases[fail].what : "", coopt_status_str(got),
           fail >= 0 ? coopt_status_str(cases[fail].want) : "");
    CHECK(t, tied); // no output.weight: classifier tied to the embedding
}

// A vocabulary-only GGUF (no tensors) gives a tokenizer; a bad token id is rejected.
TEST(gguf_vocab_only) {
    char dir[256], path[512];
    CHECK(t, make_tmpdir(dir, sizeof(dir)));
    snprintf(path, sizeof(path), "%s/vocab.gguf", dir);
    const char *const toks[4]  = {"<unk>", "<s>", "</s>", "a"};
    float             sc[4]    = {0, 0, 0, -1};
    int32_t           types[4] = {2, 3, 3, 1};
    struct coopt_gguf_writer *w;
    CHECK(t, coopt_gguf_writer_init(&w) == COOPT_OK);
    bool ok = coopt_gguf_writer_set_str(w, "tokenizer.ggml.model", "llama") == COOPT_OK &&
              coopt_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, NULL, 4) == COOPT_OK &&
              coopt_gguf_writer_set_arr(w, "tokenizer.ggml.scores", COOPT_GGUF_F32, sc, 4) == COOPT_OK &&
              coopt_gguf_writer_set_arr(w, "tokenizer.ggml.token_type", COOPT_GGUF_I32, types, 4) == COOPT_OK &&
              coopt_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 1) == COOPT_OK &&
              coopt_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 2) == COOPT_OK &&
              coopt_gguf_writer_write(w, path) == COOPT_OK;
    struct coopt_tokenizer *tok = NULL;
    enum coopt_status       st1 = ok ? coopt_gguf_load_tokenizer(path, &tok) : COOPT_ERR_IO;
    int32_t                 n   = tok ? coopt_tokenizer_n_vocab(tok) : -1;
    coopt_tokenizer_free(tok);
    // eos out of range; then a scores array of the wrong length; then an unsupported model
    ok = ok && coopt_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 9) == COOPT_OK &&
         coopt_gguf_writer_write(w, path) == COOPT_OK;
    int               saved = test_quiet_begin();
    enum coopt_status st2   = coopt_gguf_load_tokenizer(path, &tok);
    ok = ok && coopt_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 2) == COOPT_OK &&
         coopt_gguf_writer_set_arr(w, "tokenizer.ggml.scores", COOPT_GGUF_F32, sc, 3) == COOPT_OK &&
         coopt_gguf_writer_write(w, path) == COOPT_OK;
    enum coopt_status st3 = coopt_gguf_load_tokenizer(path, &tok);
    ok = ok && coopt_gguf_writer_set_arr(w, "tokenizer.ggml.scores", COOPT_GGUF_F32, sc, 4) == COOPT_OK &&
         coopt_gguf_writer_set_str(w, "tokenizer.ggml.model", "bert") == COOPT_OK &&
         coopt_gguf_writer_write(w, path) == COOPT_OK;
    enum coopt_status st4 = coopt_gguf_load_tokenizer(path, &tok);
    test_quiet_end(saved);
    coopt_gguf_writer_free(w);
    unlink(path);
    rmdir(dir);
    CHECK(t, ok);
    CHECK(t, st1 == COOPT_OK && n == 4);
    CHECK(t, st2 == COOPT_ERR_FORMAT && st3 == COOPT_ERR_FORMAT && st4 == COOPT_ERR_UNSUPPORTED && tok == NULL);
}

// LLaMA 3.x GGUFs carry RoPE scaling as rope_freqs.weight; it is recognized as llama3 scaling
// when it matches the llama3 formula, rejected otherwise.
TEST(gguf_rope_freqs_llama3) {
    struct coopt_gguf *g;
    if (coopt_gguf_open(test_model_path("stories260K.gguf"), &g) != COOPT_OK) SKIP(t, "stories260K.gguf not found");
    char dir[256], path[512];
    if (!make_tmpdir(dir, sizeof(dir))) coopt_gguf_close(g);
    CHECK(t, dir[0]);
    snprintf(path, sizeof(path), "%s/r.gguf", dir);
    // head_dim 8, theta 1e4: wavelengths 2*pi*{1, 10, 100, 1000}; original context 1024 puts
    // the third in the smooth band (1024/4 .. 1024) and the fourth above it (full factor 8)
    double smooth = (1024 / (2 * M_PI * 100) - 1) / 3;
    float  freqs[4] = {1, 1, (float)(1 / ((1 - smooth) / 8 + smooth)), 8};
    enum coopt_status got[2] = {COOPT_ERR_IO, COOPT_ERR_IO};
    struct coopt_model_config cfg = {0};
    for (int c = 0; c < 2; c++) {
        if (c == 1) freqs[2] *= 1.01f; // not what the formula gives
        struct coopt_gguf_writer *w;
        if (coopt_gguf_writer_init(&w) != COOPT_OK) break;
        enum coopt_status st = COOPT_OK;
        for (int64_t i = 0; st == COOPT_OK && i < g->n_kv; i++) st = coopt_gguf_writer_copy_kv(w, &g->kv[i]);
        for (int64_t i = 0; st == COOPT_OK && i < g->n_tensors; i++) {
            const struct coopt_gguf_tensor *x = &g->tensors[i];
            st = coopt_gguf_writer_add_tensor(w, x->name, x->ggml_type, x->n_dims, x->ne, x->data, NULL, NULL);
        }
        int64_t ne[1] = {4};
        if (st == COOPT_OK) st = coopt_gguf_writer_add_tensor(w, "rope_freqs.weight", COOPT_GGML_F32, 1, ne, freqs, NULL, NULL);
        if (st == COOPT_OK) st = coopt_gguf_writer_set_u32(w, "llama.rope.scaling.original_context_length", 1024);
        if (st == COOPT_OK) st = coopt_gguf_writer_write(w, path);
        coopt_gguf_writer_free(w);
        if (st != COOPT_OK) break;
        struct coopt_model *m     = new_model();
        int                 saved = test_quiet_begin();
        got[c]                    = coopt_gguf_load_model(m, path);
        test_quiet_end(saved);
        if (c == 0) cfg = m->config;
        coopt_model_free(m);
        unlink(path);
    }
    coopt_gguf_close(g);
    rmdir(dir);
    CHECK(t, got[0] == COOPT_OK && got[1] == COOPT_ERR_UNSUPPORTED);
    CHECK(t, cfg.rope_scaling == COOPT_ROPE_SCALING_LLAMA3 && cfg.rope_factor == 8 && cfg.rope_orig_ctx == 1024);
    CHECK(t, cfg.rope_low_freq_factor == 1 && cfg.rope_high_freq_factor == 4);
}
