/*
 * quantize.c -- `coopt quantize`: GPTQ or round-to-nearest 4-bit quantization of a Hugging Face
 * model directory into a standard GPTQ checkpoint (src/quantize.h does the work).
 */
#include "common.h"
#include "quantize.h"

#include <stdio.h>
#include <string.h>

#define MAX_CALIB_FILES 16

static void quantize_usage(void) {
    fprintf(stderr,
            "usage: coopt quantize -m MODEL -o OUT_DIR [options]\n"
            "  -m, --model PATH       Hugging Face model directory (config.json, safetensors, tokenizer), or a\n"
            "                         GGUF / llama2.c file together with --tokenizer-dir\n"
            "  --tokenizer-dir DIR    Hugging Face directory whose tokenizer files ship with a GGUF / llama2.c\n"
            "                         input (must encode like the model's vocabulary; checked)\n"
            "  -o, --output DIR       output GPTQ checkpoint directory (created if missing)\n"
            "  --method gptq|rtn      GPTQ with calibration (default) or round to nearest\n"
            "  --bits N               bits per weight (4)\n"
            "  --group-size N         input columns per scale/zero (default 128; -1 = one group per row)\n"
            "  --act-order            quantize columns in order of decreasing Hessian diagonal (desc_act)\n"
            "  --sym | --asym         symmetric (zero = 8, default) or asymmetric zero points\n"
            "  --damp X               dampening as a fraction of the mean Hessian diagonal (0.01)\n"
            "  --calib FILE           calibration text (repeatable; files are concatenated)\n"
            "  --n-calib N            calibration sequences (128)\n"
            "  --calib-len N          tokens per calibration sequence (512)\n"
            "  --sequential MODE      layer (default): layer l calibrated with layers < l quantized;\n"
            "                         true: also q/k/v -> o -> gate/up -> down inside a layer;\n"
            "                         none: every Hessian from the float model (one pass)\n"
            "  --dump-dequant FILE    also write the dequantized f32 weights (for scripts/check_gptq_checkpoint.py)\n"
            "  -t, --threads N        CPU threads (default: all cores)\n");
}

int cmd_quantize(int argc, char **argv) {
    struct coopt_quantize_opts o = coopt_quantize_default_opts();
    const char *model = NULL, *out = NULL, *calib[MAX_CALIB_FILES];
    int         n_calib_files = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        int64_t     n;
        double      d;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            quantize_usage();
            return 0;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (!(model = app_next_arg(argc, argv, &i))) return 1;
        } else if (!strcmp(a, "-o") || !strcmp(a, "--output")) {
            if (!(out = app_next_arg(argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--method")) {
            if (!(v = app_next_arg(argc, argv, &i))) return 1;
            if (strcmp(v, "gptq") && strcmp(v, "rtn")) {
                fprintf(stderr, "coopt: --method: '%s' is not gptq or rtn\n", v);
                return 1;
            }
            o.gptq = !strcmp(v, "gptq");
        } else if (!strcmp(a, "--bits")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_int(a, v, 2, 8, &n)) return 1;
            o.qp.bits = (int32_t)n;
        } else if (!strcmp(a, "--group-size")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_int(a, v, -1, 1 << 20, &n)) return 1;
            o.qp.group_size = (int32_t)n;
        } else if (!strcmp(a, "--act-order") || !strcmp(a, "--desc-act")) {
            o.qp.act_order = true;
        } else if (!strcmp(a, "--sym")) {
            o.qp.sym = true;
        } else if (!strcmp(a, "--asym")) {
            o.qp.sym = false;
        } else if (!strcmp(a, "--damp")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_float(a, v, 0, 0.999, &d)) return 1;
            o.qp.damp = d;
        } else if (!strcmp(a, "--calib")) {
            if (!(v = app_next_arg(argc, argv, &i))) return 1;
            if (n_calib_files == MAX_CALIB_FILES) {
                fprintf(stderr, "coopt: at most %d --calib files\n", MAX_CALIB_FILES);
                return 1;
            }
            calib[n_calib_files++] = v;
        } else if (!strcmp(a, "--n-calib")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_int(a, v, 1, 1 << 20, &n)) return 1;
            o.n_calib = (int32_t)n;
        } else if (!strcmp(a, "--calib-len")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_int(a, v, 2, 1 << 16, &n)) return 1;
            o.calib_len = (int32_t)n;
        } else if (!strcmp(a, "--sequential")) {
            if (!(v = app_next_arg(argc, argv, &i))) return 1;
            if (!strcmp(v, "none")) o.sequential = COOPT_QUANT_SEQ_NONE;
            else if (!strcmp(v, "layer")) o.sequential = COOPT_QUANT_SEQ_LAYER;
            else if (!strcmp(v, "true")) o.sequential = COOPT_QUANT_SEQ_TRUE;
            else {
                fprintf(stderr, "coopt: --sequential: '%s' is not none, layer or true\n", v);
                return 1;
            }
        } else if (!strcmp(a, "--tokenizer-dir")) {
            if (!(o.tokenizer_dir = app_next_arg(argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--dump-dequant")) {
            if (!(o.dump_dequant = app_next_arg(argc, argv, &i))) return 1;
        } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
            if (!(v = app_next_arg(argc, argv, &i)) || !app_parse_int(a, v, 1, 1024, &n)) return 1;
            o.n_threads = (int32_t)n;
        } else {
            fprintf(stderr, "coopt: quantize: unknown option '%s'\n", a);
            quantize_usage();
            return 1;
        }
    }
    if (!model || !out) {
        fprintf(stderr, "coopt: quantize needs -m MODEL and -o OUT_DIR\n");
        quantize_usage();
        return 1;
    }
    if (o.gptq && n_calib_files == 0) {
        fprintf(stderr, "coopt: --method gptq needs calibration text (--calib FILE)\n");
        return 1;
    }
    o.calib_files   = calib;
    o.n_calib_files = n_calib_files;
    enum coopt_status st = coopt_quantize_model(model, out, &o);
    if (st != COOPT_OK) {
        fprintf(stderr, "coopt: quantize failed: %s\n", coopt_status_str(st));
        return 1;
    }
    fprintf(stderr, "coopt: wrote %s\n", out);
    return 0;
}
