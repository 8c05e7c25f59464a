/*
 * safetensors.c -- safetensors reader (over a caller's buffer or an mmap) and streaming writer.
 *
 * The reader validates the whole header up front (see safetensors.h), so a parsed object's
 * tensors can be used without further bounds checks: data + n_bytes always lies inside the
 * file. Tensors are kept sorted by name for coopt_safetensors_find's binary search.
 */
#include "safetensors.h"

#include "json_util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ---- dtypes ----

struct st_dtype_info {
    const char      *name;
    size_t           size;
    bool             supported;
    enum coopt_dtype dtype;
};

static const struct st_dtype_info g_st_dtypes[] = {
    {"F32", 4, true, COOPT_DTYPE_F32},
    {"F16", 2, true, COOPT_DTYPE_F16},
    {"BF16", 2, true, COOPT_DTYPE_BF16},
    {"I32", 4, true, COOPT_DTYPE_I32},
    {"F8_E4M3", 1, true, COOPT_DTYPE_FP8_E4M3},
    {"F8_E5M2", 1, true, COOPT_DTYPE_FP8_E5M2},
    // known to safetensors, not used by coopt: parsed, but binding them is "unsupported dtype"
    {"F64", 8, false, COOPT_DTYPE_F32},
    {"I64", 8, false, COOPT_DTYPE_F32},
    {"U64", 8, false, COOPT_DTYPE_F32},
    {"U32", 4, false, COOPT_DTYPE_F32},
    {"I16", 2, false, COOPT_DTYPE_F32},
    {"U16", 2, false, COOPT_DTYPE_F32},
    {"I8", 1, false, COOPT_DTYPE_F32},
    {"U8", 1, false, COOPT_DTYPE_F32},
    {"BOOL", 1, false, COOPT_DTYPE_F32},
    {"F8_E8M0", 1, false, COOPT_DTYPE_F32},
};

size_t coopt_st_dtype_size(const char *st_dtype, bool *supported, enum coopt_dtype *dtype) {
    for (size_t i = 0; i < COOPT_ARRAY_LEN(g_st_dtypes); i++) {
        if (strcmp(st_dtype, g_st_dtypes[i].name) == 0) {
            if (supported) *supported = g_st_dtypes[i].supported;
            if (dtype) *dtype = g_st_dtypes[i].dtype;
            return g_st_dtypes[i].size;
        }
    }
    if (supported) *supported = false;
    return 0;
}

const char *coopt_st_dtype_name(enum coopt_dtype t) {
    for (size_t i = 0; i < COOPT_ARRAY_LEN(g_st_dtypes); i++) {
        if (g_st_dtypes[i].supported && g_st_dtypes[i].dtype == t) return g_st_dtypes[i].name;
    }
    return NULL;
}

// ---- reader ----

void coopt_safetensors_free(struct coopt_safetensors *st) {
    if (!st) return;
    for (int i = 0; i < st->n_tensors; i++)
        free((char *)st->tensors[i].name);
    free(st->tensors);
    for (int i = 0; i < st->n_meta; i++) {
        free(st->meta_keys[i]);
        free(st->meta_vals[i]);
    }
    free(st->meta_keys);
    free(st->meta_vals);
    free(st->name);
    coopt_mmap_close(&st->map);
    free(st);
}

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp(((const struct coopt_st_tensor *)a)->name,
                  ((const struct coopt_st_tensor *)b)->name);
}

static int cmp_tensor_offset(const void *a, const void *b) {
    const struct coopt_st_tensor *x = *(const struct coopt_st_tensor *const *)a;
    const struct coopt_st_tensor *y = *(const struct coopt_st_tensor *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static void format_shape(char *buf, size_t cap, const struct coopt_st_tensor *t) {
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < t->n_dims && n < cap; d++) {
        n += (size_t)snprintf(buf + n, cap - n, "%s%lld", d ? "," : "", (long long)t->shape[d]);
    }
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

// Validates one header entry and fills t (except name and data). data_size: bytes after header.
static enum coopt_status parse_entry(const cJSON *e, const char *file, size_t data_size,
                                     struct coopt_st_tensor *t) {
    const char *tn = e->string;
    if (!cJSON_IsObject(e)) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s: tensor '%s': entry must be an object, got %s",
                          file, tn, coopt_json_type_name(e));
    }
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    if (!cJSON_IsString(dt)) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s: tensor '%s': 'dtype' must be a string", file, tn);
    }
    t->elem_size = coopt_st_dtype_size(dt->valuestring, &t->supported, &t->dtype);
    if (t->elem_size == 0 || strlen(dt->valuestring) >= sizeof(t->st_dtype)) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s: tensor '%s': unknown dtype '%.32s'", file, tn,
                          dt->valuestring);
    }
    snprintf(t->st_dtype, sizeof(t->st_dtype), "%s", dt->valuestring);

    const cJSON *sh = cJSON_GetObjectItemCaseSensitive(e, "shape");
    if (!cJSON_IsArray(sh)) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s: tensor '%s': 'shape' must be an array", file, tn);
    }
    int n_dims = cJSON_GetArraySize(sh);
    if (n_dims > COOPT_ST_MAX_DIMS) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s: tensor '%s': %d dimensions, at most %d supported",
                          file, tn, n_dims, COOPT_ST_MAX_DIMS);
    }
    t->n_dims        = n_dims;
    uint64_t n_elems = 1;
    int      d       = 0;
    for (const cJSON *it = sh->child; it; it = it->next, d++) {
        int64_t v;
        if (!coopt_json_item_int(it, 0, INT64_MAX, &v)) {
            return coopt_fail(COOPT_ERR_FORMAT,
                              "%s: tensor '%s': shape[%d] is not a non-negative integer", file, tn,
                              d);
        }
        t->shape[d] = v;
        if (__builtin_mul_overflow(n_elems, (uint64_t)v, &n_elems)) {
            return coopt_fail(COOPT_ERR_FORMAT, "%s: tensor '%s': element count overflows", file,
                              tn);
        }
    }
    uint64_t need;
    if (__builtin_mul_overflow(n_elems, (uint64_t)t->elem_size, &need) || n_elems > INT64_MAX) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s: tensor '%s': byte size overflows", file, tn);
    }
    t->n_elems = (int64_t)n_elems;

    const cJSON *off = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    int64_t      begin, end;
    if (!cJSON_IsArray(off) || cJSON_GetArraySize(off) != 2 ||
        !coopt_json_item_int(off->child, 0, INT64_MAX, &begin) ||
        !coopt_json_item_int(off->child->next, 0, INT64_MAX, &end)) {
        return coopt_fail(COOPT_ERR_FORMAT,
                          "%s: tensor '%s': 'data_offsets' must be two non-negative integers", file,
                          tn);
    }
    if (begin > end || (uint64_t)end > data_size) {
        return coopt_fail(
            COOPT_ERR_FORMAT,
            "%s: tensor '%s': data_offsets [%lld, %lld] outside the data section (%zu bytes)", file,
            tn, (long long)begin, (long long)end, data_size);
    }
    if ((uint64_t)(end - begin) != need) {
        char shape[160];
        format_shape(shape, sizeof(shape), t);
        return coopt_fail(
            COOPT_ERR_FORMAT,
            "%s: tensor '%s': data_offsets [%lld, %lld] hold %lld bytes, shape %s %s needs %llu",
            file, tn, (long long)begin, (long long)end, (long long)(end - begin), shape,
            t->st_dtype, (unsigned long long)need);
    }
    t->offset  = (uint64_t)begin;
    t->n_bytes = (size_t)need;
    return COOPT_OK;
}

static enum coopt_status parse_metadata(struct coopt_safetensors *st, const cJSON *meta,
                                        const char *file) {
    if (!cJSON_IsObject(meta)) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s: '__metadata__' must be an object, got %s", file,
                          coopt_json_type_name(meta));
    }
    int n         = cJSON_GetArraySize(meta);
    st->meta_keys = coopt_calloc((size_t)n, sizeof(char *));
    st->meta_vals = coopt_calloc((size_t)n, sizeof(char *));
    if (!st->meta_keys || !st->meta_vals) return COOPT_ERR_NOMEM;
    for (const cJSON *it = meta->child; it; it = it->next) {
        if (!cJSON_IsString(it)) {
            return coopt_fail(COOPT_ERR_FORMAT,
                              "%s: '__metadata__' value of '%s' must be a string, got %s", file,
                              it->string, coopt_json_type_name(it));
        }
        st->meta_keys[st->n_meta] = coopt_strdup(it->string);
        st->meta_vals[st->n_meta] = coopt_strdup(it->valuestring);
        if (!st->meta_keys[st->n_meta] || !st->meta_vals[st->n_meta]) {
            st->n_meta++;
            return COOPT_ERR_NOMEM;
        }
        st->n_meta++;
    }
    return COOPT_OK;
}

enum coopt_status coopt_safetensors_parse(const void *data, size_t size, const char *name,
                                          struct coopt_safetensors **out) {
    *out                                  = NULL;
    enum coopt_status              rc     = COOPT_OK;
    cJSON                         *root   = NULL;
    struct coopt_safetensors      *st     = NULL;
    const struct coopt_st_tensor **by_off = NULL;
    const uint8_t                 *b      = data;

    if (size < 8) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s: %zu bytes, too short for a safetensors file", name,
                          size);
    }
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--)
        n = (n << 8) | b[i];
    if (n > size - 8) {
        return coopt_fail(COOPT_ERR_FORMAT,
                          "%s: header length %llu runs past the end of the file (%zu bytes)", name,
                          (unsigned long long)n, size);
    }
    if (n > COOPT_ST_MAX_HEADER) {
        return coopt_fail(COOPT_ERR_FORMAT, "%s: header length %llu exceeds the %u byte limit",
                          name, (unsigned long long)n, COOPT_ST_MAX_HEADER);
    }
    if (n < 2 || b[8] != '{') {
        return coopt_fail(COOPT_ERR_FORMAT,
                          "%s: header is not a JSON object (not a safetensors file?)", name);
    }
    const char *hdr       = (const char *)b + 8;
    size_t      data_size = size - 8 - (size_t)n;
    char        file[512];
    snprintf(file, sizeof(file), "%s", name);

    rc = coopt_json_parse(hdr, (size_t)n, file, &root);
    if (rc != COOPT_OK) return rc;
    if (!cJSON_IsObject(root)) {
        rc = coopt_fail(COOPT_ERR_FORMAT, "%s: header is not a JSON object", name);
        goto done;
    }

    st = coopt_calloc(1, sizeof(*st));
    if (!st || !(st->name = coopt_strdup(name))) {
        rc = COOPT_ERR_NOMEM;
        goto done;
    }
    st->base    = b;
    st->size    = size;
    int n_ent   = cJSON_GetArraySize(root);
    st->tensors = coopt_calloc((size_t)n_ent, sizeof(struct coopt_st_tensor));
    if (!st->tensors) {
        rc = COOPT_ERR_NOMEM;
        goto done;
    }
    bool have_meta = false;
    for (const cJSON *e = root->child; e; e = e->next) {
        if (strcmp(e->string, "__metadata__") == 0) {
            if (have_meta) {
                rc = coopt_fail(COOPT_ERR_FORMAT, "%s: '__metadata__' appears twice", name);
                goto done;
            }
            have_meta = true;
            if ((rc = parse_metadata(st, e, file)) != COOPT_OK) goto done;
            continue;
        }
        struct coopt_st_tensor *t = &st->tensors[st->n_tensors];
        if ((rc = parse_entry(e, file, data_size, t)) != COOPT_OK) goto done;
        if (!(t->name = coopt_strdup(e->string))) {
            rc = COOPT_ERR_NOMEM;
            goto done;
        }
        t->data = b + 8 + n + t->offset;
        st->n_tensors++;
    }

    qsort(st->tensors, (size_t)st->n_tensors, sizeof(st->tensors[0]), cmp_tensor_name);
    for (int i = 1; i < st->n_tensors; i++) {
        if (strcmp(st->tensors[i - 1].name, st->tensors[i].name) == 0) {
            rc = coopt_fail(COOPT_ERR_FORMAT, "%s: tensor '%s' appears twice", name,
                            st->tensors[i].name);
            goto done;
        }
    }
    // Overlapping data would let one tensor's writer corrupt another's; the Python library
    // rejects it too. Empty tensors take no space and are skipped.
    by_off = coopt_calloc((size_t)st->n_tensors, sizeof(*by_off));
    if (!by_off) {
        rc = COOPT_ERR_NOMEM;
        goto done;
    }
    int n_nonempty = 0;
    for (int i = 0; i < st->n_tensors; i++) {
        if (st->tensors[i].n_bytes > 0) by_off[n_nonempty++] = &st->tensors[i];
    }
    qsort(by_off, (size_t)n_nonempty, sizeof(*by_off), cmp_tensor_offset);
    for (int i = 1; i < n_nonempty; i++) {
        if (by_off[i - 1]->offset + by_off[i - 1]->n_bytes > by_off[i]->offset) {
            rc = coopt_fail(COOPT_ERR_FORMAT, "%s: tensors '%s' and '%s' overlap", name,
                            by_off[i - 1]->name, by_off[i]->name);
            goto done;
        }
    }

done:
    free(by_off);
    cJSON_Delete(root);
    if (rc != COOPT_OK) {
        coopt_safetensors_free(st);
        return rc;
    }
    *out = st;
    return COOPT_OK;
}

enum coopt_status coopt_safetensors_open(const char *path, struct coopt_safetensors **out) {
    *out = NULL;
    struct coopt_mmap map;
    enum coopt_status rc = coopt_mmap_open(path, &map);
    if (rc != COOPT_OK) return rc;
    rc = coopt_safetensors_parse(map.addr, map.size, path, out);
    if (rc != COOPT_OK) {
        coopt_mmap_close(&map);
        return rc;
    }
    (*out)->map = map;
    return COOPT_OK;
}

const struct coopt_st_tensor *coopt_safetensors_find(const struct coopt_safetensors *st,
                                                     const char                     *name) {
    int lo = 0, hi = st->n_tensors - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        int c   = strcmp(name, st->tensors[mid].name);
        if (c == 0) return &st->tensors[mid];
        if (c < 0)
            hi = mid - 1;
        else
            lo = mid + 1;
    }
    return NULL;
}

const char *coopt_safetensors_meta(const struct coopt_safetensors *st, const char *key) {
    for (int i = 0; i < st->n_meta; i++) {
        if (strcmp(st->meta_keys[i], key) == 0) return st->meta_vals[i];
    }
    return NULL;
}

// ---- writer ----

struct st_wentry {
    char             *name;
    char              st_dtype[12];
    int               n_dims;
    int64_t           shape[COOPT_ST_MAX_DIMS];
    size_t            n_bytes;
    const void       *data;
    coopt_st_fill_fn *fill;
    void             *user;
};

struct coopt_st_writer {
    struct st_wentry *ents;
    int               n, cap;
    char            **meta_keys, **meta_vals;
    int               n_meta, cap_meta;
};

enum coopt_status coopt_st_writer_init(struct coopt_st_writer **out) {
    *out = coopt_calloc(1, sizeof(**out));
    return *out ? COOPT_OK : COOPT_ERR_NOMEM;
}

void coopt_st_writer_free(struct coopt_st_writer *w) {
    if (!w) return;
    for (int i = 0; i < w->n; i++)
        free(w->ents[i].name);
    free(w->ents);
    for (int i = 0; i < w->n_meta; i++) {
        free(w->meta_keys[i]);
        free(w->meta_vals[i]);
    }
    free(w->meta_keys);
    free(w->meta_vals);
    free(w);
}

enum coopt_status coopt_st_writer_add_raw(struct coopt_st_writer *w, const char *name,
                                          const char *st_dtype, int n_dims, const int64_t *shape,
                                          const void *data, coopt_st_fill_fn *fill, void *user) {
    size_t esize = coopt_st_dtype_size(st_dtype, NULL, NULL);
    if (esize == 0)
        return coopt_fail(COOPT_ERR_INVALID, "safetensors writer: '%s': unknown dtype '%s'", name,
                          st_dtype);
    if (n_dims < 0 || n_dims > COOPT_ST_MAX_DIMS) {
        return coopt_fail(COOPT_ERR_INVALID, "safetensors writer: '%s': %d dimensions", name,
                          n_dims);
    }
    if (strcmp(name, "__metadata__") == 0 || (!data && !fill)) {
        return coopt_fail(COOPT_ERR_INVALID, "safetensors writer: bad tensor '%s'", name);
    }
    for (int i = 0; i < w->n; i++) {
        if (strcmp(w->ents[i].name, name) == 0) {
            return coopt_fail(COOPT_ERR_INVALID, "safetensors writer: tensor '%s' added twice",
                              name);
        }
    }
    uint64_t n = esize;
    for (int d = 0; d < n_dims; d++) {
        if (shape[d] < 0 || __builtin_mul_overflow(n, (uint64_t)shape[d], &n) || n > (1ull << 53)) {
            return coopt_fail(COOPT_ERR_INVALID, "safetensors writer: '%s': bad shape", name);
        }
    }
    if (w->n == w->cap) {
        int   cap = w->cap ? 2 * w->cap : 64;
        void *p   = coopt_realloc(w->ents, (size_t)cap * sizeof(*w->ents));
        if (!p) return COOPT_ERR_NOMEM;
        w->ents = p;
        w->cap  = cap;
    }
    struct st_wentry *e = &w->ents[w->n];
    memset(e, 0, sizeof(*e));
    if (!(e->name = coopt_strdup(name))) return COOPT_ERR_NOMEM;
    snprintf(e->st_dtype, sizeof(e->st_dtype), "%s", st_dtype);
    e->n_dims = n_dims;
    for (int d = 0; d < n_dims; d++)
        e->shape[d] = shape[d];
    e->n_bytes = (size_t)n;
    e->data    = data;
    e->fill    = fill;
    e->user    = user;
    w->n++;
    return COOPT_OK;
}

enum coopt_status coopt_st_writer_add(struct coopt_st_writer *w, const char *name,
                                      enum coopt_dtype dtype, int n_dims, const int64_t *shape,
                                      const void *data) {
    const char *dn = coopt_st_dtype_name(dtype);
    if (!dn) {
        return coopt_fail(COOPT_ERR_INVALID,
                          "safetensors writer: '%s': dtype %s has no safetensors form", name,
                          coopt_dtype_name(dtype));
    }
    return coopt_st_writer_add_raw(w, name, dn, n_dims, shape, data, NULL, NULL);
}

enum coopt_status coopt_st_writer_add_fn(struct coopt_st_writer *w, const char *name,
                                         enum coopt_dtype dtype, int n_dims, const int64_t *shape,
                                         coopt_st_fill_fn *fill, void *user) {
    const char *dn = coopt_st_dtype_name(dtype);
    if (!dn) {
        return coopt_fail(COOPT_ERR_INVALID,
                          "safetensors writer: '%s': dtype %s has no safetensors form", name,
                          coopt_dtype_name(dtype));
    }
    return coopt_st_writer_add_raw(w, name, dn, n_dims, shape, NULL, fill, user);
}

enum coopt_status coopt_st_writer_meta(struct coopt_st_writer *w, const char *key,
                                       const char *value) {
    for (int i = 0; i < w->n_meta; i++) {
        if (strcmp(w->meta_keys[i], key) == 0) {
            char *v = coopt_strdup(value);
            if (!v) return COOPT_ERR_NOMEM;
            free(w->meta_vals[i]);
            w->meta_vals[i] = v;
            return COOPT_OK;
        }
    }
    if (w->n_meta == w->cap_meta) {
        int    cap = w->cap_meta ? 2 * w->cap_meta : 8;
        char **k   = coopt_realloc(w->meta_keys, (size_t)cap * sizeof(char *));
        if (!k) return COOPT_ERR_NOMEM;
        w->meta_keys = k;
        char **v     = coopt_realloc(w->meta_vals, (size_t)cap * sizeof(char *));
        if (!v) return COOPT_ERR_NOMEM;
        w->meta_vals = v;
        w->cap_meta  = cap;
    }
    char *k = coopt_strdup(key), *v = coopt_strdup(value);
    if (!k || !v) {
        free(k);
        free(v);
        return COOPT_ERR_NOMEM;
    }
    w->meta_keys[w->n_meta] = k;
    w->meta_vals[w->n_meta] = v;
    w->n_meta++;
    return COOPT_OK;
}

// Builds the header text, padded with spaces to a multiple of 8 bytes. *out is malloc'd.
static enum coopt_status build_header(const struct coopt_st_writer *w, char **out, size_t *len) {
    *out        = NULL;
    cJSON *root = cJSON_CreateObject();
    if (!root) return COOPT_ERR_NOMEM;
    if (w->n_meta > 0) {
        cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
        if (!meta) goto nomem;
        for (int i = 0; i < w->n_meta; i++) {
            if (!cJSON_AddStringToObject(meta, w->meta_keys[i], w->meta_vals[i])) goto nomem;
        }
    }
    uint64_t off = 0;
    for (int i = 0; i < w->n; i++) {
        const struct st_wentry *e = &w->ents[i];
        cJSON                  *t = cJSON_AddObjectToObject(root, e->name);
        if (!t || !cJSON_AddStringToObject(t, "dtype", e->st_dtype)) goto nomem;
        cJSON *shape = cJSON_AddArrayToObject(t, "shape");
        if (!shape) goto nomem;
        for (int d = 0; d < e->n_dims; d++) {
            cJSON *v = cJSON_CreateNumber((double)e->shape[d]);
            if (!v || !cJSON_AddItemToArray(shape, v)) goto nomem;
        }
        cJSON *offs = cJSON_AddArrayToObject(t, "data_offsets");
        if (!offs) goto nomem;
        cJSON *b  = cJSON_CreateNumber((double)off),
              *en = cJSON_CreateNumber((double)(off + e->n_bytes));
        if (!b || !cJSON_AddItemToArray(offs, b) || !en || !cJSON_AddItemToArray(offs, en))
            goto nomem;
        off += e->n_bytes;
    }
    char *text = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (!text) return COOPT_ERR_NOMEM;
    size_t n   = strlen(text);
    size_t pad = (8 - n % 8) % 8;
    char  *buf = coopt_malloc(n + pad + 1);
    if (!buf) {
        cJSON_free(text);
        return COOPT_ERR_NOMEM;
    }
    memcpy(buf, text, n);
    memset(buf + n, ' ', pad);
    buf[n + pad] = '\0';
    cJSON_free(text);
    *out = buf;
    *len = n + pad;
    return COOPT_OK;
nomem:
    cJSON_Delete(root);
    return coopt_fail(COOPT_ERR_NOMEM, "safetensors writer: out of memory building the header");
}

enum coopt_status coopt_st_writer_write(struct coopt_st_writer *w, const char *path) {
    enum coopt_status rc     = COOPT_OK;
    char             *header = NULL, *tmp = NULL;
    uint8_t          *chunk = NULL;
    FILE             *f     = NULL;
    size_t            hlen  = 0;
    const size_t      CHUNK = 4u << 20;

    if ((rc = build_header(w, &header, &hlen)) != COOPT_OK) return rc;
    size_t plen = strlen(path) + 5;
    tmp         = coopt_malloc(plen);
    if (!tmp) {
        rc = COOPT_ERR_NOMEM;
        goto done;
    }
    snprintf(tmp, plen, "%s.tmp", path);
    f = fopen(tmp, "wb");
    if (!f) {
        rc = coopt_fail(COOPT_ERR_IO, "%s: %s", tmp, strerror(errno));
        goto done;
    }
    uint8_t le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (uint8_t)((uint64_t)hlen >> (8 * i));
    if (fwrite(le, 1, 8, f) != 8 || fwrite(header, 1, hlen, f) != hlen) goto io_fail;
    for (int i = 0; i < w->n; i++) {
        const struct st_wentry *e = &w->ents[i];
        if (e->data) {
            if (e->n_bytes && fwrite(e->data, 1, e->n_bytes, f) != e->n_bytes) goto io_fail;
            continue;
        }
        if (!chunk && !(chunk = coopt_malloc(CHUNK))) {
            rc = COOPT_ERR_NOMEM;
            goto done;
        }
        for (size_t o = 0; o < e->n_bytes; o += CHUNK) {
            size_t n = COOPT_MIN(CHUNK, e->n_bytes - o);
            if ((rc = e->fill(e->user, chunk, o, n)) != COOPT_OK) {
                coopt_log_error("%s: producing tensor '%s' failed", path, e->name);
                goto done;
            }
            if (fwrite(chunk, 1, n, f) != n) goto io_fail;
        }
    }
    int cerr = fclose(f);
    f        = NULL;
    if (cerr != 0) goto io_fail;
    if (rename(tmp, path) != 0) {
        rc = coopt_fail(COOPT_ERR_IO, "%s: rename from %s failed: %s", path, tmp, strerror(errno));
        goto done;
    }
    goto done;
io_fail:
    rc = coopt_fail(COOPT_ERR_IO, "%s: write failed: %s", tmp, strerror(errno));
done:
    if (f) fclose(f);
    if (rc != COOPT_OK && tmp) remove(tmp);
    free(tmp);
    free(header);
    free(chunk);
    return rc;
}
