/*
 * context.h -- internal accessors of struct coopt_ctx for modules built on top of a context
 * (the scheduler), so they can plan against the KV page budget without duplicating its rules.
 */
#ifndef COOPT_CONTEXT_H
#define COOPT_CONTEXT_H

#include "coopt.h"

#include <stdint.h>

struct coopt_model *coopt_ctx_model(const struct coopt_ctx *c);
const struct coopt_ctx_params *coopt_ctx_params(const struct coopt_ctx *c);
// Free KV pages now, and pages needed to append n tokens to seq (copy-on-write included).
int64_t coopt_ctx_pages_free(const struct coopt_ctx *c);
int64_t coopt_ctx_pages_needed(const struct coopt_ctx *c, int32_t seq, int64_t n);

struct coopt_forward_hook;
struct coopt_backend;
// The context's backend (tests read backend statistics through it).
struct coopt_backend *coopt_ctx_backend(const struct coopt_ctx *c);
// Installs (or with NULL removes) an observer of matmul inputs (see forward.h). CPU only.
enum coopt_status coopt_ctx_set_hook(struct coopt_ctx *c, const struct coopt_forward_hook *hook);

#endif
