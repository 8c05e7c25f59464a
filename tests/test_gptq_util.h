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


// ---- fixtures from the independent packer (scripts/make_gptq_fixture.py) ----

static const char *const gptq_fixture_names[] = {
    "gptq_k_g32_sym.bin",      "gptq_k_g64_asym_act.bin", "gptq_k_g64_sym_act_v2.bin",  "gptq_v_g128_asym_v2.bin",
    "gptq_v_gall_sym_act.bin", "gptq_v_g32_asym_act.bin", "gptq_down_g128_asym_act.bin", "gptq_down_gall_asym_v2.bin",
};

// One fixture file: "CGQF", int32 header {version 1, in, out, group size, sym, act-order, v1 zeros,
// groups}, then qweight, qzeros, f16 scales, g_idx [in] and the packer's W [out][in] (f32).
struct gptq_fixture {
    char                 *data; // the file (free it)
    int64_t               in, out;
    bool                  sym, act, v1;
    struct coopt_gptq_src src;  // view into data; g_idx only for act-order checkpoints
    const int32_t        *g_idx;
    const float          *wref;
};

enum { GPTQ_FIXTURE_OK = 0, GPTQ_FIXTURE_UNREADABLE, GPTQ_FIXTURE_BAD };

// Reads and checks fixture `name` (from the golden directory) into *fx: GPTQ_FIXTURE_OK, or
// UNREADABLE / BAD (header or size; fx->data freed).
static inline int gptq_fixture_load(const char *name, struct gptq_fixture *fx) {
    memset(fx, 0, sizeof(*fx));
    size_t size = 0;
    if (coopt_read_file(test_golden_path(name), &fx->data, &size) != COOPT_OK) return GPTQ_FIXTURE_UNREADABLE;
    int32_t h[8];
    bool    ok = size >= 36 && memcmp(fx->data, "CGQF", 4) == 0;
    if (ok) memcpy(h, fx->data + 4, sizeof(h));
    const int64_t in = ok ? h[1] : 0, out = ok ? h[2] : 0, G = ok ? h[7] : 0;
    const size_t  need = 36 + (size_t)(in / 8 * out) * 4 + (size_t)(G * out / 8) * 4 + (size_t)(G * out) * 2 +
                        (size_t)in * 4 + (size_t)(in * out) * 4;
    ok = ok && h[0] == 1 && in > 0 && out > 0 && G > 0 && in <= 4096 && out <= 4096 && size == need;
    if (!ok) {
        free(fx->data);
        fx->data = NULL;
        return GPTQ_FIXTURE_BAD;
    }
    fx->in = in, fx->out = out, fx->sym = h[4] != 0, fx->act = h[5] != 0, fx->v1 = h[6] != 0;
    const char *p = fx->data + 36;
    fx->src = (struct coopt_gptq_src){.name = name, .n_in = in, .n_out = out, .bits = 4, .group_size = h[3],
                                      .zeros_v1 = fx->v1, .qweight_shape = {in / 8, out},
                                      .qweight_dtype = COOPT_DTYPE_I32, .qzeros_shape = {G, out / 8},
                                      .qzeros_dtype = COOPT_DTYPE_I32, .scales_shape = {G, out},
                                      .scales_dtype = COOPT_DTYPE_F16, .g_idx_len = in, .g_idx_dtype = COOPT_DTYPE_I32};
    // the payload is 4-byte aligned after the 36-byte header, and the f16 scales keep the later
    // int32 arrays aligned because G * out is even
    fx->src.qweight = (const int32_t *)p, p += (size_t)(in / 8 * out) * 4;
    fx->src.qzeros  = (const int32_t *)p, p += (size_t)(G * out / 8) * 4;
    fx->src.scales  = (const uint16_t *)p, p += (size_t)(G * out) * 2;
    fx->g_idx       = (const int32_t *)p, p += (size_t)in * 4;
    if (fx->act) fx->src.g_idx = fx->g_idx; // act-order checkpoints carry g_idx; others may omit it
    fx->wref = (const float *)p;
    return GPTQ_FIXTURE_OK;
}

#endif // COOPT_TEST_GPTQ_UTIL_H
