/*
 * gptq.c -- GPTQ checkpoint tensors -> struct coopt_gptq_weight (layout in gptq.h), and the
 * scalar dequantization reference.
 *
 * Repacking has two paths. When the input rows are already in group order with every group
 * starting on a 32-row boundary (no act-order, group size a multiple of 32 or -1), qweight's
 * dwords are copied unchanged into 16-column subtiles: the repack is a strided memcpy. With
 * act-order (or odd group sizes), rows are sorted by group with a counting sort, each group is
 * padded to whole 32-row blocks, and every nibble is moved; that path can use several threads.
 */
#include "gptq.h"

#include "dtype.h"
#include "util.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

// ---- validation ----

static enum coopt_status check_shape(const char *prefix, const char *tensor, const int64_t got[2],
                                     int64_t e0, int64_t e1) {
    if (got[0] == e0 && got[1] == e1) return COOPT_OK;
    return coopt_fail(COOPT_ERR_FORMAT, "tensor '%s.%s' shape [%lld,%lld], expected [%lld,%lld]", prefix,
                      tensor, (long long)got[0], (long long)got[1], (long long)e0, (long long)e1);
}

static enum coopt_status check_dtype(const char *prefix, const char *tensor, enum coopt_dtype got,
                                     enum coopt_dtype want) {
    if (got == want) return COOPT_OK;
    return coopt_fail(COOPT_ERR_FORMAT, "tensor '%s.%s' dtype %s, expected %s", prefix, tensor,
                      coopt_dtype_name(got), coopt_dtype_name(want));
}

static enum coopt_status validate(const struct coopt_gptq_src *s, int64_t n_in, int64_t n_out,
                                  int32_t n_groups) {
    const char       *p = s->name ? s->name : "?";
    enum coopt_status st;
    if (!s->qweight) return coopt_fail(COOPT_ERR_FORMAT, "tensor '%s.qweight' is missing", p);
    if (!s->qzeros) return coopt_fail(COOPT_ERR_FORMAT, "tensor '%s.qzeros' is missing", p);
    if (!s->scales) return coopt_fail(COOPT_ERR_FORMAT, "tensor '%s.scales' is missing", p);
    if ((st = check_dtype(p, "qweight", s->qweight_dtype, COOPT_DTYPE_I32))) return st;
    if ((st = check_dtype(p, "qzeros", s->qzeros_dtype, COOPT_DTYPE_I32))) return st;
    if ((st = check_dtype(p, "scales", s->scales_dtype, COOPT_DTYPE_F16))) return st;
    if ((st = check_shape(p, "qweight", s->qweight_shape, n_in / 8, n_out))) return st;
    if ((st = check_shape(p, "qzeros", s->qzeros_shape, n_groups, n_out / 8))) return st;
    if ((st = check_shape(p, "scales", s->scales_shape, n_groups, n_out))) return st;
    if (s->g_idx) {
        if ((st = check_dtype(p, "g_idx", s->g_idx_dtype, COOPT_DTYPE_I32))) return st;
        if (s->g_idx_len != n_in)
            return coopt_fail(COOPT_ERR_FORMAT, "tensor '%s.g_idx' shape [%lld], expected [%lld]", p,
                              (long long)s->g_idx_len, (long long)n_in);
        for (int64_t i = 0; i < n_in; i++) {
            if (s->g_idx[i] < 0 || s->g_idx[i] >= n_groups)
                return coopt_fail(COOPT_ERR_FORMAT, "tensor '%s.g_idx' value %d at %lld out of range [0,%d)",
                                  p, s->g_idx[i], (long long)i, n_groups);
        }
    }
    return COOPT_OK;
}

// ---- repacking ----

static inline int32_t row_group(const struct coopt_gptq_src *s, int64_t i) {
    if (s->g_idx) return s->g_idx[i];
    return s->group_size == -1 ? 0 : (int32_t)(i / s->group_size);
}

struct repack_job {
    const struct coopt_gptq_src *src;
    struct coopt_gptq_weight    *w;
    int32_t                      ith, nth;
};

// Moves every nibble of subtiles [lo, hi) through w->perm.
static void repack_perm_range(const struct coopt_gptq_src *s, struct coopt_gptq_weight *w, int64_t lo,
                              int64_t hi) {
    const int64_t n_out = w->n_out, n_oct = w->k_pad / 8;
    for (int64_t t = lo; t < hi; t++) {
        int64_t   o0 = t * COOPT_GPTQ_SUB;
        int       nj = (int)COOPT_MIN(COOPT_GPTQ_SUB, n_out - o0);
        uint32_t *dst = w->qw + t * n_oct * COOPT_GPTQ_SUB;
        memset(dst, 0, (size_t)n_oct * COOPT_GPTQ_SUB * 4);
        for (int64_t r = 0; r < n_oct; r++) {
            uint32_t *d = dst + r * COOPT_GPTQ_SUB;
            for (int n = 0; n < 8; n++) {
                int32_t i = w->perm[r * 8 + n];
                if (i < 0) continue;
                const uint32_t *row = (const uint32_t *)s->qweight + (int64_t)(i / 8) * n_out + o0;
                int             sh = 4 * (i % 8);
                for (int j = 0; j < nj; j++) d[j] |= ((row[j] >> sh) & 15u) << (4 * n);
            }
        }
    }
}

static void *repack_thread(void *arg) {
    struct repack_job *j = arg;
    int64_t            lo, hi;
    int64_t            per = (j->w->n_sub + j->nth - 1) / j->nth;
    lo = COOPT_MIN(j->w->n_sub, per * j->ith);
    hi = COOPT_MIN(j->w->n_sub, lo + per);
    repack_perm_range(j->src, j->w, lo, hi);
    return NULL;
}

static void repack_perm(const struct coopt_gptq_src *s, struct coopt_gptq_weight *w, int n_threads) {
    enum { MAX_THREADS = 64 };
    int nth = (int)COOPT_MAX(1, COOPT_MIN(COOPT_MIN(n_threads, MAX_THREADS), w->n_sub));
    struct repack_job jobs[MAX_THREADS];
    pthread_t         tids[MAX_THREADS];
    int               started = 1;
    for (int i = 0; i < nth; i++) jobs[i] = (struct repack_job){s, w, i, nth};
    for (int i = 1; i < nth; i++) {
        if (pthread_create(&tids[i], NULL, repack_thread, &jobs[i]) != 0) break;
        started = i + 1;
    }
    repack_thread(&jobs[0]);
    for (int i = 1; i < started; i++) pthread_join(tids[i], NULL);
    for (int i = started; i < nth; i++) repack_thread(&jobs[i]); // threads that failed to start
}

static void repack_copy(const struct coopt_gptq_src *s, struct coopt_gptq_weight *w) {
    const int64_t n_out = w->n_out, n_oct = w->k_pad / 8, n_oct_in = w->n_in / 8;
    for (int64_t t = 0; t < w->n_sub; t++) {
        int64_t   o0 = t * COOPT_GPTQ_SUB;
        int       nj = (int)COOPT_MIN(COOPT_GPTQ_SUB, n_out - o0);
        uint32_t *dst = w->qw + t * n_oct * COOPT_GPTQ_SUB;
        for (int64_t r = 0; r < n_oct; r++) {
            uint32_t *d = dst + r * COOPT_GPTQ_SUB;
            if (r < n_oct_in) {
                memcpy(d, (const uint32_t *)s->qweight + r * n_out + o0, (size_t)nj * 4);
                if (nj < COOPT_GPTQ_SUB) memset(d + nj, 0, (size_t)(COOPT_GPTQ_SUB - nj) * 4);
            } else {
                memset(d, 0, COOPT_GPTQ_SUB * 4);
            }
        }
    }
}

void coopt_gptq_weight_free(struct coopt_gptq_weight *w) {
    if (!w) return;
    free(w->grp_blk);
    free(w->perm);
    coopt_aligned_free(w->qw);
    free(w->scale);
    free(w->zero);
    free(w);
}

enum coopt_status coopt_gptq_repack(const struct coopt_gptq_src *s, int n_threads,
                                    struct coopt_gptq_weight **out) {
    *out = NULL;
    const char *p = s->name ? s->name : "?";
    if (s->bits != 4)
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "%s: GPTQ bits %d not supported (only 4)", p, s->bits);
    int64_t n_in = s->n_in, n_out = s->n_out;
    if (n_in <= 0) n_in = s->qweight_shape[0] * 8;
    if (n_out <= 0) n_out = s->qweight_shape[1];
    if (n_in <= 0 || n_out <= 0 || n_in % 8 || n_out % 8 || n_in > INT32_MAX / 2)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: GPTQ shape [%lld,%lld] must be positive multiples of 8", p,
                          (long long)n_out, (long long)n_in);
    if (s->group_size == 0 || s->group_size < -1)
        return coopt_fail(COOPT_ERR_FORMAT, "%s: GPTQ group_size %d (expected > 0 or -1)", p, s->group_size);
    int64_t ng = s->group_size == -1 ? 1 : (n_in + s->group_size - 1) / s->group_size;
    int32_t n_groups = (int32_t)ng;
    enum coopt_status st = validate(s, n_in, n_out, n_groups);
    if (st) return st;

    struct coopt_gptq_weight *w = coopt_calloc(1, sizeof(*w));
    int64_t                  *count = coopt_calloc((size_t)n_groups + 1, sizeof(int64_t));
    if (!w || !count) goto nomem;
    w->n_in = n_in, w->n_out = n_out, w->n_groups = n_groups, w->group_size = s->group_size;
    w->n_sub = (n_out + COOPT_GPTQ_SUB - 1) / COOPT_GPTQ_SUB;

    // group of every input row; identity layout iff groups are sorted and start on 32-row blocks
    bool sorted = true;
    for (int64_t i = 0; i < n_in; i++) {
        int32_t g = row_group(s, i);
        if (i > 0) {
            int32_t gp = row_group(s, i - 1);
            if (g < gp || (g != gp && i % COOPT_GPTQ_BLK)) sorted = false;
        }
        count[g]++;
    }
    w->grp_blk = coopt_malloc(((size_t)n_groups + 1) * sizeof(int32_t));
    if (!w->grp_blk) goto nomem;
    int64_t k = 0;
    for (int32_t g = 0; g < n_groups; g++) {
        w->grp_blk[g] = (int32_t)(k / COOPT_GPTQ_BLK);
        k += (count[g] + COOPT_GPTQ_BLK - 1) / COOPT_GPTQ_BLK * COOPT_GPTQ_BLK;
    }
    w->grp_blk[n_groups] = (int32_t)(k / COOPT_GPTQ_BLK);
    w->k_pad = k;
    if (sorted) {
        // empty groups (a g_idx that skips one) would still be sorted; recompute plainly
        w->k_pad = (n_in + COOPT_GPTQ_BLK - 1) / COOPT_GPTQ_BLK * COOPT_GPTQ_BLK;
        int64_t start = 0;
        for (int32_t g = 0; g < n_groups; g++) {
            w->grp_blk[g] = (int32_t)(start / COOPT_GPTQ_BLK);
            start += count[g];
        }
        w->grp_blk[n_groups] = (int32_t)(w->k_pad / COOPT_GPTQ_BLK);
    } else {
        // counting sort of rows by group (stable), each group padded to whole blocks
        w->perm = coopt_malloc((size_t)w->k_pad * sizeof(int32_t));
        if (!w->perm) goto nomem;
        for (int64_t i = 0; i < w->k_pad; i++) w->perm[i] = -1;
        for (int32_t g = 0; g < n_groups; g++) count[g] = (int64_t)w->grp_blk[g] * COOPT_GPTQ_BLK; // next slot
        for (int64_t i = 0; i < n_in; i++) w->perm[count[row_group(s, i)]++] = (int32_t)i;
    }

    size_t qw_bytes = (size_t)w->n_sub * (size_t)(w->k_pad / 8) * COOPT_GPTQ_SUB * 4;
    size_t gs_elems = (size_t)w->n_sub * (size_t)n_groups * COOPT_GPTQ_SUB;
    w->qw = coopt_aligned_alloc(qw_bytes);
    w->scale = coopt_calloc(gs_elems, sizeof(uint16_t));
    w->zero = coopt_calloc(gs_elems, 1);
    if (!w->qw || !w->scale || !w->zero) goto nomem;

    if (w->perm)
        repack_perm(s, w, n_threads);
    else
        repack_copy(s, w);

    const uint32_t *qz = (const uint32_t *)s->qzeros;
    uint32_t        zadd = s->zeros_v1 ? 1 : 0;
    bool            sym = true;
    for (int64_t t = 0; t < w->n_sub; t++) {
        for (int32_t g = 0; g < n_groups; g++) {
            size_t base = ((size_t)t * n_groups + g) * COOPT_GPTQ_SUB;
            for (int j = 0; j < COOPT_GPTQ_SUB; j++) {
                int64_t o = t * COOPT_GPTQ_SUB + j;
                if (o >= n_out) break;
                w->scale[base + j] = s->scales[(int64_t)g * n_out + o];
                uint32_t z = ((qz[(int64_t)g * (n_out / 8) + o / 8] >> (4 * (o % 8))) & 15u) + zadd;
                w->zero[base + j] = (uint8_t)z;
                sym = sym && z == 8;
            }
        }
    }
    w->sym_hint = sym;
    free(count);
    *out = w;
    return COOPT_OK;
nomem:
    free(count);
    coopt_gptq_weight_free(w);
    return coopt_fail(COOPT_ERR_NOMEM, "%s: out of memory repacking GPTQ weight", p);
}

int64_t coopt_gptq_weight_bytes(const struct coopt_gptq_weight *w) {
    int64_t cols = w->n_sub * COOPT_GPTQ_SUB;
    return cols * (w->k_pad / 2) + cols * w->n_groups * 3;
}

void coopt_gptq_as_weight(const struct coopt_gptq_weight *w, const float *bias, struct coopt_weight *out) {
    memset(out, 0, sizeof(*out));
    out->dtype = COOPT_DTYPE_Q4_GPTQ;
    out->n_in = w->n_in;
    out->n_out = w->n_out;
    out->gptq = w;
    out->bias = bias;
}

void coopt_gptq_dequant_ref(const struct coopt_gptq_weight *w, float *out) {
    const int64_t n_oct = w->k_pad / 8;
    for (int32_t g = 0; g < w->n_groups; g++) {
        for (int64_t k = (int64_t)w->grp_blk[g] * COOPT_GPTQ_BLK; k < (int64_t)w->grp_blk[g + 1] * COOPT_GPTQ_BLK; k++) {
            int64_t i = w->perm ? w->perm[k] : (k < w->n_in ? k : -1);
            if (i < 0) continue;
            for (int64_t o = 0; o < w->n_out; o++) {
                int64_t t = o / COOPT_GPTQ_SUB, j = o % COOPT_GPTQ_SUB;
                size_t  gi = ((size_t)t * w->n_groups + g) * COOPT_GPTQ_SUB + j;
                float   s = coopt_f16_to_f32(w->scale[gi]);
                int     z = w->zero[gi];
                int     q = (int)((w->qw[(t * n_oct + k / 8) * COOPT_GPTQ_SUB + j] >> (4 * (k % 8))) & 15u);
                out[o * w->n_in + i] = s * (float)(q - z);
            }
        }
    }
}
