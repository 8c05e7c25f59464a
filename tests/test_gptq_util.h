/*
 * test_gptq_util.h -- random GPTQ checkpoint tensors for the GPTQ tests (CPU and CUDA): the
 * tensors AutoGPTQ / GPTQModel write, from a seeded generator, with the coopt_gptq_src view the
 * loader consumes.
 */
#ifndef COOPT_TEST_GPTQ_UTIL_H
#define COOPT_TEST_GPTQ_UTIL_H

#include "dtype.h"
#include "gptq.h"
#include "test.h"
#include "util.h"

#include <stdlib.h>
#include <string.h>

struct gptq_case {
    int64_t n_in, n_out;
    int32_t gs;  // group size or -1
    int     act; // 0 none, 1 act-order permutation (equal groups), 2 arbitrary random g_idx
    int     sym, v1;
};

struct gptq_tensors {
    int32_t              *qweight, *qzeros, *g_idx;
    uint16_t             *scales;
    int32_t               n_groups;
    struct coopt_gptq_src src;
};

static inline void gptq_tensors_free(struct gptq_tensors *g) {
    free(g->qweight), free(g->qzeros), free(g->g_idx), free(g->scales);
}

// Random GPTQ checkpoint tensors for case c (qweight, qzeros in the v1 or v2 convention, f16
// scales, g_idx for act-order) and their coopt_gptq_src view named `name`. g_idx_from: NULL, or
// another tensor set's g_idx to reuse (q/k/v projections of one input share theirs).
static inline void gptq_make_tensors(uint64_t *rs, const struct gptq_case *c, const int32_t *g_idx_from, const char *name,
                                     struct gptq_tensors *g) {
    int64_t in = c->n_in, out = c->n_out;
    int32_t G = c->gs == -1 ? 1 : (int32_t)((in + c->gs - 1) / c->gs);
    g->n_groups = G;
    g->qweight  = malloc((size_t)(in / 8 * out) * 4);
    g->qzeros   = malloc((size_t)(G * out / 8) * 4);
    g->scales   = malloc((size_t)(G * out) * 2);
    g->g_idx    = NULL;
    COOPT_ASSERT(g->qweight && g->qzeros && g->scales);
    for (int64_t i = 0; i < in / 8 * out; i++) g->qweight[i] = (int32_t)(uint32_t)test_rand_u64(rs);
    for (int64_t i = 0; i < G * out / 8; i++) {
        uint32_t v = 0;
        for (int n = 0; n < 8; n++) {
            uint32_t z = c->sym ? 8 : (uint32_t)(test_rand_u64(rs) % 16); // real zero
            if (c->v1) z = c->sym ? 7 : (uint32_t)(test_rand_u64(rs) % 16); // stored = real - 1
            v |= z << (4 * n);
        }
        g->qzeros[i] = (int32_t)v;
    }
    for (int64_t i = 0; i < G * out; i++) g->scales[i] = coopt_f32_to_f16(test_rand_uniform(rs, 0.002f, 0.03f));
    if (c->act) {
        g->g_idx = malloc((size_t)in * 4);
        if (g_idx_from) {
            memcpy(g->g_idx, g_idx_from, (size_t)in * 4);
        } else {
            int32_t *perm = malloc((size_t)in * 4);
            for (int64_t i = 0; i < in; i++) perm[i] = (int32_t)i;
            for (int64_t i = in - 1; i > 0; i--) { // Fisher-Yates
                int64_t j = (int64_t)(test_rand_u64(rs) % (uint64_t)(i + 1));
                int32_t tmp = perm[i];
                perm[i] = perm[j], perm[j] = tmp;
            }
            for (int64_t j = 0; j < in; j++) {
                int32_t gj = c->gs == -1 ? 0 : (int32_t)(j / c->gs);
                if (c->act == 2) gj = (int32_t)(test_rand_u64(rs) % (uint64_t)G);
                g->g_idx[perm[j]] = gj;
            }
            free(perm);
        }
    }
    g->src = (struct coopt_gptq_src){
        .name = name, .n_in = in, .n_out = out, .bits = 4, .group_size = c->gs, .zeros_v1 = c->v1 != 0,
        .qweight = g->qweight, .qweight_shape = {in / 8, out}, .qweight_dtype = COOPT_DTYPE_I32,
        .qzeros = g->qzeros, .qzeros_shape = {G, out / 8}, .qzeros_dtype = COOPT_DTYPE_I32, .scales = g->scales,
        .scales_shape = {G, out}, .scales_dtype = COOPT_DTYPE_F16, .g_idx = g->g_idx, .g_idx_len = g->g_idx ? in : 0,
        .g_idx_dtype = COOPT_DTYPE_I32};
}


#endif // COOPT_TEST_GPTQ_UTIL_H
