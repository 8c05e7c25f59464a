/*
 * kv_pool.cu -- the KV page pool in GPU memory, mapped lazily with the CUDA virtual memory
 * management driver API (Opt-Pa): kv_pool_init reserves address space for the whole pool
 * (cuMemAddressReserve) and commits nothing; physical chunks of the allocation granularity
 * (typically 2 MiB) are created and mapped (cuMemCreate + cuMemMap + cuMemSetAccess) when a KV
 * page that overlaps them is first going to be written, and unmapped when the last page that
 * overlaps them is released. So a context's reservation costs no GPU memory until tokens use it.
 *
 * Bookkeeping is host-side: page_mapped[page] says whether a page is committed, chunk_ref[c]
 * counts committed pages overlapping chunk c (a chunk may hold several small pages; a large page
 * spans several chunks). A page is committed by
 *   - kv_pool_commit(off, page_bytes), when the context calls it after reserving pages (the
 *     clean path: out of memory is then a status);
 *   - rope_store (through cuda_kv_pool_prepare, before its launch): it walks each live
 *     sequence's pages from its last used block to the end of its reservation (the pages this
 *     step can write); a cache without a page manager (tests) commits the whole pool;
 *   - kv_page_copy, for the destination page.
 * In the two ops out of memory is kept for take_error (backend.h) and the op enqueues nothing.
 * The page size is learned from the first of these calls (kv_pool_* only see byte ranges).
 * Unmapping synchronizes the stream first so no kernel in flight still reads the chunk.
 * Newly mapped memory is not zeroed: every row is written by rope_store before attention reads it.
 */
#include "cuda/common.cuh"

#include <stdlib.h>
#include <string.h>

struct cuda_kv_pool {
    struct cuda_kv_pool          *next;
    CUdeviceptr                   base;
    size_t                        n_bytes;  // as requested
    size_t                        reserved; // rounded up to the granularity
    size_t                        gran;
    int64_t                       n_chunks;
    uint32_t                     *chunk_ref;    // [n_chunks] committed pages overlapping each chunk
    CUmemGenericAllocationHandle *chunk_handle; // [n_chunks] valid while chunk_ref > 0
    size_t                        page_bytes;   // 0 until learned
    int64_t                       n_pages;
    uint8_t                      *page_mapped;  // [n_pages]
    int64_t                       n_mapped_chunks;
    bool                          all_committed; // a bare cache (no page manager) committed it all
};

static struct cuda_kv_pool *pool_find(struct cuda_backend *cb, const void *p) {
    for (struct cuda_kv_pool *P = cb->pools; P; P = P->next)
        if (P->base == (CUdeviceptr)p) return P;
    coopt_log_error("cuda KV pool: %p is not a pool of this backend", p);
    COOPT_ASSERT(!"unknown KV pool");
    return NULL;
}

static CUmemAllocationProp pool_prop(int device) {
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof(prop));
    prop.type          = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id   = device;
    return prop;
}

static void pool_set_page_bytes(struct cuda_kv_pool *P, size_t page_bytes) {
    if (P->page_bytes) {
        COOPT_ASSERT(P->page_bytes == page_bytes);
        return;
    }
    COOPT_ASSERT(page_bytes > 0);
    P->page_bytes  = page_bytes;
    P->n_pages     = (int64_t)(P->n_bytes / page_bytes);
    P->page_mapped = (uint8_t *)calloc((size_t)(P->n_pages > 0 ? P->n_pages : 1), 1);
    COOPT_ASSERT(P->page_mapped != NULL);
}

static void chunk_unmap(struct cuda_backend *cb, struct cuda_kv_pool *P, int64_t c) {
    CU_CHECK(cb, cb->drv.MemUnmap(P->base + (CUdeviceptr)c * P->gran, P->gran));
    CU_CHECK(cb, cb->drv.MemRelease(P->chunk_handle[c]));
    P->n_mapped_chunks--;
}

static enum coopt_status chunk_map(struct cuda_backend *cb, struct cuda_kv_pool *P, int64_t c) {
    CUmemAllocationProp          prop = pool_prop(cb->device);
    CUmemGenericAllocationHandle h;
    CUresult                     r = cb->drv.MemCreate(&h, P->gran, &prop, 0);
    if (r != CUDA_SUCCESS)
        return coopt_fail(COOPT_ERR_NOMEM, "KV cache: out of GPU memory committing %zu bytes (%s; %lld chunks mapped)",
                          P->gran, cu_error_name(cb, r), (long long)P->n_mapped_chunks);
    CUdeviceptr at = P->base + (CUdeviceptr)c * P->gran;
    if ((r = cb->drv.MemMap(at, P->gran, 0, h, 0)) != CUDA_SUCCESS) {
        cb->drv.MemRelease(h);
        return coopt_fail(COOPT_ERR_NOMEM, "KV cache: cannot map GPU memory (%s)", cu_error_name(cb, r));
    }
    CUmemAccessDesc desc;
    memset(&desc, 0, sizeof(desc));
    desc.location = prop.location;
    desc.flags    = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    if ((r = cb->drv.MemSetAccess(at, P->gran, &desc, 1)) != CUDA_SUCCESS) {
        cb->drv.MemUnmap(at, P->gran);
        cb->drv.MemRelease(h);
        return coopt_fail(COOPT_ERR_NOMEM, "KV cache: cannot enable access to GPU memory (%s)", cu_error_name(cb, r));
    }
    P->chunk_handle[c] = h;
    P->n_mapped_chunks++;
    return COOPT_OK;
}

// Commits one page. On failure nothing changes and NOMEM is returned (after a message).
static enum coopt_status page_commit(struct cuda_backend *cb, struct cuda_kv_pool *P, int64_t page) {
    COOPT_ASSERT(page >= 0 && page < P->n_pages);
    if (P->page_mapped[page]) return COOPT_OK;
    size_t  off = (size_t)page * P->page_bytes;
    int64_t c0 = (int64_t)(off / P->gran), c1 = (int64_t)((off + P->page_bytes - 1) / P->gran);
    for (int64_t c = c0; c <= c1; c++) {
        if (P->chunk_ref[c]) continue;
        enum coopt_status st = chunk_map(cb, P, c);
        if (st != COOPT_OK) {
            for (int64_t u = c0; u < c; u++)
                if (!P->chunk_ref[u]) chunk_unmap(cb, P, u); // mapped by this call only
            return st;
        }
    }
    for (int64_t c = c0; c <= c1; c++) P->chunk_ref[c]++;
    P->page_mapped[page] = 1;
    return COOPT_OK;
}

static void page_release(struct cuda_backend *cb, struct cuda_kv_pool *P, int64_t page, bool *synced) {
    if (!P->page_mapped[page]) return;
    P->page_mapped[page] = 0;
    P->all_committed     = false;
    size_t  off = (size_t)page * P->page_bytes;
    int64_t c0 = (int64_t)(off / P->gran), c1 = (int64_t)((off + P->page_bytes - 1) / P->gran);
    for (int64_t c = c0; c <= c1; c++) {
        COOPT_ASSERT(P->chunk_ref[c] > 0);
        if (--P->chunk_ref[c] == 0) {
            if (!*synced) {
                CUDA_CHECK(cudaStreamSynchronize(cb->stream)); // kernels in flight may still read it
                *synced = true;
            }
            chunk_unmap(cb, P, c);
        }
    }
}

enum coopt_status cuda_kv_pool_init(struct coopt_backend *be, size_t n_bytes, void **out) {
    *out                    = NULL;
    struct cuda_backend *cb = cuda_impl(be);
    CUmemAllocationProp  prop = pool_prop(cb->device);
    size_t               gran = 0;
    CUresult             r    = cb->drv.MemGetAllocationGranularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED);
    if (r != CUDA_SUCCESS || gran == 0)
        return coopt_fail(COOPT_ERR_UNSUPPORTED, "KV pool: virtual memory management unavailable (%s)",
                          cu_error_name(cb, r));
    size_t reserved = ((n_bytes ? n_bytes : 1) + gran - 1) / gran * gran;
    struct cuda_kv_pool *P = (struct cuda_kv_pool *)coopt_calloc(1, sizeof(*P));
    if (!P) return COOPT_ERR_NOMEM;
    P->n_bytes      = n_bytes;
    P->reserved     = reserved;
    P->gran         = gran;
    P->n_chunks     = (int64_t)(reserved / gran);
    P->chunk_ref    = (uint32_t *)coopt_calloc((size_t)P->n_chunks, sizeof(uint32_t));
    P->chunk_handle = (CUmemGenericAllocationHandle *)coopt_calloc((size_t)P->n_chunks, sizeof(*P->chunk_handle));
    if (!P->chunk_ref || !P->chunk_handle) {
        free(P->chunk_ref);
        free(P->chunk_handle);
        free(P);
        return COOPT_ERR_NOMEM;
    }
    if ((r = cb->drv.MemAddressReserve(&P->base, reserved, 0, 0, 0)) != CUDA_SUCCESS) {
        free(P->chunk_ref);
        free(P->chunk_handle);
        free(P);
        return coopt_fail(COOPT_ERR_NOMEM, "KV pool: cannot reserve %.1f MiB of GPU address space (%s)",
                          reserved / 1048576.0, cu_error_name(cb, r));
    }
    P->next   = cb->pools;
    cb->pools = P;
    *out      = (void *)P->base;
    return COOPT_OK;
}

static void pool_destroy(struct cuda_backend *cb, struct cuda_kv_pool *P) {
    CUDA_CHECK(cudaStreamSynchronize(cb->stream));
    for (int64_t c = 0; c < P->n_chunks; c++)
        if (P->chunk_ref[c]) chunk_unmap(cb, P, c);
    CU_CHECK(cb, cb->drv.MemAddressFree(P->base, P->reserved));
    free(P->chunk_ref);
    free(P->chunk_handle);
    free(P->page_mapped);
    free(P);
}

void cuda_kv_pool_free(struct coopt_backend *be, void *pool, size_t n_bytes) {
    if (!pool) return;
    struct cuda_backend  *cb = cuda_impl(be);
    struct cuda_kv_pool **pp = &cb->pools;
    while (*pp && (*pp)->base != (CUdeviceptr)pool) pp = &(*pp)->next;
    if (!*pp) {
        coopt_log_error("cuda KV pool: free of unknown pool %p", pool);
        return;
    }
    struct cuda_kv_pool *P = *pp;
    *pp                    = P->next;
    pool_destroy(cb, P);
}

void cuda_kv_pools_free_all(struct cuda_backend *cb) {
    while (cb->pools) {
        struct cuda_kv_pool *P = cb->pools;
        cb->pools              = P->next;
        pool_destroy(cb, P);
    }
}

void cuda_kv_pool_release(struct coopt_backend *be, void *pool, size_t off, size_t n_bytes) {
    struct cuda_backend *cb = cuda_impl(be);
    struct cuda_kv_pool *P  = pool_find(cb, pool);
    if (!P->page_bytes) return; // nothing was ever committed
    // pages wholly inside [off, off + n_bytes)
    int64_t first = (int64_t)((off + P->page_bytes - 1) / P->page_bytes);
    int64_t end   = (int64_t)((off + n_bytes) / P->page_bytes);
    bool    synced = false;
    for (int64_t p = first; p < end && p < P->n_pages; p++) page_release(cb, P, p, &synced);
}

enum coopt_status cuda_kv_pool_commit(struct coopt_backend *be, void *pool, size_t off, size_t n_bytes) {
    struct cuda_backend *cb = cuda_impl(be);
    struct cuda_kv_pool *P  = pool_find(cb, pool);
    if (!n_bytes) return COOPT_OK;
    if (!P->page_bytes) pool_set_page_bytes(P, n_bytes);
    int64_t first = (int64_t)(off / P->page_bytes), end = (int64_t)((off + n_bytes - 1) / P->page_bytes) + 1;
    for (int64_t p = first; p < end && p < P->n_pages; p++) {
        enum coopt_status st = page_commit(cb, P, p);
        if (st != COOPT_OK) return st;
    }
    return COOPT_OK;
}

// An op's commit: ops cannot return a status, so a failure (out of device memory) is kept for
// take_error (cb->op_error, backend.h) and the op enqueues nothing. The context never gets here
// with an uncommitted page: it commits pages when it reserves them (kv_pool_commit).
static bool page_commit_op(struct cuda_backend *cb, struct cuda_kv_pool *P, int64_t page) {
    const enum coopt_status st = page_commit(cb, P, page);
    if (st != COOPT_OK && cb->op_error == COOPT_OK) cb->op_error = st;
    return st == COOPT_OK;
}

void cuda_kv_page_copy(struct coopt_backend *be, void *pool, size_t page_bytes, int32_t dst, int32_t src) {
    struct cuda_backend *cb = cuda_impl(be);
    struct cuda_kv_pool *P  = pool_find(cb, pool);
    pool_set_page_bytes(P, page_bytes);
    if (!page_commit_op(cb, P, dst)) return;
    uint8_t *p = (uint8_t *)pool;
    CUDA_CHECK(cudaMemcpyAsync(p + (size_t)dst * page_bytes, p + (size_t)src * page_bytes, page_bytes,
                               cudaMemcpyDeviceToDevice, cb->stream));
}

bool cuda_kv_pool_prepare(struct coopt_backend *be, struct coopt_kv_cache *kv) {
    struct cuda_backend *cb = cuda_impl(be);
    struct cuda_kv_pool *P  = pool_find(cb, kv->pool);
    pool_set_page_bytes(P, kv->layout.page_bytes);
    if (!kv->seqs) { // a bare cache (tests): commit everything, once
        if (P->all_committed) return true;
        for (int64_t p = 0; p < P->n_pages; p++)
            if (!page_commit_op(cb, P, p)) return false;
        P->all_committed = true;
        return true;
    }
    for (int32_t s = 0; s < kv->n_seq_max; s++) {
        const struct coopt_kv_seq *q = &kv->seqs[s];
        if (!q->live) continue;
        // Blocks before n_blocks - 1 were written by earlier steps (committed then); the step
        // writes into the last used block and the blocks reserved after it.
        for (int32_t i = COOPT_MAX(0, q->n_blocks - 1); i < kv->max_pages_per_seq; i++) {
            if (q->pages[i] < 0) {
                if (i >= q->n_blocks) break;
                continue;
            }
            if (!page_commit_op(cb, P, q->pages[i])) return false;
        }
    }
    return true;
}
