/*
 * fuzz_binfiles.c -- libFuzzer target (make fuzz) for the binary loaders the other targets do not
 * reach. The first byte picks one, the rest is the file:
 *   0: a SentencePiece tokenizer.model (protobuf), loaded, then a fixed text encoded and decoded;
 *   1: a llama2.c tokenizer.bin read to its end (n_vocab 0), then the same round trip;
 *   2: a llama2.c tokenizer.bin read for n_vocab = the second byte (1..255);
 *   3: a llama2.c checkpoint (.bin), loaded through coopt_model_load, with the tokenizer
 *      $COOPT_TOKENIZER (default: tok512.bin under $COOPT_MODELS or ../shared/models).
 * Run e.g. build-fuzz/fuzz_binfiles -close_fd_mask=2 -max_total_time=180 corpus/ with a corpus
 * seeded by the test models prefixed with their mode byte (printf '\x01' | cat - tok512.bin, ...).
 */
#include "coopt.h"
#include "fuzz_util.h"
#include "tokenizer.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void roundtrip(const struct coopt_tokenizer *tok) {
    static const char text[] = "Once upon a time, <s> there was \xe2\x96\x81 a cat \xf0\x9f\x98\x80\xff 12345\n";
    fuzz_roundtrip(tok, text, sizeof(text) - 1, COOPT_TOKENIZE_ADD_BOS | COOPT_TOKENIZE_PARSE_SPECIAL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int init;
    if (!init) {
        init = 1;
        coopt_log_set_quiet(1);
        if (!getenv("COOPT_TOKENIZER")) {
            const char *m = getenv("COOPT_MODELS");
            char        p[4096];
            snprintf(p, sizeof(p), "%s/tok512.bin", m && *m ? m : "../shared/models");
            setenv("COOPT_TOKENIZER", p, 1);
        }
    }
    if (size < 2) return 0;
    const int      mode = data[0] & 3;
    const uint8_t *body = data + 1;
    size_t         n    = size - 1;
    int32_t        n_vocab = 0;
    if (mode == 2) n_vocab = data[1] ? data[1] : 1, body++, n--;
    char path[] = "/tmp/coopt_fuzz_bin_XXXXXX.bin";
    if (!fuzz_write_temp(path, 4, body, n)) return 0;
    struct coopt_tokenizer *tok = NULL;
    if (mode == 0 && coopt_tokenizer_load_spm(path, &tok) == COOPT_OK) roundtrip(tok);
    if ((mode == 1 || mode == 2) && coopt_tokenizer_load_llama2c(path, n_vocab, &tok) == COOPT_OK) roundtrip(tok);
    coopt_tokenizer_free(tok);
    if (mode == 3) {
        struct coopt_model_params mp = coopt_model_default_params();
        struct coopt_model       *m  = NULL;
        if (coopt_model_load(path, &mp, &m) == COOPT_OK) {
            const struct coopt_model_info *info = coopt_model_get_info(m);
            if (info->n_vocab <= 0 || info->dim <= 0) abort();
            coopt_model_free(m);
        }
    }
    unlink(path);
    return 0;
}
