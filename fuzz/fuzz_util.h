/*
 * fuzz_util.h -- shared by the libFuzzer targets: a tokenizer round trip that checks every id, and
 * the input written to a temporary file for the loaders that take a path.
 */
#ifndef COOPT_FUZZ_UTIL_H
#define COOPT_FUZZ_UTIL_H

#include "tokenizer.h"

#include <stdbool.h>
#include <stdlib.h>
#include <unistd.h>

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

// Writes data to a new file named from the mkstemps template path (its last suffix_len characters
// kept). True: the file holds all of it (the caller unlinks it); false: no file is left.
static inline bool fuzz_write_temp(char *path, int suffix_len, const uint8_t *data, size_t n) {
    const int fd = mkstemps(path, suffix_len);
    if (fd < 0) return false;
    const ssize_t w = write(fd, data, n);
    close(fd);
    if (w == (ssize_t)n) return true;
    unlink(path);
    return false;
}

#endif
