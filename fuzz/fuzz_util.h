/*
 * fuzz_util.h -- shared by the libFuzzer targets: a tokenizer round trip that checks every id.
 */
#ifndef COOPT_FUZZ_UTIL_H
#define COOPT_FUZZ_UTIL_H

#include "tokenizer.h"

#include <stdlib.h>

// Encodes text with flags, checks every id is inside the vocabulary (abort: the fuzzer reports
// it), and decodes the ids one by one.
static inline void fuzz_roundtrip(const struct coopt_tokenizer *tok, const char *text, size_t len, unsigned flags) {
    int32_t *ids = NULL;
    size_t   n   = 0;
    if (coopt_tokenize(tok, text, len, flags, &ids, &n) != COOPT_OK) return;
    struct coopt_detok d;
    coopt_detok_reset(&d);
    char out[64];
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= coopt_tokenizer_n_vocab(tok)) abort();
        coopt_detok_push(&d, tok, ids[i], out, sizeof(out));
    }
    coopt_detok_flush(&d, out, sizeof(out));
    free(ids);
}

#endif
