/*
 * test_safetensors.c -- safetensors writer/reader round trip, and the reader's answer to
 * corrupt input: every truncation, bad header lengths, bad JSON, offsets out of range or
 * inconsistent with the shape, unknown dtypes, overlaps and duplicates. Also holds the
 * temp-dir and stderr-capture helpers that test_hf.c uses (declared there).
 */
#include "dtype.h"
#include "safetensors.h"
#include "test.h"

#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

// ---- helpers shared with test_hf.c ----

// Creates a fresh directory under $TMPDIR (or /tmp); returns a static-lifetime copy's path
// in buf (cap bytes). False on failure.
bool st_test_mkdtemp(char *buf, size_t cap) {
    const char *tmp = getenv("TMPDIR");
    snprintf(buf, cap, "%s/coopt-st-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    return mkdtemp(buf) != NULL;
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

// Removes a directory tree made by st_test_mkdtemp.
void st_test_rmtree(const char *dir) { nftw(dir, rm_one, 8, FTW_DEPTH | FTW_PHYS); }

static int  g_saved_fd = -1;
static char g_capture_path[512];

// Redirects stderr into a temporary file until st_test_capture_end(), which returns what was
// written (static buffer, truncated to its size).
void st_test_capture_begin(void) {
    fflush(stderr);
    const char *tmp = getenv("TMPDIR");
    snprintf(g_capture_path, sizeof(g_capture_path), "%s/coopt-err-XXXXXX",
             tmp && *tmp ? tmp : "/tmp");
    int fd = mkstemp(g_capture_path);
    if (fd < 0) return;
    g_saved_fd = dup(2);
    dup2(fd, 2);
    close(fd);
}

const char *st_test_capture_end(void) {
    static char buf[8192];
    buf[0] = '\0';
    if (g_saved_fd < 0) return buf;
    fflush(stderr);
    dup2(g_saved_fd, 2);
    close(g_saved_fd);
    g_saved_fd = -1;
    FILE *f    = fopen(g_capture_path, "rb");
    if (f) {
        size_t n = fread(buf, 1, sizeof(buf) - 1, f);
        buf[n]   = '\0';
        fclose(f);
    }
    remove(g_capture_path);
    return buf;
}

// Writes `n` bytes to dir/name.
bool st_test_write_file(const char *dir, const char *name, const void *data, size_t n) {
    char path[1024];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) return false;
    bool ok = fwrite(data, 1, n, f) == n;
    return fclose(f) == 0 && ok;
}

// ---- helpers ----

// Builds a safetensors file in memory from a header text; data bytes are zero. The length
// field is the header's length unless hlen_override >= 0. *size gets the total; free() it.
static uint8_t *make_st(const char *header, size_t data_bytes, long long hlen_override,
                        size_t *size) {
    size_t   n = strlen(header);
    uint8_t *b = calloc(1, 8 + n + data_bytes);
    uint64_t h = hlen_override >= 0 ? (uint64_t)hlen_override : n;
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)(h >> (8 * i));
    memcpy(b + 8, header, n);
    *size = 8 + n + data_bytes;
    return b;
}

// Parses a crafted file; returns the status and the captured message in *msg.
static enum coopt_status parse_crafted(const char *header, size_t data_bytes, long long hlen,
                                       const char **msg) {
    size_t                    size;
    uint8_t                  *b  = make_st(header, data_bytes, hlen, &size);
    struct coopt_safetensors *st = NULL;
    st_test_capture_begin();
    enum coopt_status rc = coopt_safetensors_parse(b, size, "x.safetensors", &st);
    *msg                 = st_test_capture_end();
    coopt_safetensors_free(st);
    free(b);
    return rc;
}

static enum coopt_status fill_ramp(void *user, void *buf, size_t offset, size_t n) {
    int *calls = user;
    (*calls)++;
    for (size_t i = 0; i < n; i++)
        ((uint8_t *)buf)[i] = (uint8_t)(offset + i);
    return COOPT_OK;
}

static enum coopt_status fill_fail(void *user, void *buf, size_t offset, size_t n) {
    (void)user, (void)buf, (void)offset, (void)n;
    return COOPT_ERR_IO;
}

// ---- tests ----

TEST(safetensors_write_read) {
    char dir[512], path[1024];
    CHECK(t, st_test_mkdtemp(dir, sizeof(dir)));
    snprintf(path, sizeof(path), "%s/a.safetensors", dir);

    float    w[6]   = {1, -2, 3.5f, 0, 1e-3f, -7};
    int32_t  idx[3] = {7, -1, 1 << 30};
    uint16_t bf[2 * 2 * 3];
    for (int i = 0; i < 12; i++)
        bf[i] = coopt_f32_to_bf16((float)i - 5);
    int64_t s_w[2] = {2, 3}, s_idx[1] = {3}, s_bf[3] = {2, 2, 3}, s_ramp[1] = {5000},
            s_empty[2]            = {0, 4};
    int                     calls = 0;
    struct coopt_st_writer *wr    = NULL;
    CHECK(t, coopt_st_writer_init(&wr) == COOPT_OK);
    CHECK(t, coopt_st_writer_add(wr, "w", COOPT_DTYPE_F32, 2, s_w, w) == COOPT_OK);
    CHECK(t, coopt_st_writer_add(wr, "idx", COOPT_DTYPE_I32, 1, s_idx, idx) == COOPT_OK);
    CHECK(t, coopt_st_writer_add(wr, "x.bf", COOPT_DTYPE_BF16, 3, s_bf, bf) == COOPT_OK);
    CHECK(t, coopt_st_writer_add_fn(wr, "ramp", COOPT_DTYPE_F16, 1, s_ramp, fill_ramp, &calls) ==
                 COOPT_OK);
    CHECK(t, coopt_st_writer_add(wr, "empty", COOPT_DTYPE_F32, 2, s_empty, w) == COOPT_OK);
    CHECK(t, coopt_st_writer_add(wr, "scalar", COOPT_DTYPE_F32, 0, NULL, &w[2]) == COOPT_OK);
    CHECK(t, coopt_st_writer_meta(wr, "format", "np") == COOPT_OK);
    CHECK(t, coopt_st_writer_meta(wr, "format", "pt") == COOPT_OK); // replaces
    CHECK(t, coopt_st_writer_meta(wr, "note", "a \"quoted\" value") == COOPT_OK);
    st_test_capture_begin();
    enum coopt_status dup = coopt_st_writer_add(wr, "w", COOPT_DTYPE_F32, 2, s_w, w);
    enum coopt_status q4  = coopt_st_writer_add(wr, "q", COOPT_DTYPE_Q4_0, 2, s_w, w);
    st_test_capture_end();
    CHECK(t, dup == COOPT_ERR_INVALID && q4 == COOPT_ERR_INVALID);
    CHECK(t, coopt_st_writer_write(wr, path) == COOPT_OK);
    coopt_st_writer_free(wr);
    CHECK(t, calls == 1);

    struct coopt_safetensors *st = NULL;
    CHECK(t, coopt_safetensors_open(path, &st) == COOPT_OK);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | st->base[i];
    CHECKF(t, (8 + hlen) % 8 == 0 && st->base[8 + hlen - 1] != 0, "header length %llu",
           (unsigned long long)hlen);
    CHECK(t, st->n_tensors == 6);
    for (int i = 1; i < st->n_tensors; i++)
        CHECK(t, strcmp(st->tensors[i - 1].name, st->tensors[i].name) < 0);

    const struct coopt_st_tensor *tw = coopt_safetensors_find(st, "w");
    CHECK(t, tw && tw->supported && tw->dtype == COOPT_DTYPE_F32 && tw->n_dims == 2);
    CHECK(t, tw->shape[0] == 2 && tw->shape[1] == 3 && tw->n_bytes == 24 && tw->n_elems == 6);
    CHECK(t, memcmp(tw->data, w, sizeof(w)) == 0);
    const struct coopt_st_tensor *ti = coopt_safetensors_find(st, "idx");
    CHECK(t, ti && ti->dtype == COOPT_DTYPE_I32 && memcmp(ti->data, idx, sizeof(idx)) == 0);
    const struct coopt_st_tensor *tb = coopt_safetensors_find(st, "x.bf");
    CHECK(t, tb && tb->dtype == COOPT_DTYPE_BF16 && tb->n_dims == 3 && tb->shape[2] == 3);
    CHECK(t, memcmp(tb->data, bf, sizeof(bf)) == 0);
    const struct coopt_st_tensor *tr = coopt_safetensors_find(st, "ramp");
    CHECK(t, tr && tr->dtype == COOPT_DTYPE_F16 && tr->n_bytes == 10000);
    for (size_t i = 0; i < tr->n_bytes; i++)
        CHECK(t, ((const uint8_t *)tr->data)[i] == (uint8_t)i);
    const struct coopt_st_tensor *te = coopt_safetensors_find(st, "empty");
    CHECK(t, te && te->n_bytes == 0 && te->n_elems == 0 && te->shape[0] == 0);
    const struct coopt_st_tensor *ts = coopt_safetensors_find(st, "scalar");
    CHECK(t, ts && ts->n_dims == 0 && ts->n_elems == 1 && *(const float *)ts->data == 3.5f);
    CHECK(t, coopt_safetensors_find(st, "nope") == NULL);
    CHECK(t, coopt_safetensors_find(st, "") == NULL);
    CHECK(t, strcmp(coopt_safetensors_meta(st, "format"), "pt") == 0);
    CHECK(t, strcmp(coopt_safetensors_meta(st, "note"), "a \"quoted\" value") == 0);
    CHECK(t, coopt_safetensors_meta(st, "missing") == NULL);
    coopt_safetensors_free(st);

    // a failing producer leaves no file behind
    remove(path);
    CHECK(t, coopt_st_writer_init(&wr) == COOPT_OK);
    CHECK(t, coopt_st_writer_add_fn(wr, "ramp", COOPT_DTYPE_F16, 1, s_ramp, fill_fail, NULL) ==
                 COOPT_OK);
    st_test_capture_begin();
    enum coopt_status rc  = coopt_st_writer_write(wr, path);
    const char       *msg = st_test_capture_end();
    coopt_st_writer_free(wr);
    CHECK(t, rc == COOPT_ERR_IO && strstr(msg, "'ramp'"));
    CHECK(t, access(path, F_OK) != 0);
    st_test_rmtree(dir);
}

TEST(safetensors_every_truncation_fails) {
    char dir[512], path[1024];
    CHECK(t, st_test_mkdtemp(dir, sizeof(dir)));
    snprintf(path, sizeof(path), "%s/t.safetensors", dir);
    float                   v[5]  = {1, 2, 3, 4, 5};
    int64_t                 sh[1] = {5};
    struct coopt_st_writer *wr    = NULL;
    CHECK(t, coopt_st_writer_init(&wr) == COOPT_OK);
    CHECK(t, coopt_st_writer_add(wr, "a", COOPT_DTYPE_F32, 1, sh, v) == COOPT_OK);
    CHECK(t, coopt_st_writer_add(wr, "b", COOPT_DTYPE_F16, 1, sh, v) == COOPT_OK);
    CHECK(t, coopt_st_writer_write(wr, path) == COOPT_OK);
    coopt_st_writer_free(wr);
    char  *file = NULL;
    size_t size = 0;
    CHECK(t, coopt_read_file(path, &file, &size) == COOPT_OK);
    st_test_rmtree(dir);

    struct coopt_safetensors *st = NULL;
    CHECK(t, coopt_safetensors_parse(file, size, "t", &st) == COOPT_OK);
    coopt_safetensors_free(st);
    int n_bad = 0;
    st_test_capture_begin();
    for (size_t len = 0; len < size; len++) {
        uint8_t *copy = malloc(len ? len : 1); // exact size, so ASan sees any overread
        memcpy(copy, file, len);
        enum coopt_status rc = coopt_safetensors_parse(copy, len, "t", &st);
        if (rc != COOPT_ERR_FORMAT || st != NULL) n_bad++;
        coopt_safetensors_free(st);
        free(copy);
    }
    st_test_capture_end();
    free(file);
    CHECKF(t, n_bad == 0, "%d truncations were not rejected", n_bad);
}

TEST(safetensors_corrupt_headers) {
    const char       *msg;
    enum coopt_status rc;
    const char       *ok = "{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}}";
    CHECK(t, parse_crafted(ok, 24, -1, &msg) == COOPT_OK);

    // header length past EOF, too short, huge
    rc = parse_crafted(ok, 24, (long long)strlen(ok) + 25, &msg);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "past the end"), "%s", msg);
    rc = parse_crafted(ok, 24, 1LL << 62, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_crafted(ok, 24, 0, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    // bad JSON, non-object, trailing garbage
    rc = parse_crafted("{\"w\":{\"dtype\":\"F32\",", 0, -1, &msg);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "invalid JSON"), "%s", msg);
    rc = parse_crafted("[1,2]", 0, -1, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_crafted("{}  x", 0, -1, &msg);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "after the JSON"), "%s", msg);
    CHECK(t, parse_crafted("{}      ", 0, -1, &msg) == COOPT_OK); // space padding is fine
    // data_offsets out of range, reversed, inconsistent with the shape, not integers
    rc = parse_crafted("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,24]}}", 20,
                       -1, &msg);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "'w'") && strstr(msg, "outside"), "%s", msg);
    rc = parse_crafted("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[24,0]}}", 24,
                       -1, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_crafted("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,20]}}", 24,
                       -1, &msg);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "[2,3] F32 needs 24"), "%s", msg);
    rc = parse_crafted("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0.5,24]}}", 24,
                       -1, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_crafted("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0]}}", 24, -1,
                       &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    // shapes: negative, fractional, too many dims, overflowing
    rc = parse_crafted("{\"w\":{\"dtype\":\"F32\",\"shape\":[-2,3],\"data_offsets\":[0,24]}}", 24,
                       -1, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_crafted("{\"w\":{\"dtype\":\"F32\",\"shape\":[2.5],\"data_offsets\":[0,10]}}", 24,
                       -1, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_crafted(
        "{\"w\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 24, -1,
        &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_crafted(
        "{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,0]}}",
        0, -1, &msg);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "overflow"), "%s", msg);
    rc = parse_crafted("{\"w\":{\"dtype\":\"F32\",\"shape\":[1e300],\"data_offsets\":[0,0]}}", 0,
                       -1, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    // dtypes: unknown is an error; known-but-unused parses and is flagged
    rc = parse_crafted("{\"w\":{\"dtype\":\"Q4\",\"shape\":[2],\"data_offsets\":[0,1]}}", 24, -1,
                       &msg);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "unknown dtype 'Q4'") && strstr(msg, "'w'"),
           "%s", msg);
    rc = parse_crafted("{\"w\":{\"dtype\":7,\"shape\":[2],\"data_offsets\":[0,1]}}", 24, -1, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    {
        size_t   size;
        uint8_t *b = make_st("{\"w\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]}}",
                             16, -1, &size);
        struct coopt_safetensors *st = NULL;
        CHECK(t, coopt_safetensors_parse(b, size, "x", &st) == COOPT_OK);
        const struct coopt_st_tensor *tt = coopt_safetensors_find(st, "w");
        bool ok64 = tt && !tt->supported && strcmp(tt->st_dtype, "I64") == 0 && tt->elem_size == 8;
        coopt_safetensors_free(st);
        free(b);
        CHECK(t, ok64);
    }
    // overlap and duplicates
    rc = parse_crafted("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                       "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}",
                       24, -1, &msg);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "overlap"), "%s", msg);
    rc = parse_crafted("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                       "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                       24, -1, &msg);
    CHECKF(t, rc == COOPT_ERR_FORMAT && strstr(msg, "twice"), "%s", msg);
    // metadata must be a dict of strings
    rc = parse_crafted("{\"__metadata__\":{\"a\":1}}", 0, -1, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_crafted("{\"__metadata__\":[]}", 0, -1, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
    rc = parse_crafted("{\"w\":[1]}", 0, -1, &msg);
    CHECK(t, rc == COOPT_ERR_FORMAT);
}

TEST(safetensors_header_limit) {
    // A header length over 100 MB is refused even when the file is that large.
    size_t   size = 8 + COOPT_ST_MAX_HEADER + 16;
    uint8_t *b    = calloc(1, size);
    CHECK(t, b);
    uint64_t n = COOPT_ST_MAX_HEADER + 1;
    for (int i = 0; i < 8; i++)
        b[i] = (uint8_t)(n >> (8 * i));
    b[8]                         = '{';
    struct coopt_safetensors *st = NULL;
    st_test_capture_begin();
    enum coopt_status rc  = coopt_safetensors_parse(b, size, "big", &st);
    const char       *msg = st_test_capture_end();
    free(b);
    CHECKF(t, rc == COOPT_ERR_FORMAT && st == NULL && strstr(msg, "limit"), "%s", msg);
}

TEST(safetensors_open_errors) {
    struct coopt_safetensors *st = NULL;
    st_test_capture_begin();
    enum coopt_status rc = coopt_safetensors_open("/nonexistent/x.safetensors", &st);
    st_test_capture_end();
    CHECK(t, rc == COOPT_ERR_IO && st == NULL);
}

TEST(safetensors_real_model) {
    struct coopt_safetensors *st = NULL;
    const char               *p  = test_model_path("story-lmrs/model.safetensors");
    if (access(p, R_OK) != 0) SKIP(t, "story-lmrs not found");
    CHECK(t, coopt_safetensors_open(p, &st) == COOPT_OK);
    CHECK(t, st->n_tensors == 20);
    CHECK(t, strcmp(coopt_safetensors_meta(st, "format"), "pt") == 0);
    // tied embeddings: the one matrix is stored as lm_head.weight or as model.embed_tokens.weight
    // (both are Hugging Face encodings of the same tied model; the shared copy has been each)
    const struct coopt_st_tensor *lm = coopt_safetensors_find(st, "lm_head.weight");
    if (!lm) lm = coopt_safetensors_find(st, "model.embed_tokens.weight");
    bool ok = lm && lm->dtype == COOPT_DTYPE_F32 && lm->shape[0] == 2048 && lm->shape[1] == 128 &&
              ((const float *)lm->data)[0] == -0.68359375f &&
              ((const float *)lm->data)[2048 * 128 - 1] == -0.421875f;
    coopt_safetensors_free(st);
    CHECK(t, ok);
}
