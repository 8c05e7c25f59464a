/*
 * fuzz_safetensors.c -- libFuzzer target: coopt_safetensors_parse on arbitrary bytes. Every
 * parsed tensor's data range is read back, so a bounds bug in the validation shows up as an
 * ASan report here rather than in a model load.
 * Run with -close_fd_mask=2 to hide the (expected) error messages.
 */
#include "safetensors.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    struct coopt_safetensors *st = NULL;
    if (coopt_safetensors_parse(data, size, "fuzz", &st) != COOPT_OK) return 0;
    volatile uint8_t acc = 0;
    for (int i = 0; i < st->n_tensors; i++) {
        const struct coopt_st_tensor *t = &st->tensors[i];
        if (coopt_safetensors_find(st, t->name) != t) __builtin_trap();
        const uint8_t *p = t->data;
        if (t->n_bytes) acc ^= p[0] ^ p[t->n_bytes - 1];
    }
    for (int i = 0; i < st->n_meta; i++)
        acc ^= (uint8_t)strlen(st->meta_vals[i]);
    coopt_safetensors_free(st);
    return 0;
}
