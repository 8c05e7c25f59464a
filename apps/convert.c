/*
 * convert.c -- `coopt convert`: format conversion and MHA -> GQA restructuring (src/convert.h).
 */
#include "common.h"
#include "convert.h"

#include <stdio.h>
#include <string.h>

static void usage(void) {
    fprintf(stderr,
            "usage: coopt convert [--kv-heads G] [--to gguf|hf] [--dtype f32|f16|bf16|q8_0|q4_0] [-v] IN OUT\n"
            "\n"
            "Reads IN (GGUF file, Hugging Face directory or llama2.c checkpoint) and writes OUT as a GGUF file\n"
            "or a Hugging Face directory (config.json, model.safetensors, tokenizer files).\n"
            "\n"
            "  --kv-heads G   restructure attention into G KV heads (Opt-GQA): each group of n_kv_heads/G\n"
            "                 KV heads is replaced by the mean of its k_proj / v_proj rows; G must divide\n"
            "                 n_kv_heads (G = n_kv_heads copies the model unchanged). No fine-tuning.\n"
            "  --to FMT       gguf or hf (default: gguf if OUT ends in .gguf, else the input's format;\n"
            "                 llama2.c input gives gguf)\n"
            "  --dtype T      weight type (default: each tensor's own type where the format holds it,\n"
            "                 else f16); q8_0 / q4_0 for GGUF only. Quantized input is dequantized.\n"
            "  -v             one line per tensor\n");
}

int cmd_convert(int argc, char **argv) {
    struct coopt_convert_params p = coopt_convert_default_params();
    const char                 *pos[2];
    int                         n_pos = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage();
            return 0;
        } else if (!strcmp(a, "--kv-heads")) {
            const char *v = app_next_arg(argc, argv, &i);
            int64_t     g;
            if (!v || !app_parse_int("--kv-heads", v, 1, 1 << 20, &g)) return 1;
            p.kv_heads = (int32_t)g;
        } else if (!strcmp(a, "--to")) {
            const char *v = app_next_arg(argc, argv, &i);
            if (!v) return 1;
            if (!coopt_convert_format_parse(v, &p.to)) {
                fprintf(stderr, "coopt: --to: unknown format '%s' (expected gguf or hf)\n", v);
                return 1;
            }
        } else if (!strcmp(a, "--dtype")) {
            const char      *v = app_next_arg(argc, argv, &i);
            enum coopt_dtype t;
            if (!v) return 1;
            if (!coopt_dtype_parse(v, &t) || (t != COOPT_DTYPE_F32 && t != COOPT_DTYPE_F16 && t != COOPT_DTYPE_BF16 &&
                                              t != COOPT_DTYPE_Q8_0 && t != COOPT_DTYPE_Q4_0)) {
                fprintf(stderr, "coopt: --dtype: '%s' is not a weight type (f32 f16 bf16 q8_0 q4_0)\n", v);
                return 1;
            }
            p.dtype = (int)t;
        } else if (!strcmp(a, "-v") || !strcmp(a, "--verbose")) {
            p.verbose = true;
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "coopt: convert: unknown option '%s'\n", a);
            usage();
            return 1;
        } else if (n_pos < 2) {
            pos[n_pos++] = a;
        } else {
            fprintf(stderr, "coopt: convert: too many arguments ('%s')\n", a);
            return 1;
        }
    }
    if (n_pos != 2) {
        usage();
        return 1;
    }
    enum coopt_status st = coopt_convert(pos[0], pos[1], &p);
    if (st != COOPT_OK) {
        fprintf(stderr, "coopt: convert failed: %s\n", coopt_status_str(st));
        return 1;
    }
    return 0;
}
