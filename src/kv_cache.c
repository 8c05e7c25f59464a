/*
 * kv_cache.c -- page layout sizes and the host-side page manager (see kv_cache.h).
 */
#include "kv_cache.h"

#include "dtype.h"
#include "util.h"

#include <stdlib.h>
#include <string.h>

enum coopt_status coopt_kv_layout_init(struct coopt_kv_layout *l, enum coopt_dtype dtype, int32_t n_layers,
                                       int32_t n_kv_heads, int32_t head_dim, int32_t page_size) {
    memset(l, 0, sizeof(*l));
    switch (dtype) {
    case COOPT_DTYPE_F32:
    case COOPT_DTYPE_F16:
    case COOPT_DTYPE_BF16: break;
    case COOPT_DTYPE_FP8_E4M3:
    case COOPT_DTYPE_FP8_E5M2: l->has_scales = true; break;
    default: return coopt_fail(COOPT_ERR_UNSUPPORTED, "KV cache type %s is not supported", coopt_dtype_name(dtype));
    }
    if (n_layers <= 0 || n_kv_heads <= 0 || head_dim <= 0 || page_size <= 0)
        return coopt_fail(COOPT_ERR_INVALID, "KV layout: bad shape (layers %d, kv heads %d, head dim %d, page %d)",
                          n_layers, n_kv_heads, head_dim, page_size);
    l->dtype      = dtype;
    l->n_layers   = n_layers;
    l->n_kv_heads = n_kv_heads;
    l->head_dim   = head_dim;
    l->page_size  = page_size;
    l->elem_bytes = coopt_dtype_block_bytes(dtype);
    l->head_bytes = (size_t)page_size * (size_t)head_dim * l->elem_bytes;
    l->data_bytes = (size_t)n_layers * 2 * (size_t)n_kv_heads * l->head_bytes;
    size_t scale_bytes = l->has_scales ? (size_t)n_layers * 2 * (size_t)n_kv_heads * (size_t)page_size * sizeof(float) : 0;
    l->page_bytes = (l->data_bytes + scale_bytes + 63) & ~(size_t)63;
    return COOPT_OK;
}
