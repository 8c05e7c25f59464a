/*
 * test_tokenizer.c -- encoder and decoder against sentencepiece / HF tokenizers goldens
 * (scripts/make_tokenizer_golden.py), every loader (tokenizer.model, tokenizer.json, llama2.c
 * tokenizer.bin, directories, GGUF), streaming UTF-8 decoding, speed, and error paths.
 */
#include "test.h"
#include "tokenizer.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define TOK_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TOK_SANITIZED 1
#endif
#endif
#ifndef TOK_SANITIZED
#define TOK_SANITIZED 0
#endif

// ---- helpers ----

static size_t unhex(const char *h, size_t n, char *out) {
    size_t k = 0;
    for (size_t i = 0; i + 1 < n; i += 2) {
        int hi = h[i] <= '9' ? h[i] - '0' : (h[i] | 0x20) - 'a' + 10;
        int lo = h[i + 1] <= '9' ? h[i + 1] - '0' : (h[i + 1] | 0x20) - 'a' + 10;
        out[k++] = (char)(hi * 16 + lo);
    }
    return k;
}

// Decodes ids through the streaming detokenizer, one token at a time, into out (cap bytes).
static size_t decode_all(const struct coopt_tokenizer *tok, const int32_t *ids, size_t n, char *out, size_t cap) {
    struct coopt_detok d;
    coopt_detok_reset(&d);
    size_t w = 0;
    for (size_t i = 0; i < n && w + 1 < cap; i++) w += coopt_detok_push(&d, tok, ids[i], out + w, cap - w);
    if (w + 1 < cap) w += coopt_detok_flush(&d, out + w, cap - w);
    return w;
}

static void fmt_ids(char *buf, size_t cap, const int32_t *ids, size_t n) {
    size_t w = 0;
    buf[0]   = 0;
    for (size_t i = 0; i < n && w + 16 < cap; i++) w += (size_t)snprintf(buf + w, cap - w, "%d ", ids[i]);
}

// Runs every case of tests/golden/tok_<name>.txt; returns false after recording a failure.
static bool run_golden(struct test_ctx *t, const struct coopt_tokenizer *tok, const char *name) {
    char file[256];
    snprintf(file, sizeof(file), "tok_%s.txt", name);
    char  *data = NULL;
    size_t size = 0;
    if (coopt_read_file(test_golden_path(file), &data, &size) != COOPT_OK) {
        test_fail(t, __FILE__, __LINE__, "cannot read golden %s", file);
        return false;
    }
    unsigned flags = COOPT_TOKENIZE_ADD_BOS;
    int      n_cases = 0;
    bool     ok      = true;
    char    *text = malloc(size + 1), *want_dec = malloc(size + 1), *got_dec = malloc(size * 2 + 64);
    int32_t *want = malloc((size + 1) * sizeof(int32_t));
    for (char *line = data; ok && line && *line;) {
        char *nl = strchr(line, '\n');
        if (nl) *nl = 0;
        if (strncmp(line, "#parse_special 1", 16) == 0) flags |= COOPT_TOKENIZE_PARSE_SPECIAL;
        char *tab1 = strchr(line, '\t'), *tab2 = tab1 ? strchr(tab1 + 1, '\t') : NULL;
        if (line[0] != '#' && tab1 && tab2) {
            size_t tl = unhex(line, (size_t)(tab1 - line), text);
            size_t dl = unhex(tab2 + 1, strlen(tab2 + 1), want_dec);
            size_t nw = 0;
            for (char *p = tab1 + 1; p < tab2;) {
                char *end;
                long  v = strtol(p, &end, 10);
                if (end == p) break;
                want[nw++] = (int32_t)v;
                p          = end;
            }
            int32_t *ids = NULL;
            size_t   n   = 0;
            if (coopt_tokenize(tok, text, tl, flags, &ids, &n) != COOPT_OK) {
                test_fail(t, __FILE__, __LINE__, "%s case %d: tokenize failed", name, n_cases);
                ok = false;
            } else if (n != nw || memcmp(ids, want, n * sizeof(int32_t)) != 0) {
                char g[512], w[512];
                fmt_ids(g, sizeof(g), ids, n);
                fmt_ids(w, sizeof(w), want, nw);
                test_fail(t, __FILE__, __LINE__, "%s case %d '%.40s': got [%.200s] want [%.200s]", name, n_cases, text, g, w);
                ok = false;
            } else {
                size_t gl = decode_all(tok, ids, n, got_dec, size * 2 + 64);
                if (gl != dl || memcmp(got_dec, want_dec, dl) != 0) {
                    test_fail(t, __FILE__, __LINE__, "%s case %d: decode '%.*s' want '%.*s'", name, n_cases,
                              (int)COOPT_MIN(gl, 80), got_dec, (int)COOPT_MIN(dl, 80), want_dec);
                    ok = false;
                }
            }
            free(ids);
            n_cases++;
        }
        line = nl ? nl + 1 : NULL;
    }
    if (ok && n_cases < 20) {
        test_fail(t, __FILE__, __LINE__, "%s: only %d cases", name, n_cases);
        ok = false;
    }
    free(text);
    free(want_dec);
    free(got_dec);
    free(want);
    free(data);
    return ok;
}

// Loads a tokenizer; a model file that is absent (COOPT_MODELS without it) skips the test.
static struct coopt_tokenizer *load_or_fail(struct test_ctx *t, const char *path) {
    struct coopt_tokenizer *tok = NULL;
    if (access(path, R_OK) != 0) {
        test_skip(t, "model file not found (set COOPT_MODELS)");
        return NULL;
    }
    enum coopt_status       st  = coopt_tokenizer_load(path, &tok);
    if (st != COOPT_OK) test_fail(t, __FILE__, __LINE__, "load %s: %s", path, coopt_status_str(st));
    return tok;
}

// Writes bytes to a fresh temporary file with the given suffix; returns its path (static buffer).
static const char *write_temp(const void *data, size_t n, const char *suffix) {
    static char path[8][64];
    static int  k;
    char       *p = path[k++ % 8];
    snprintf(p, 64, "/tmp/coopt_tok_XXXXXX%s", suffix);
    int fd = mkstemps(p, (int)strlen(suffix));
    if (fd < 0) return NULL;
    if (write(fd, data, n) != (ssize_t)n) {
        close(fd);
        return NULL;
    }
    close(fd);
    return p;
}

// ---- goldens ----

TEST(tokenizer_golden_llama2_spm) {
    struct coopt_tokenizer *tok = load_or_fail(t, test_model_path("llama2-tokenizer/tokenizer.model"));
    if (!tok) return;
    bool ok = run_golden(t, tok, "llama2");
    coopt_tokenizer_free(tok);
    CHECK(t, ok);
}

TEST(tokenizer_golden_tinystories_spm) {
    struct coopt_tokenizer *tok = load_or_fail(t, test_model_path("tinystories-mha-25m/tokenizer.model"));
    if (!tok) return;
    bool ok = run_golden(t, tok, "tinystories_spm");
    coopt_tokenizer_free(tok);
    CHECK(t, ok);
}

// llama2.c tok512.bin is the stories260K vocabulary: same ids as its sentencepiece model.
TEST(tokenizer_golden_tok512_llama2c) {
    struct coopt_tokenizer *tok = load_or_fail(t, test_model_path("tok512.bin"));
    if (!tok) return;
    bool ok = run_golden(t, tok, "tinystories_spm");
    CHECK(t, coopt_tokenizer_n_vocab(tok) == 512);
    coopt_tokenizer_free(tok);
    CHECK(t, ok);
}

TEST(tokenizer_golden_tinystories_json) {
    struct coopt_tokenizer *tok = load_or_fail(t, test_model_path("tinystories-mha-25m/tokenizer.json"));
    if (!tok) return;
    bool ok = run_golden(t, tok, "tinystories_json");
    coopt_tokenizer_free(tok);
    CHECK(t, ok);
}

TEST(tokenizer_golden_story_lmrs_json) {
    struct coopt_tokenizer *tok = load_or_fail(t, test_model_path("story-lmrs/tokenizer.json"));
    if (!tok) return;
    bool ok = run_golden(t, tok, "story_lmrs");
    CHECK(t, coopt_tokenizer_bos(tok) == 1 && coopt_tokenizer_eos(tok) == 2 && coopt_tokenizer_is_eog(tok, 2));
    coopt_tokenizer_free(tok);
    CHECK(t, ok);
}

TEST(tokenizer_golden_bytelevel_llama3) {
    struct coopt_tokenizer *tok = load_or_fail(t, test_golden_path("tok_bytelevel.json"));
    if (!tok) return;
    bool ok = run_golden(t, tok, "bytelevel");
    // <|end_of_text|> and <|eot_id|> end generation; bos is <|begin_of_text|>
    int32_t *ids = NULL;
    size_t   n   = 0;
    bool     eog = false;
    if (coopt_tokenize(tok, "<|eot_id|><|end_of_text|>", 25, COOPT_TOKENIZE_PARSE_SPECIAL, &ids, &n) == COOPT_OK && n == 2)
        eog = coopt_tokenizer_is_eog(tok, ids[0]) && coopt_tokenizer_is_eog(tok, ids[1]);
    free(ids);
    coopt_tokenizer_free(tok);
    CHECK(t, ok);
    CHECK(t, eog);
}

TEST(tokenizer_golden_bytelevel_gpt2) {
    struct coopt_tokenizer *tok = load_or_fail(t, test_golden_path("tok_gpt2.json"));
    if (!tok) return;
    bool ok = run_golden(t, tok, "gpt2");
    coopt_tokenizer_free(tok);
    CHECK(t, ok);
}

// ---- specific behaviour ----

TEST(tokenizer_llama2_once_upon) {
    struct coopt_tokenizer *tok = load_or_fail(t, test_model_path("llama2-tokenizer/tokenizer.model"));
    if (!tok) return;
    int32_t *ids = NULL;
    size_t   n   = 0;
    enum coopt_status st = coopt_tokenize(tok, "Once upon a time", 16, COOPT_TOKENIZE_ADD_BOS, &ids, &n);
    int32_t want[] = {1, 9038, 2501, 263, 931};
    bool    same   = st == COOPT_OK && n == 5 && memcmp(ids, want, sizeof(want)) == 0;
    free(ids);
    // "<s>" is text without PARSE_SPECIAL, the BOS token with it
    size_t n1 = 0, n2 = 0;
    int32_t *a = NULL, *b = NULL;
    coopt_tokenize(tok, "<s>", 3, 0, &a, &n1);
    coopt_tokenize(tok, "<s>", 3, COOPT_TOKENIZE_PARSE_SPECIAL, &b, &n2);
    bool special = n1 > 1 && n2 == 1 && b[0] == 1;
    free(a);
    free(b);
    CHECK(t, coopt_tokenizer_n_vocab(tok) == 32000);
    CHECK(t, coopt_tokenizer_bos(tok) == 1 && coopt_tokenizer_eos(tok) == 2);
    CHECK(t, coopt_tokenizer_is_eog(tok, 2) && !coopt_tokenizer_is_eog(tok, 1) && !coopt_tokenizer_is_eog(tok, 9038));
    size_t      pl = 0;
    const char *p  = coopt_tokenizer_piece(tok, 9038, &pl);
    CHECK(t, p && pl == 7 && memcmp(p, "\xe2\x96\x81Once", 7) == 0);
    CHECK(t, coopt_tokenizer_piece(tok, 32000, &pl) == NULL && pl == 0);
    coopt_tokenizer_free(tok);
    CHECK(t, same);
    CHECK(t, special);
}

TEST(tokenizer_gguf_matches_tok512) {
    NEED_FILE(t, test_model_path("stories260K.gguf"));
    NEED_FILE(t, test_model_path("tok512.bin"));
    struct coopt_tokenizer *g = NULL;
    enum coopt_status       st = coopt_tokenizer_load(test_model_path("stories260K.gguf"), &g);
    if (st == COOPT_ERR_UNSUPPORTED) SKIP(t, "GGUF tokenizer loader not linked");
    CHECKF(t, st == COOPT_OK, "load stories260K.gguf: %s", coopt_status_str(st));
    struct coopt_tokenizer *b = load_or_fail(t, test_model_path("tok512.bin"));
    bool                    ok = b != NULL;
    int32_t *x = NULL, *y = NULL;
    size_t   nx = 0, ny = 0;
    const char *text = "Once upon a time, Lily saw a big 🐶 dog.\n";
    if (ok) {
        coopt_tokenize(g, text, strlen(text), COOPT_TOKENIZE_ADD_BOS, &x, &nx);
        coopt_tokenize(b, text, strlen(text), COOPT_TOKENIZE_ADD_BOS, &y, &ny);
        ok = nx == ny && nx > 5 && memcmp(x, y, nx * sizeof(int32_t)) == 0;
    }
    free(x);
    free(y);
    coopt_tokenizer_free(g);
    coopt_tokenizer_free(b);
    CHECK(t, ok);
}

TEST(tokenizer_load_directory) {
    struct coopt_tokenizer *tok = load_or_fail(t, test_model_path("story-lmrs"));
    if (!tok) return;
    CHECK(t, coopt_tokenizer_n_vocab(tok) == 2048 && coopt_tokenizer_bos(tok) == 1);
    coopt_tokenizer_free(tok);
    struct coopt_tokenizer *bad = (struct coopt_tokenizer *)1;
    CHECK(t, coopt_tokenizer_load(test_data_path(""), &bad) == COOPT_ERR_IO && bad == NULL);
    CHECK(t, coopt_tokenizer_load("/nonexistent/tokenizer.json", &bad) == COOPT_ERR_IO && bad == NULL);
}

// Streaming never emits half a character; invalid bytes become U+FFFD like Python's "replace".
TEST(tokenizer_detok_streaming_utf8) {
    struct coopt_tokenizer *tok = load_or_fail(t, test_model_path("tok512.bin"));
    if (!tok) return;
    const char text[] = "a 😀é\xff\xe2\x82z\xf0\x9f";
    int32_t   *ids    = NULL;
    size_t     n      = 0;
    enum coopt_status st = coopt_tokenize(tok, text, sizeof(text) - 1, COOPT_TOKENIZE_ADD_BOS, &ids, &n);
    bool              stream_ok = st == COOPT_OK;
    char              all[256]  = {0};
    size_t            w         = 0;
    struct coopt_detok d;
    coopt_detok_reset(&d);
    for (size_t i = 0; stream_ok && i < n; i++) {
        char   piece[64];
        size_t k = coopt_detok_push(&d, tok, ids[i], piece, sizeof(piece));
        // every chunk is valid UTF-8 on its own
        for (size_t j = 0; j < k;) {
            unsigned char c = (unsigned char)piece[j];
            size_t        l = c < 0x80 ? 1 : c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : 2;
            if (c >= 0x80 && c < 0xc2) stream_ok = false;
            if (j + l > k) stream_ok = false;
            j += l;
        }
        memcpy(all + w, piece, k);
        w += k;
    }
    w += coopt_detok_flush(&d, all + w, sizeof(all) - w);
    free(ids);
    coopt_tokenizer_free(tok);
    const char want[] = "a 😀é\xef\xbf\xbd\xef\xbf\xbdz\xef\xbf\xbd"; // bos strips the dummy space
    CHECK(t, stream_ok);
    CHECKF(t, w == sizeof(want) - 1 && memcmp(all, want, w) == 0, "got '%.*s'", (int)w, all);
    // small output buffer: truncated at a character boundary, NUL-terminated
    char               tiny[3];
    struct coopt_detok d2;
    coopt_detok_reset(&d2);
    CHECK(t, coopt_detok_flush(&d2, tiny, sizeof(tiny)) == 0 && tiny[0] == 0);
}

TEST(tokenizer_detok_space_after_bos) {
    struct coopt_tokenizer *tok = load_or_fail(t, test_model_path("llama2-tokenizer/tokenizer.model"));
    if (!tok) return;
    char               out[64];
    struct coopt_detok d;
    coopt_detok_reset(&d);
    size_t n0 = coopt_detok_push(&d, tok, 1, out, sizeof(out));    // <s>: nothing
    size_t n1 = coopt_detok_push(&d, tok, 9038, out, sizeof(out)); // "▁Once" after BOS: "Once"
    bool   a  = n0 == 0 && n1 == 4 && strcmp(out, "Once") == 0;
    size_t n2 = coopt_detok_push(&d, tok, 2501, out, sizeof(out)); // " upon"
    bool   b  = n2 == 5 && strcmp(out, " upon") == 0;
    coopt_detok_reset(&d); // a continuation without BOS keeps its space
    size_t n3 = coopt_detok_push(&d, tok, 2501, out, sizeof(out));
    bool   c  = n3 == 5 && strcmp(out, " upon") == 0;
    coopt_tokenizer_free(tok);
    CHECK(t, a);
    CHECK(t, b);
    CHECK(t, c);
}

// 1 MB of wiki text must encode in well under a second (optimized build).
TEST(tokenizer_speed_1mb) {
    NEED_FILE(t, test_model_path("llama2-tokenizer/tokenizer.model"));
    NEED_FILE(t, test_data_path("wiki.test.raw"));
    char  *data = NULL;
    size_t size = 0;
    if (coopt_read_file(test_data_path("wiki.test.raw"), &data, &size) != COOPT_OK) SKIP(t, "no wiki.test.raw");
    size_t                  len = COOPT_MIN(size, (size_t)1 << 20);
    const char             *paths[2] = {test_model_path("llama2-tokenizer/tokenizer.model"), test_golden_path("tok_bytelevel.json")};
    double                  secs[2] = {0, 0};
    size_t                  counts[2] = {0, 0};
    for (int k = 0; k < 2; k++) {
        struct coopt_tokenizer *tok = load_or_fail(t, paths[k]);
        if (!tok) break;
        int32_t *ids = NULL;
        int64_t  t0  = coopt_time_us();
        enum coopt_status st = coopt_tokenize(tok, data, len, 0, &ids, &counts[k]);
        secs[k]      = (double)(coopt_time_us() - t0) * 1e-6;
        // the decode of a 1 MB encode is the text (llama2: valid UTF-8 in, no BOS => leading ' ')
        char  *dec = malloc(len * 2 + 16);
        size_t dl  = decode_all(tok, ids, counts[k], dec, len * 2 + 16);
        bool   rt  = k == 0 ? (dl == len + 1 && dec[0] == ' ' && memcmp(dec + 1, data, len) == 0)
                            : (dl == len && memcmp(dec, data, len) == 0);
        free(dec);
        free(ids);
        coopt_tokenizer_free(tok);
        if (st != COOPT_OK || !rt) {
            free(data);
            CHECKF(t, 0, "%s: status %s, round trip %d", paths[k], coopt_status_str(st), rt);
        }
    }
    free(data);
    CHECK(t, counts[0] > len / 8 && counts[1] > len / 8);
    if (getenv("COOPT_TOK_TIMING")) fprintf(stderr, "spm %.3f s, byte-level %.3f s\n", secs[0], secs[1]);
    if (!TOK_SANITIZED) {
        CHECKF(t, secs[0] < 1.0, "spm: %.3f s for %zu bytes", secs[0], len);
        CHECKF(t, secs[1] < 1.0, "byte-level: %.3f s for %zu bytes", secs[1], len);
    }
}

// ---- error paths ----

TEST(tokenizer_error_spm_truncated) {
    NEED_FILE(t, test_model_path("llama2-tokenizer/tokenizer.model"));
    char  *data = NULL;
    size_t size = 0;
    CHECK(t, coopt_read_file(test_model_path("llama2-tokenizer/tokenizer.model"), &data, &size) == COOPT_OK);
    const char             *p   = write_temp(data, size / 2 + 3, ".model");
    struct coopt_tokenizer *tok = (struct coopt_tokenizer *)1;
    enum coopt_status       st  = p ? coopt_tokenizer_load(p, &tok) : COOPT_ERR_IO;
    if (p) unlink(p);
    // a length that runs past the end
    data[1] = (char)0xff;
    data[2] = (char)0x7f;
    const char       *q   = write_temp(data, 64, ".model");
    struct coopt_tokenizer *tok2 = NULL;
    enum coopt_status st2 = q ? coopt_tokenizer_load(q, &tok2) : COOPT_ERR_IO;
    if (q) unlink(q);
    free(data);
    CHECKF(t, st == COOPT_ERR_FORMAT && tok == NULL, "truncated: %s", coopt_status_str(st));
    CHECKF(t, st2 == COOPT_ERR_FORMAT && tok2 == NULL, "corrupt: %s", coopt_status_str(st2));
}

// Minimal ModelProto: pieces <unk> <s> </s> a b ab, trainer_spec model_type=BPE + given ids.
static size_t make_spm_proto(uint8_t *buf, int bos_id, int model_type) {
    const char *pieces[] = {"<unk>", "<s>", "</s>", "a", "b", "ab"};
    int         types[]  = {2, 3, 3, 1, 1, 1};
    size_t      n        = 0;
    for (int i = 0; i < 6; i++) {
        uint8_t sub[64];
        size_t  s = 0, l = strlen(pieces[i]);
        sub[s++]  = 0x0a;
        sub[s++]  = (uint8_t)l;
        memcpy(sub + s, pieces[i], l);
        s += l;
        float score = -(float)i;
        sub[s++]    = 0x15;
        memcpy(sub + s, &score, 4);
        s += 4;
        sub[s++] = 0x18;
        sub[s++] = (uint8_t)types[i];
        buf[n++] = 0x0a;
        buf[n++] = (uint8_t)s;
        memcpy(buf + n, sub, s);
        n += s;
    }
    uint8_t ts[] = {0x18, (uint8_t)model_type, 0xc0, 0x02, 0x00, 0xc8, 0x02, (uint8_t)bos_id, 0xd0, 0x02, 0x02};
    buf[n++] = 0x12;
    buf[n++] = sizeof(ts);
    memcpy(buf + n, ts, sizeof(ts));
    n += sizeof(ts);
    uint8_t ns[] = {0x18, 0x01, 0x20, 0x00}; // add_dummy_prefix, no remove_extra_whitespaces
    buf[n++] = 0x1a;
    buf[n++] = sizeof(ns);
    memcpy(buf + n, ns, sizeof(ns));
    return n + sizeof(ns);
}

TEST(tokenizer_error_spm_ids) {
    uint8_t buf[512];
    size_t  n = make_spm_proto(buf, 1, 2);
    const char             *p   = write_temp(buf, n, ".model");
    struct coopt_tokenizer *tok = NULL;
    enum coopt_status       st  = p ? coopt_tokenizer_load(p, &tok) : COOPT_ERR_IO;
    if (p) unlink(p);
    bool enc_ok = false;
    if (tok) {
        int32_t *ids = NULL;
        size_t   k   = 0;
        coopt_tokenize(tok, "ab ab", 5, COOPT_TOKENIZE_ADD_BOS, &ids, &k);
        // "▁ab▁ab": no '▁' piece and no byte fallback -> unk for each '▁'
        int32_t want[] = {1, 0, 5, 0, 5};
        enc_ok         = k == 5 && memcmp(ids, want, sizeof(want)) == 0;
        free(ids);
    }
    coopt_tokenizer_free(tok);
    CHECKF(t, st == COOPT_OK, "synthetic model: %s", coopt_status_str(st));
    CHECK(t, enc_ok);
    n                = make_spm_proto(buf, 9, 2); // bos id out of range
    p                = write_temp(buf, n, ".model");
    st               = p ? coopt_tokenizer_load(p, &tok) : COOPT_ERR_IO;
    if (p) unlink(p);
    CHECKF(t, st == COOPT_ERR_FORMAT && tok == NULL, "bos out of range: %s", coopt_status_str(st));
    n  = make_spm_proto(buf, 1, 1); // unigram
    p  = write_temp(buf, n, ".model");
    st = p ? coopt_tokenizer_load(p, &tok) : COOPT_ERR_IO;
    if (p) unlink(p);
    CHECKF(t, st == COOPT_ERR_UNSUPPORTED && tok == NULL, "unigram: %s", coopt_status_str(st));
}

static enum coopt_status load_json_text(const char *json, struct coopt_tokenizer **tok) {
    const char       *p  = write_temp(json, strlen(json), ".json");
    enum coopt_status st = p ? coopt_tokenizer_load(p, tok) : COOPT_ERR_IO;
    if (p) unlink(p);
    return st;
}

TEST(tokenizer_error_json) {
    struct coopt_tokenizer *tok = NULL;
    CHECK(t, load_json_text("{\"version\": \"1.0\"}", &tok) == COOPT_ERR_FORMAT && !tok);          // no model
    CHECK(t, load_json_text("{\"model\": {\"type\": \"BPE\"}}", &tok) == COOPT_ERR_FORMAT && !tok); // no vocab
    CHECK(t, load_json_text("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1, \"ab\": 2},"
                            " \"merges\": [\"a c\"]}}", &tok) == COOPT_ERR_FORMAT && !tok); // unknown merge token
    CHECK(t, load_json_text("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1},"
                            " \"merges\": [\"a b\"]}}", &tok) == COOPT_ERR_FORMAT && !tok); // merged token missing
    CHECK(t, load_json_text("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 2}}}", &tok) ==
                 COOPT_ERR_FORMAT && !tok); // hole in the ids
    CHECK(t, load_json_text("{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}", &tok) == COOPT_ERR_UNSUPPORTED && !tok);
    CHECK(t, load_json_text("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}", &tok) == COOPT_ERR_FORMAT && !tok);
    // a valid minimal one: merges as arrays, <0xXX> byte fallback
    CHECK(t, load_json_text("{\"model\": {\"type\": \"BPE\", \"byte_fallback\": true, \"vocab\": {\"<unk>\": 0,"
                            " \"a\": 1, \"b\": 2, \"ab\": 3, \"<0x21>\": 4}, \"merges\": [[\"a\", \"b\"]],"
                            " \"unk_token\": \"<unk>\"}}", &tok) == COOPT_OK && tok);
    int32_t *ids = NULL;
    size_t   n   = 0;
    CHECK(t, coopt_tokenize(tok, "ab!c", 4, COOPT_TOKENIZE_ADD_BOS, &ids, &n) == COOPT_OK);
    bool ok = n == 3 && ids[0] == 3 && ids[1] == 4 && ids[2] == 0; // no BOS: no post-processor
    free(ids);
    coopt_tokenizer_free(tok);
    CHECK(t, ok);
}

TEST(tokenizer_error_init_vocab) {
    const char             *toks[] = {"<unk>", "<s>", "</s>", "a"};
    struct coopt_vocab_desc d      = {.type = COOPT_TOK_SPM, .n_tokens = 4, .tokens = toks, .bos_id = 4,
                                      .eos_id = 2, .unk_id = 0, .pad_id = -1};
    struct coopt_tokenizer *tok    = (struct coopt_tokenizer *)1;
    CHECK(t, coopt_tokenizer_init_vocab(&d, &tok) == COOPT_ERR_FORMAT && tok == NULL); // bos out of range
    d.bos_id               = 1;
    const char *merges[]   = {"a x"};
    d.n_merges             = 1;
    d.merges               = merges;
    CHECK(t, coopt_tokenizer_init_vocab(&d, &tok) == COOPT_ERR_FORMAT && tok == NULL); // merge of unknown token
    d.n_merges = 0;
    d.n_tokens = 0;
    CHECK(t, coopt_tokenizer_init_vocab(&d, &tok) == COOPT_ERR_FORMAT && tok == NULL);
    d.n_tokens = 4;
    CHECK(t, coopt_tokenizer_init_vocab(&d, &tok) == COOPT_OK && tok);
    CHECK(t, coopt_tokenizer_n_vocab(tok) == 4 && coopt_tokenizer_bos(tok) == 1 && !coopt_tokenizer_is_eog(tok, -1));
    coopt_tokenizer_free(tok);
    coopt_tokenizer_free(NULL);
}

TEST(tokenizer_error_llama2c) {
    NEED_FILE(t, test_model_path("tok512.bin"));
    char  *data = NULL;
    size_t size = 0;
    CHECK(t, coopt_read_file(test_model_path("tok512.bin"), &data, &size) == COOPT_OK);
    const char             *p   = write_temp(data, size - 3, ".bin");
    struct coopt_tokenizer *tok = (struct coopt_tokenizer *)1;
    enum coopt_status       st  = p ? coopt_tokenizer_load(p, &tok) : COOPT_ERR_IO;
    if (p) unlink(p);
    int32_t bad = -5;
    memcpy(data + 8, &bad, 4); // first token length negative
    const char             *q    = write_temp(data, size, ".bin");
    struct coopt_tokenizer *tok2 = NULL;
    enum coopt_status       st2  = q ? coopt_tokenizer_load(q, &tok2) : COOPT_ERR_IO;
    if (q) unlink(q);
    struct coopt_tokenizer *tok3 = NULL;
    enum coopt_status       st3  = coopt_tokenizer_load_llama2c(test_model_path("tok512.bin"), 600, &tok3);
    free(data);
    CHECKF(t, st == COOPT_ERR_FORMAT && tok == NULL, "truncated: %s", coopt_status_str(st));
    CHECKF(t, st2 == COOPT_ERR_FORMAT && tok2 == NULL, "negative length: %s", coopt_status_str(st2));
    CHECKF(t, st3 == COOPT_ERR_FORMAT && tok3 == NULL, "n_vocab past the end: %s", coopt_status_str(st3));
}
