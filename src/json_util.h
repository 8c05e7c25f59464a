/*
 * json_util.h -- typed getters over cJSON whose errors name the file and the key.
 *
 * Every getter returns COOPT_OK or COOPT_ERR_FORMAT after printing one line such as
 * "coopt: model/config.json: field 'hidden_size' must be an integer, got string". Numbers are
 * read from cJSON's double and range-checked before any conversion, so hostile values
 * (1e400, -0.5, 2^70) are errors, never undefined behaviour. The _opt variants treat a
 * missing key and an explicit JSON null alike: the default is returned.
 */
#ifndef COOPT_JSON_UTIL_H
#define COOPT_JSON_UTIL_H

#include "coopt.h"

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

// Parses `len` bytes of JSON text (need not be NUL-terminated). Only whitespace may follow
// the value. On success *out is a tree to release with cJSON_Delete(); on failure *out is NULL
// and the message names `file` and the byte offset of the error.
enum coopt_status coopt_json_parse(const char *text, size_t len, const char *file, cJSON **out);

// True if obj has `key` with a non-null value.
bool coopt_json_has(const cJSON *obj, const char *key);

// A human name for the type of item ("string", "array", "null", ...), for messages.
const char *coopt_json_type_name(const cJSON *item);

// Integer in [lo, hi]. Missing -> error "missing field".
enum coopt_status coopt_json_int(const cJSON *obj, const char *key, const char *file, int64_t lo,
                                 int64_t hi, int64_t *out);
// Integer in [lo, hi]; missing or null -> def.
enum coopt_status coopt_json_int_opt(const cJSON *obj, const char *key, const char *file,
                                     int64_t lo, int64_t hi, int64_t def, int64_t *out);
// Finite number in [lo, hi]; missing or null -> def (pass NAN to detect absence).
enum coopt_status coopt_json_num_opt(const cJSON *obj, const char *key, const char *file, double lo,
                                     double hi, double def, double *out);
// Finite number in [lo, hi]. Missing -> error.
enum coopt_status coopt_json_num(const cJSON *obj, const char *key, const char *file, double lo,
                                 double hi, double *out);
// Boolean; missing or null -> def.
enum coopt_status coopt_json_bool_opt(const cJSON *obj, const char *key, const char *file, bool def,
                                      bool *out);
// String (borrowed from the tree); missing or null -> NULL.
enum coopt_status coopt_json_str_opt(const cJSON *obj, const char *key, const char *file,
                                     const char **out);

// Converts a JSON number item to an integer in [lo, hi]; false if it is not one.
bool coopt_json_item_int(const cJSON *item, int64_t lo, int64_t hi, int64_t *out);

#endif // COOPT_JSON_UTIL_H
