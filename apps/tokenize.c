/*
 * tokenize.c -- `coopt tokenize`: print the token ids of a text. Accepts a model (GGUF, HF
 * directory, llama2.c checkpoint), a tokenizer.json, a tokenizer.model, a llama2.c tokenizer
 * .bin, or a vocab-only GGUF.
 */
#include "common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void tokenize_usage(void) {
    fprintf(stderr, "usage: coopt tokenize -m MODEL_OR_TOKENIZER (-p TEXT | -f FILE) [--no-bos] [--no-parse-special] "
                    "[--pieces] [--count]\n");
}

// A llama2.c model checkpoint (not a tokenizer .bin) needs the whole model loader.
static bool is_llama2c_model(const char *path) {
    size_t n = strlen(path);
    if (n < 4 || strcmp(path + n - 4, ".bin") != 0) return false;
    const char *base = strrchr(path, '/');
    base             = base ? base + 1 : path;
    return strncmp(base, "tok", 3) != 0;
}

int cmd_tokenize(int argc, char **argv) {
    const char *path = NULL, *text = NULL, *file = NULL;
    bool        add_bos = true, parse_special = true, pieces = false, count = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (!(path = app_next_arg(argc, argv, &i))) return 1;
        } else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) {
            if (!(text = app_next_arg(argc, argv, &i))) return 1;
        } else if (!strcmp(a, "-f") || !strcmp(a, "--file")) {
            if (!(file = app_next_arg(argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--no-bos")) {
            add_bos = false;
        } else if (!strcmp(a, "--no-parse-special")) {
            parse_special = false;
        } else if (!strcmp(a, "--pieces")) {
            pieces = true;
        } else if (!strcmp(a, "--count")) {
            count = true;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            tokenize_usage();
            return 0;
        } else {
            fprintf(stderr, "coopt tokenize: unknown option '%s'\n", a);
            tokenize_usage();
            return 1;
        }
    }
    if (!path || (!text && !file)) {
        tokenize_usage();
        return 1;
    }
    char  *buf = NULL;
    size_t len = 0;
    if (file) {
        FILE *f = fopen(file, "rb");
        if (!f) {
            perror(file);
            return 1;
        }
        size_t cap = 1 << 16;
        buf        = malloc(cap);
        size_t r;
        while (buf && (r = fread(buf + len, 1, cap - len, f)) > 0) {
            len += r;
            if (len == cap) buf = realloc(buf, cap *= 2);
        }
        fclose(f);
        if (!buf) return 1;
        text = buf;
    } else {
        len = strlen(text);
    }

    struct coopt_model           *model = NULL;
    struct coopt_tokenizer       *owned = NULL;
    const struct coopt_tokenizer *tok   = NULL;
    enum coopt_status             st;
    if (is_llama2c_model(path)) {
        st  = coopt_model_load(path, NULL, &model);
        tok = model ? coopt_model_tokenizer(model) : NULL;
    } else {
        st  = coopt_tokenizer_load(path, &owned);
        tok = owned;
    }
    if (st != COOPT_OK) {
        fprintf(stderr, "coopt: cannot load a tokenizer from '%s': %s\n", path, coopt_status_str(st));
        free(buf);
        return 1;
    }
    int32_t *ids = NULL;
    size_t   n   = 0;
    unsigned fl  = (add_bos ? COOPT_TOKENIZE_ADD_BOS : 0) | (parse_special ? COOPT_TOKENIZE_PARSE_SPECIAL : 0);
    st           = coopt_tokenize(tok, text, len, fl, &ids, &n);
    if (st == COOPT_OK) {
        if (count) {
            printf("%zu\n", n);
        } else if (pieces) {
            struct coopt_detok d;
            coopt_detok_reset(&d);
            for (size_t i = 0; i < n; i++) {
                char   piece[256];
                size_t pl = coopt_detok_push(&d, tok, ids[i], piece, sizeof(piece));
                printf("%6d -> '%.*s'\n", ids[i], (int)pl, piece);
            }
        } else {
            putchar('[');
            for (size_t i = 0; i < n; i++) printf(i ? ", %d" : "%d", ids[i]);
            puts("]");
        }
    } else {
        fprintf(stderr, "coopt: tokenize failed: %s\n", coopt_status_str(st));
    }
    free(ids);
    free(buf);
    coopt_tokenizer_free(owned);
    coopt_model_free(model);
    return st == COOPT_OK ? 0 : 1;
}
