/*
 * bench_attn.c -- decode attention on the CPU: time per token per layer for one sequence, and the
 * KV read rate it implies (GB/s and fraction of the machine's read bandwidth, measured with
 * dev/membw.c and passed as the second argument), across context lengths, KV types, threads,
 * grouped (Opt-GQA) vs per-head reads and split-K partitions (Opt-Pa) on / off.
 *
 *   make CUDA=0 build/libcoopt.a && cc -O3 -march=native -std=c11 -D_GNU_SOURCE -Iinclude -Isrc \
 *       dev/bench_attn.c build/libcoopt.a -lm -lpthread -o build/bench_attn
 *   cc -O3 -march=native -pthread dev/membw.c -o build/membw && ./build/membw 2   # -> e.g. 94
 *   ./build/bench_attn [reps] [membw_GBps_2_threads] [membw_GBps_1_thread] [working_set_MiB] [model]
 *
 * Bytes per token per layer = ctx * 2 (K, V) * n_kv_heads * head_dim * elem_bytes (+ ctx * 2 *
 * n_kv_heads * 4 bytes of FP8 scales). Each configuration cycles over enough layers (distinct
 * memory, like a real forward pass) that the working set is >= 256 MiB, well past the 32 MiB L3,
 * so the numbers come from DRAM. Per-head reads count the same bytes (the data the kernel needs);
 * per-head re-reads of a KV head by the group's other query heads may hit the L2/L3, which is
 * what that read pattern does on a real machine too. Best of `reps` passes: other processes on
 * the machine lower the numbers; report what you measure and say so.
 */
#include "backend.h"
#include "dtype.h"
#include "kv_cache.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define PAGE_SIZE   16
#define HEAD_DIM    128

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

// Fills one page with valid values of the type (content does not change the timing), then
// copies it to every page.
static void fill_pool(const struct coopt_kv_layout *l, uint8_t *pool, int64_t n_pages) {
    uint8_t *pg = pool;
    uint64_t s  = 88172645463325252ull;
    for (size_t i = 0; i < l->data_bytes / l->elem_bytes; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        float x = ((float)(s >> 40) / (float)(1 << 24) - 0.5f);
        switch (l->dtype) {
        case COOPT_DTYPE_F32: memcpy(pg + i * 4, &x, 4); break;
        case COOPT_DTYPE_F16: {
            uint16_t h = coopt_f32_to_f16(x);
            memcpy(pg + i * 2, &h, 2);
        } break;
        case COOPT_DTYPE_FP8_E4M3: pg[i] = coopt_f32_to_fp8_e4m3(x * 800.0f); break;
        case COOPT_DTYPE_FP8_E5M2: pg[i] = coopt_f32_to_fp8_e5m2(x * 800.0f); break;
        default: break;
        }
    }
    if (l->has_scales)
        for (size_t i = l->data_bytes; i + 4 <= l->page_bytes; i += 4) memcpy(pg + i, &(float){1.0f / 448.0f}, 4);
    for (int64_t p = 1; p < n_pages; p++) memcpy(pool + (size_t)p * l->page_bytes, pg, l->page_bytes);
}

int main(int argc, char **argv) {
    int    reps    = argc > 1 ? atoi(argv[1]) : 5;
    double bw2     = argc > 2 ? atof(argv[2]) : 94.0;
    double bw1     = argc > 3 ? atof(argv[3]) : 48.0;
    double ws      = (argc > 4 ? atof(argv[4]) : 256.0) * (1 << 20); // working set (bytes); small = in cache
    const char *only = argc > 5 ? argv[5] : NULL;                     // run only this model ("32/8")
    struct coopt_backend *be[2];
    if (coopt_cpu_backend_init(1, false, &be[0]) != COOPT_OK || coopt_cpu_backend_init(2, false, &be[1]) != COOPT_OK)
        return 1;
    const struct {
        const char *name;
        int32_t     nh, nkv;
    } models[] = {{"32/8", 32, 8}, {"40/40", 40, 40}};
    const enum coopt_dtype types[] = {COOPT_DTYPE_F32, COOPT_DTYPE_F16, COOPT_DTYPE_FP8_E4M3};
    const int32_t          ctxs[]  = {512, 2048, 8192, 16384};
    printf("decode attention, 1 sequence, head_dim %d, page %d, best of %d; read bw %.0f GB/s (2 thr), %.0f (1 thr)\n",
           HEAD_DIM, PAGE_SIZE, reps, bw2, bw1);
    printf("%-6s %-9s %6s %3s %-8s %5s %10s %8s %6s\n", "heads", "kv", "ctx", "thr", "reads", "part", "us/tok/lyr",
           "GB/s", "of bw");
    for (size_t mi = 0; mi < sizeof(models) / sizeof(models[0]); mi++)
        for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++)
            for (size_t ci = 0; ci < sizeof(ctxs) / sizeof(ctxs[0]); ci++) {
                if (only && strcmp(only, models[mi].name) != 0) continue;
                int32_t                ctx = ctxs[ci], nh = models[mi].nh, nkv = models[mi].nkv;
                struct coopt_kv_layout l1;
                coopt_kv_layout_init(&l1, types[ti], 1, nkv, HEAD_DIM, PAGE_SIZE);
                double  bytes    = (double)ctx * 2 * nkv * HEAD_DIM * l1.elem_bytes + (l1.has_scales ? (double)ctx * 2 * nkv * 4 : 0);
                int32_t n_layers = (int32_t)fmax(1, ceil(ws / bytes));
                struct coopt_kv_cache kv = {0};
                coopt_kv_layout_init(&kv.layout, types[ti], n_layers, nkv, HEAD_DIM, PAGE_SIZE);
                int32_t n_pages    = ctx / PAGE_SIZE;
                size_t  pool_bytes = kv.layout.page_bytes * (size_t)n_pages;
                if (be[0]->ops->kv_pool_init(be[0], pool_bytes, (void **)&kv.pool) != COOPT_OK) return 1;
                fill_pool(&kv.layout, kv.pool, n_pages);
                int32_t *bt = malloc(sizeof(int32_t) * (size_t)n_pages);
                for (int32_t i = 0; i < n_pages; i++) bt[i] = i;
                int32_t            pos = ctx - 1, seq = 0;
                struct coopt_batch b   = {.n_tokens = 1, .pos = &pos, .tok_seq = &seq, .n_seqs = 1,
                                          .max_blocks = n_pages, .block_tables = bt};
                float *q = malloc(sizeof(float) * (size_t)nh * HEAD_DIM), *out = malloc(sizeof(float) * (size_t)nh * HEAD_DIM);
                for (int32_t i = 0; i < nh * HEAD_DIM; i++) q[i] = (float)((i * 37) % 19 - 9) / 9.0f;
                for (int thr = 0; thr < 2; thr++)
                    for (int per_head = 0; per_head < 2; per_head++) {
                        if (per_head && nh == nkv) continue; // MHA: the same reads
                        for (int part = 0; part < 2; part++) {
                            struct coopt_backend *e = be[thr];
                            e->attn_partition       = part ? 512 : 0;
                            e->attn_per_head        = per_head;
                            double best             = 1e30;
                            for (int r = 0; r < reps; r++) {
                                double t0 = now_s();
                                for (int32_t layer = 0; layer < n_layers; layer++)
                                    e->ops->attention(e, out, q, nh, &kv, layer, &b, 0.088f);
                                best = fmin(best, (now_s() - t0) / n_layers);
                            }
                            double gbs = bytes / best / 1e9;
                            printf("%-6s %-9s %6d %3d %-8s %5s %10.1f %8.1f %5.0f%%\n", models[mi].name,
                                   coopt_dtype_name(types[ti]), ctx, thr + 1, per_head ? "per-head" : "grouped",
                                   part ? "512" : "off", best * 1e6, gbs, 100.0 * gbs / (thr ? bw2 : bw1));
                            fflush(stdout);
                        }
                    }
                be[0]->ops->kv_pool_free(be[0], kv.pool, pool_bytes);
                free(bt), free(q), free(out);
            }
    be[0]->ops->destroy(be[0]);
    be[1]->ops->destroy(be[1]);
    return 0;
}
