/*
 * test_cli.c -- the `coopt` binary as a user runs it: generation, tokenize, bench, and the
 * error messages for bad input (missing or corrupt model, unknown option, oversized prompt).
 * The binary is found beside the test binary (build/coopt); the tests skip if it is missing.
 */
#include "test.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *coopt_bin(void) {
    static char path[4096];
    ssize_t     n = readlink("/proc/self/exe", path, sizeof(path) - 16);
    if (n <= 0) return NULL;
    path[n]     = 0;
    char *slash = strrchr(path, '/');
    if (!slash) return NULL;
    strcpy(slash + 1, "coopt");
    return access(path, X_OK) == 0 ? path : NULL;
}

// Runs `coopt <args>` through the shell, capturing stdout+stderr into out (cap bytes).
// Returns the exit status, or -1.
static int run_cli(const char *args, char *out, size_t cap) {
    const char *bin = coopt_bin();
    if (!bin) return -1;
    char cmd[8192];
    snprintf(cmd, sizeof(cmd), "'%s' %s 2>&1", bin, args);
    FILE *p = popen(cmd, "r");
    if (!p) return -1;
    size_t n = fread(out, 1, cap - 1, p);
    out[n]   = 0;
    int st   = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

#define NEED_BIN(t)                                                                                \
    do {                                                                                           \
        if (!coopt_bin()) SKIP(t, "coopt binary not built beside the test binary");              \
        NEED_FILE(t, test_model_path("stories260K.gguf"));                                         \
        NEED_FILE(t, test_model_path("stories260K.bin"));                                          \
        NEED_FILE(t, test_model_path("llama2-tokenizer/tokenizer.model"));                         \
    } while (0)

TEST(cli_run_stories_greedy) {
    NEED_BIN(t);
    static char out[65536];
    char        args[2048];
    snprintf(args, sizeof(args), "run -m '%s' -p 'Once upon a time' -n 40 --temp 0 -t 1 --device cpu",
             test_model_path("stories260K.gguf"));
    int rc = run_cli(args, out, sizeof(out));
    CHECKF(t, rc == 0, "exit %d: %s", rc, out);
    CHECKF(t, strstr(out, "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."),
           "%s", out);
    CHECKF(t, strstr(out, "generation: 40 tokens"), "%s", out); // (greedy: the generation chained in the context)
    // the same text from the host's sampler loop
    snprintf(args, sizeof(args), "run -m '%s' -p 'Once upon a time' -n 40 --temp 0 --host-sampling -t 1 --device cpu",
             test_model_path("stories260K.gguf"));
    rc = run_cli(args, out, sizeof(out));
    CHECKF(t, rc == 0 && strstr(out, "there was a little girl named Lily. She loved to play outside in the park."), "exit %d: %s", rc, out);
}

// Sampled (the defaults, a fixed seed): the draw made by the context's sample op
// (coopt_ctx_generate) and the host sampler's loop (--host-sampling) print the same text, and
// another seed prints another.
TEST(cli_run_stories_sampled) {
    NEED_BIN(t);
    static char out[3][65536];
    char        args[2048];
    const char *how[3] = {"-s 7", "-s 7 --host-sampling", "-s 8"};
    for (int i = 0; i < 3; i++) {
        snprintf(args, sizeof(args), "run -m '%s' -p 'Once upon a time' -n 60 %s -t 1 --device cpu",
                 test_model_path("stories260K.gguf"), how[i]);
        int rc = run_cli(args, out[i], sizeof(out[i]));
        CHECKF(t, rc == 0, "%s: exit %d: %s", how[i], rc, out[i]);
        // the text only: drop the log lines (timings differ from run to run)
        char *w = out[i];
        for (const char *r = out[i]; *r;) {
            const char *e = strchr(r, '\n');
            size_t      n = e ? (size_t)(e - r) + 1 : strlen(r);
            if (strncmp(r, "coopt:", 6) != 0) memmove(w, r, n), w += n;
            r += n;
        }
        *w = 0;
        CHECKF(t, strlen(out[i]) > 40, "%s: %s", how[i], out[i]);
    }
    CHECKF(t, !strcmp(out[0], out[1]), "chained and host sampling differ:\n%s\n---\n%s", out[0], out[1]);
    CHECKF(t, strcmp(out[0], out[2]), "seeds 7 and 8 printed the same text: %s", out[0]);
}

TEST(cli_tokenize) {
    NEED_BIN(t);
    static char out[65536];
    char        args[2048];
    snprintf(args, sizeof(args), "tokenize -m '%s' -p 'Once upon a time'", test_model_path("llama2-tokenizer/tokenizer.model"));
    CHECK(t, run_cli(args, out, sizeof(out)) == 0);
    CHECKF(t, strstr(out, "[1, 9038, 2501, 263, 931]"), "%s", out);
    snprintf(args, sizeof(args), "tokenize -m '%s' -p 'Once upon a time'", test_model_path("stories260K.bin"));
    CHECK(t, run_cli(args, out, sizeof(out)) == 0);
    CHECKF(t, strstr(out, "[1, 403, 407, 261, 378]"), "%s", out);
}

TEST(cli_bench_table) {
    NEED_BIN(t);
    static char out[65536];
    char        args[2048];
    snprintf(args, sizeof(args), "bench -m '%s' -p 32 -n 8 -r 1 -t 1", test_model_path("stories260K.gguf"));
    CHECKF(t, run_cli(args, out, sizeof(out)) == 0, "%s", out);
    CHECKF(t, strstr(out, "| pp32 |") && strstr(out, "| tg8 |"), "%s", out);
    // the other forms of tg: host sampling, the two sampled ones, and batched with each sequence
    // drawn by its own sampler where the logits are / on the host; then a bad --tg
    static const char *const forms[][2] = {
        {"-p 0 -n 8 --tg host", "| tg8-host |"},
        {"-p 0 -n 8 --tg sample", "| tg8-sample |"},
        {"-p 0 -n 8 --tg sample-host", "| tg8-sample-host |"},
        {"-p 4 -n 8 -B 3 --tg sample", "| tg8 x B3-sample |"},
        {"-p 4 -n 8 -B 3 --tg sample-host", "| tg8 x B3-sample-host |"},
    };
    for (size_t f = 0; f < sizeof(forms) / sizeof(forms[0]); f++) {
        snprintf(args, sizeof(args), "bench -m '%s' -r 1 -t 1 %s", test_model_path("stories260K.gguf"), forms[f][0]);
        CHECKF(t, run_cli(args, out, sizeof(out)) == 0, "%s", out);
        CHECKF(t, strstr(out, forms[f][1]), "%s: %s", forms[f][0], out);
    }
    CHECK(t, run_cli("bench -m x --tg gpu", out, sizeof(out)) == 1);
    CHECKF(t, strstr(out, "--tg: expected device, host, sample or sample-host"), "%s", out);
}

TEST(cli_errors) {
    NEED_BIN(t);
    static char out[65536];
    char        args[4096];
    // missing model
    CHECK(t, run_cli("run -m /nonexistent/model.gguf -p hi", out, sizeof(out)) == 1);
    CHECKF(t, strstr(out, "/nonexistent/model.gguf: no such file or directory"), "%s", out);
    // unknown option and bad value
    CHECK(t, run_cli("run --bogus", out, sizeof(out)) == 1);
    CHECKF(t, strstr(out, "unknown option '--bogus'"), "%s", out);
    CHECK(t, run_cli("run -m x -n many", out, sizeof(out)) == 1);
    CHECKF(t, strstr(out, "-n: 'many' is not an integer"), "%s", out);
    CHECK(t, run_cli("frobnicate", out, sizeof(out)) == 1);
    CHECKF(t, strstr(out, "unknown command 'frobnicate'"), "%s", out);
    // a file that is not a model
    snprintf(args, sizeof(args), "run -m '%s' -p hi", test_data_path("tinystories-sample.txt"));
    CHECK(t, run_cli(args, out, sizeof(out)) == 1);
    CHECKF(t, strstr(out, "failed to load model"), "%s", out);
    // a truncated GGUF
    char tmp[] = "/tmp/coopt_cli_XXXXXX";
    int  fd    = mkstemp(tmp);
    CHECK(t, fd >= 0);
    FILE *src = fopen(test_model_path("stories260K.gguf"), "rb");
    CHECK(t, src);
    char buf[4096];
    size_t n = fread(buf, 1, sizeof(buf), src);
    fclose(src);
    CHECK(t, write(fd, buf, n) == (ssize_t)n);
    close(fd);
    snprintf(args, sizeof(args), "run -m '%s' -p hi", tmp);
    int rc = run_cli(args, out, sizeof(out));
    unlink(tmp);
    CHECK(t, rc == 1);
    CHECKF(t, strstr(out, tmp) && strstr(out, "failed to load model"), "%s", out);
    // a prompt longer than the context
    snprintf(args, sizeof(args), "run -m '%s' -c 16 -p 'Once upon a time there was a little girl named Lily who loved to play'",
             test_model_path("stories260K.gguf"));
    CHECK(t, run_cli(args, out, sizeof(out)) == 1);
    CHECKF(t, strstr(out, "more than the context"), "%s", out);
    // bench --capacity only where running out of KV memory is a status (the GPU's mapped pool)
    snprintf(args, sizeof(args), "bench -m '%s' --device cpu --capacity 64", test_model_path("stories260K.gguf"));
    CHECK(t, run_cli(args, out, sizeof(out)) == 1);
    CHECKF(t, strstr(out, "--capacity needs --device cuda"), "%s", out);
    CHECK(t, run_cli("bench -m x --capacity 0", out, sizeof(out)) == 1);
}
