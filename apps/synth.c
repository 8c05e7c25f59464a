/*
 * synth.c -- `coopt synth`: write a random-weight model in the exact shape and Hugging Face
 * format of a named architecture (library: src/synth.c).
 */
#include "common.h"

#include "synth.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void synth_usage(void) {
    fprintf(stderr,
            "usage: coopt synth --arch NAME --dtype gptq4|f16|bf16 -o DIR [options]\n"
            "\n"
            "Writes a Hugging Face directory (config.json, safetensors shards + index, tokenizer) with\n"
            "random weights in the exact shapes and on-disk format of a real checkpoint, streamed to\n"
            "disk chunk by chunk (memory stays small for any size). For speed measurements only.\n"
            "\n"
            "  --arch NAME           %s\n"
            "  --dtype T             gptq4 (GPTQ v1 checkpoint, 4-bit sym, f16 embeddings/lm_head/norms),\n"
            "                        f16 or bf16\n"
            "  --group-size N        GPTQ group size, a multiple of 8 or -1 (default 128)\n"
            "  --act-order           GPTQ desc_act: g_idx is a random permutation-consistent map\n"
            "  --layers N            override the layer count (recorded in config.json and the name)\n"
            "  --vocab N             override vocab_size (embedding and LM head rows)\n"
            "  --seed S              random seed (default 1); same seed, same files\n"
            "  --max-shard-size SZ   tensor bytes per safetensors shard: 5GB (default), 500MB, bytes\n"
            "  --tokenizer PATH      tokenizer.model to copy\n"
            "                        (default $COOPT_MODELS/llama2-tokenizer/tokenizer.model)\n"
            "  -o, --out DIR         output directory (created if missing)\n"
            "  --list                list the architectures with their sizes and exit\n"
            "  -q, --quiet           no progress output\n"
            "\n"
            "Weights (mean, variance): embeddings N(0,1), q/k/v/gate/up N(0,1/n_in), o/down N(0,1/(2 L n_in)),\n"
            "norms 1, lm_head N(0,1/dim); GPTQ codes are quantized by construction (zero point 8).\n"
            "Tokenizer: the Llama 2 tokenizer.model (32000 ids) for every architecture. llama3-8b keeps\n"
            "its real vocab_size 128256 and bos/eos ids 128000/128001, so its embedding has more rows\n"
            "than the tokenizer has ids (no real Llama 3 tokenizer is available here; the loader allows\n"
            "this; the tokenizer itself adds BOS 1).\n",
            coopt_synth_arch_names());
}

// "5GB", "500MB", "1.5G", "123" (bytes); decimal units as transformers' max_shard_size.
static bool parse_size(const char *s, uint64_t *out) {
    char  *end;
    double v = strtod(s, &end);
    if (end == s || !(v > 0)) return false;
    while (isspace((unsigned char)*end))
        end++;
    double mul = 1;
    switch (toupper((unsigned char)*end)) {
    case 'K': mul = 1e3; end++; break;
    case 'M': mul = 1e6; end++; break;
    case 'G': mul = 1e9; end++; break;
    case 'T': mul = 1e12; end++; break;
    default: break;
    }
    if (toupper((unsigned char)*end) == 'B') end++;
    if (*end || v * mul < 1 || v * mul > 1e15) return false;
    *out = (uint64_t)(v * mul);
    return true;
}

static void list_archs(void) {
    printf("%-16s %6s %6s %4s %6s %7s %5s %8s %9s %9s\n", "arch", "dim", "ffn", "L", "H/KV", "vocab", "ctx",
           "params", "f16 GB", "gptq4 GB");
    for (int i = 0; i < coopt_synth_arch_count(); i++) {
        const struct coopt_synth_arch *a = coopt_synth_arch_at(i);
        struct coopt_synth_params      p = coopt_synth_default_params();
        struct coopt_synth_result      rf, rq;
        p.arch    = a->name;
        p.out_dir = ".";
        p.dtype   = COOPT_DTYPE_F16;
        if (coopt_synth_plan(&p, &rf) != COOPT_OK) continue;
        p.dtype = COOPT_DTYPE_Q4_GPTQ;
        if (coopt_synth_plan(&p, &rq) != COOPT_OK) continue;
        char hkv[16];
        snprintf(hkv, sizeof(hkv), "%d/%d", (int)a->n_heads, (int)a->n_kv_heads);
        printf("%-16s %6d %6d %4d %6s %7d %5d %7.2fB %9.2f %9.2f\n", a->name, (int)a->dim, (int)a->ffn_dim,
               (int)a->n_layers, hkv, (int)a->n_vocab, (int)a->n_ctx, (double)rf.n_params / 1e9,
               (double)rf.tensor_bytes / 1e9, (double)rq.tensor_bytes / 1e9);
    }
}

int cmd_synth(int argc, char **argv) {
    struct coopt_synth_params p = coopt_synth_default_params();
    const char               *dtype = NULL;
    bool                      gs_set = false, quiet = false;
    p.progress                       = true;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int64_t     n;
        if (!strcmp(a, "--arch")) {
            if (!(p.arch = app_next_arg(argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--dtype")) {
            if (!(dtype = app_next_arg(argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--group-size")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_int(a, v, -1, 1 << 20, &n)) return 1;
            p.group_size = (int32_t)n;
            gs_set       = true;
        } else if (!strcmp(a, "--act-order")) {
            p.act_order = true;
        } else if (!strcmp(a, "--layers")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_int(a, v, 1, 1024, &n)) return 1;
            p.n_layers = (int32_t)n;
        } else if (!strcmp(a, "--vocab")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_int(a, v, 1, 1 << 24, &n)) return 1;
            p.n_vocab = (int32_t)n;
        } else if (!strcmp(a, "--seed")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_int(a, v, 0, INT64_MAX, &n)) return 1;
            p.seed = (uint64_t)n;
        } else if (!strcmp(a, "--max-shard-size")) {
            if (!(v = app_next_arg(argc, argv, &i))) return 1;
            if (!parse_size(v, &p.max_shard_bytes)) {
                fprintf(stderr, "coopt: --max-shard-size: '%s' is not a size (e.g. 5GB, 500MB, 1000000)\n", v);
                return 1;
            }
        } else if (!strcmp(a, "--tokenizer")) {
            if (!(p.tokenizer = app_next_arg(argc, argv, &i))) return 1;
        } else if (!strcmp(a, "-o") || !strcmp(a, "--out")) {
            if (!(p.out_dir = app_next_arg(argc, argv, &i))) return 1;
        } else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) {
            quiet = true;
        } else if (!strcmp(a, "--list")) {
            list_archs();
            return 0;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            synth_usage();
            return 0;
        } else {
            fprintf(stderr, "coopt synth: unknown option '%s'\n", a);
            synth_usage();
            return 1;
        }
    }
    if (!p.arch || !dtype || !p.out_dir) {
        fprintf(stderr, "coopt synth: --arch, --dtype and -o are required\n");
        synth_usage();
        return 1;
    }
    if (!coopt_dtype_parse(dtype, &p.dtype) ||
        (p.dtype != COOPT_DTYPE_Q4_GPTQ && p.dtype != COOPT_DTYPE_F16 && p.dtype != COOPT_DTYPE_BF16)) {
        fprintf(stderr, "coopt synth: --dtype '%s' is not supported (supported: gptq4, f16, bf16)\n", dtype);
        return 1;
    }
    if (p.dtype != COOPT_DTYPE_Q4_GPTQ && (gs_set || p.act_order)) {
        fprintf(stderr, "coopt synth: --group-size and --act-order apply to --dtype gptq4 only\n");
        return 1;
    }
    p.progress = !quiet;

    struct coopt_synth_result r;
    if (coopt_synth_write(&p, &r) != COOPT_OK) return 1;
    if (!quiet) {
        fprintf(stderr, "synth: %s: %d layers, %.2fB params, %d tensors, %d file%s, %.2f GB in %.1f s (%.0f MB/s) -> %s\n",
                r.model_name, (int)r.n_layers, (double)r.n_params / 1e9, (int)r.n_tensors, (int)r.n_shards,
                r.n_shards == 1 ? "" : "s", (double)r.tensor_bytes / 1e9, r.seconds,
                r.seconds > 0 ? (double)r.tensor_bytes / r.seconds / 1e6 : 0.0, p.out_dir);
    }
    return 0;
}
