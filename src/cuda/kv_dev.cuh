/*
 * kv_dev.cuh -- the paged KV layout of kv_cache.h, passed to kernels by value, and its two
 * offset functions ported to device code (same formulas as coopt_kv_offset and
 * coopt_kv_scale_offset; keep them in step).
 */
#ifndef COOPT_CUDA_KV_DEV_CUH
#define COOPT_CUDA_KV_DEV_CUH

#include "cuda/common.cuh"

struct kv_dev_layout {
    int32_t  dtype; // enum coopt_dtype
    int32_t  n_kv_heads, head_dim, page_size;
    int32_t  page_shift; // log2(page_size) for a power of two, else -1 (kv_page_of, kv_row_of)
    uint64_t elem_bytes, head_bytes, data_bytes, page_bytes;
    int32_t  has_scales;
    int32_t  scale_search; // FP8 scale candidates per row (1 or COOPT_KV_SCALE_SEARCH)
};

static inline struct kv_dev_layout kv_dev_layout_make(const struct coopt_kv_layout *l) {
    struct kv_dev_layout d;
    d.dtype      = (int32_t)l->dtype;
    d.n_kv_heads = l->n_kv_heads;
    d.head_dim   = l->head_dim;
    d.page_size  = l->page_size;
    d.page_shift = -1;
    for (int32_t b = 0; b < 31; b++)
        if (l->page_size == (int32_t)1 << b) d.page_shift = b;
    d.elem_bytes = l->elem_bytes;
    d.head_bytes = l->head_bytes;
    d.data_bytes = l->data_bytes;
    d.page_bytes = l->page_bytes;
    d.has_scales = l->has_scales;
    d.scale_search = l->scale_search;
    return d;
}

// Block-table index and row in the page of position p (p >= 0): a shift and a mask for a power-of-two
// page size (the default 16) instead of an integer division.
__device__ __forceinline__ int32_t kv_page_of(const struct kv_dev_layout &l, int32_t p) {
    return l.page_shift >= 0 ? p >> l.page_shift : p / l.page_size;
}
__device__ __forceinline__ int32_t kv_row_of(const struct kv_dev_layout &l, int32_t p) {
    return l.page_shift >= 0 ? p & (l.page_size - 1) : p % l.page_size;
}

// The same for a cache slot (page * page_size + row, coopt_batch.slots).
__device__ __forceinline__ int64_t kv_slot_page(const struct kv_dev_layout &l, int64_t slot) {
    return l.page_shift >= 0 ? slot >> l.page_shift : slot / l.page_size;
}
__device__ __forceinline__ int32_t kv_slot_row(const struct kv_dev_layout &l, int64_t slot) {
    return (int32_t)(l.page_shift >= 0 ? slot & (int64_t)(l.page_size - 1) : slot % l.page_size);
}

// Byte offset of the head_dim elements of (page, layer, kv, head, row).
__device__ __forceinline__ uint64_t kv_offset(const struct kv_dev_layout &l, int64_t page, int32_t layer, int32_t kv,
                                              int32_t head, int32_t row) {
    return (uint64_t)page * l.page_bytes +
           (((uint64_t)layer * 2 + (uint64_t)kv) * (uint64_t)l.n_kv_heads + (uint64_t)head) * l.head_bytes +
           (uint64_t)row * (uint64_t)l.head_dim * l.elem_bytes;
}

// Byte offset of the f32 scale of (page, layer, kv, head, row); only when has_scales.
__device__ __forceinline__ uint64_t kv_scale_offset(const struct kv_dev_layout &l, int64_t page, int32_t layer,
                                                    int32_t kv, int32_t head, int32_t row) {
    return (uint64_t)page * l.page_bytes + l.data_bytes +
           ((((uint64_t)layer * 2 + (uint64_t)kv) * (uint64_t)l.n_kv_heads + (uint64_t)head) * (uint64_t)l.page_size +
            (uint64_t)row) *
               sizeof(float);
}

// Index of the K offsets of (KV sequence, layer, head) in k_offset [n_seq_max][n_layers]
// [n_kv_heads][head_dim] (coopt_kv_koff_index, kv_cache.h).
__device__ __forceinline__ size_t kv_koff_index(int32_t n_layers, int32_t n_kv_heads, int32_t head_dim, int32_t seq,
                                                int32_t layer, int32_t head) {
    return (((size_t)seq * (size_t)n_layers + (size_t)layer) * (size_t)n_kv_heads + (size_t)head) * (size_t)head_dim;
}

#endif // COOPT_CUDA_KV_DEV_CUH
