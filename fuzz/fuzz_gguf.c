/*
 * fuzz_gguf.c -- libFuzzer target for the GGUF reader: parses the input as a GGUF image, then
 * runs every getter and array converter on every key, looks up every tensor and builds the
 * tokenizer from the metadata. Build with `make fuzz`; run e.g.
 *   build-fuzz/fuzz_gguf -close_fd_mask=2 -max_total_time=180 corpus/
 * with a corpus seeded from stories260K.gguf and small files from the writer.
 */
#include "gguf.h"
#include "util.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct coopt_gguf *g;
    if (coopt_gguf_parse(data, size, "fuzz.gguf", &g) != COOPT_OK) return 0;
    for (int64_t i = 0; i < g->n_kv; i++) {
        const char *key = g->kv[i].key;
        if (coopt_gguf_find_key(g, key) != &g->kv[i]) abort();
        uint32_t u32;
        int32_t  i32;
        uint64_t u64;
        float    f;
        bool     b;
        const char *s;
        size_t      len;
        coopt_gguf_get_u32(g, key, true, &u32);
        coopt_gguf_get_i32(g, key, true, &i32);
        coopt_gguf_get_u64(g, key, true, &u64);
        coopt_gguf_get_f32(g, key, true, &f);
        coopt_gguf_get_bool(g, key, true, &b);
        if (coopt_gguf_get_str(g, key, true, &s, &len) == COOPT_OK && len > 0) {
            volatile char c = s[len - 1]; // must be inside the buffer
            (void)c;
        }
        struct coopt_gguf_value arr;
        if (coopt_gguf_get_arr(g, key, true, &arr) != COOPT_OK || arr.n > (1u << 20)) continue;
        size_t      n    = (size_t)arr.n ? (size_t)arr.n : 1;
        const char **ptr = malloc(n * sizeof(*ptr));
        uint32_t    *lens = malloc(n * sizeof(*lens));
        float       *fv   = malloc(n * sizeof(*fv));
        int32_t     *iv   = malloc(n * sizeof(*iv));
        if (ptr && lens && fv && iv) {
            if (coopt_gguf_arr_strings(g, key, &arr, ptr, lens) == COOPT_OK) {
                for (size_t k = 0; k < arr.n; k++)
                    if (lens[k]) {
                        volatile char c = ptr[k][lens[k] - 1];
                        (void)c;
                    }
            }
            coopt_gguf_arr_f32(g, key, &arr, fv);
            coopt_gguf_arr_i32(g, key, &arr, iv);
        }
        free(ptr), free(lens), free(fv), free(iv);
    }
    for (int64_t i = 0; i < g->n_tensors; i++) {
        const struct coopt_gguf_tensor *t = &g->tensors[i];
        if (coopt_gguf_find_tensor(g, t->name) != t) abort();
        if (t->n_bytes) {
            // first and last byte of the data must be inside the input
            volatile uint8_t c = ((const uint8_t *)t->data)[0] ^ ((const uint8_t *)t->data)[t->n_bytes - 1];
            (void)c;
        }
        enum coopt_dtype dt;
        coopt_gguf_tensor_dtype(g, t, &dt);
    }
    struct coopt_tokenizer *tok;
    if (coopt_gguf_tokenizer_from(g, &tok) == COOPT_OK) coopt_tokenizer_free(tok);
    coopt_gguf_close(g);
    return 0;
}
