/*
 * fuzz_tokenizer.c -- libFuzzer target (make fuzz): the input is either a tokenizer.json (first
 * byte even) that is loaded, then used to encode and decode a fixed text; or (first byte odd)
 * arbitrary bytes encoded and decoded with a fixed tokenizer (tests/golden/tok_bytelevel.json,
 * or $COOPT_FUZZ_TOKENIZER), with PARSE_SPECIAL taken from the second byte.
 */
#include "fuzz_util.h"
#include "tokenizer.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static struct coopt_tokenizer *fixed;
    static int                     init;
    if (!init) {
        init = 1;
        coopt_log_set_quiet(1);
        const char *p = getenv("COOPT_FUZZ_TOKENIZER");
        coopt_tokenizer_load(p ? p : "tests/golden/tok_bytelevel.json", &fixed);
    }
    if (size < 1) return 0;
    if (data[0] & 1) {
        if (fixed && size >= 2)
            fuzz_roundtrip(fixed, (const char *)data + 2, size - 2, data[1] & 1 ? COOPT_TOKENIZE_PARSE_SPECIAL : 0);
        return 0;
    }
    char path[] = "/tmp/coopt_fuzz_tok_XXXXXX.json";
    if (!fuzz_write_temp(path, 5, data + 1, size - 1)) return 0;
    struct coopt_tokenizer *tok = NULL;
    if (coopt_tokenizer_load_json(path, &tok) == COOPT_OK) {
        static const char text[] = "Hello world! I'll  pay 12345 <s> \xe2\x96\x81 \xf0\x9f\x98\x80\xff\n";
        fuzz_roundtrip(tok, text, sizeof(text) - 1, COOPT_TOKENIZE_ADD_BOS | COOPT_TOKENIZE_PARSE_SPECIAL);
    }
    coopt_tokenizer_free(tok);
    unlink(path);
    return 0;
}
