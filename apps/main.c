/*
 * main.c -- the coopt binary: one executable, subcommands.
 */
#include "common.h"

#include <stdio.h>
#include <string.h>

static void usage(void) {
    fprintf(stderr,
            "usage: coopt <command> [options]\n"
            "\n"
            "commands:\n"
            "  run        generate text from a prompt, or chat with -i\n"
            "  tokenize   print the token ids of a text\n"
            "  bench      prompt-processing and generation speed (llama-bench style)\n"
            "  perplexity perplexity of a text file (llama-perplexity conventions), KL divergence\n"
            "  lambada    LAMBADA last-word accuracy\n"
            "  quantize   GPTQ / round-to-nearest 4-bit quantization to a GPTQ checkpoint\n"
            "  convert    restructure attention to G KV heads (MHA -> GQA), convert formats\n"
            "  synth      random-weight model in the exact shape and format of a named architecture\n"
            "\n"
            "`coopt <command> --help` shows the options of a command.\n");
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        usage();
        return argc < 2 ? 1 : 0;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "run")) return cmd_run(argc - 1, argv + 1);
    if (!strcmp(cmd, "tokenize")) return cmd_tokenize(argc - 1, argv + 1);
    if (!strcmp(cmd, "bench")) return cmd_bench(argc - 1, argv + 1);
    if (!strcmp(cmd, "perplexity")) return cmd_perplexity(argc - 1, argv + 1);
    if (!strcmp(cmd, "lambada")) return cmd_lambada(argc - 1, argv + 1);
    if (!strcmp(cmd, "quantize")) return cmd_quantize(argc - 1, argv + 1);
    if (!strcmp(cmd, "convert")) return cmd_convert(argc - 1, argv + 1);
    if (!strcmp(cmd, "synth")) return cmd_synth(argc - 1, argv + 1);
    fprintf(stderr, "coopt: unknown command '%s'\n", cmd);
    usage();
    return 1;
}
