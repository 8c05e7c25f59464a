/*
 * sampler.h -- the host sampler's state as the backend's sample op takes it (pick.h), for
 * coopt_ctx_generate's sampled chaining, and the host version of that op.
 */
#ifndef COOPT_SAMPLER_H
#define COOPT_SAMPLER_H

#include "coopt.h"
#include "pick.h"

// The sampler's parameters and random state as a pick_state, if its choice can be made by the
// sample op: greedy (as top_k 1: the largest candidate, no draw), or temperature > 0, no
// repetition penalty, 1 <= top_k <= PICK_MAX_K, and a vocabulary the device's two-level top-k
// holds (ceil(n_vocab / PICK_SEG) * top_k <= PICK_SEG). Then the op draws exactly what
// coopt_sampler_sample draws from the same logits. false otherwise.
bool coopt_sampler_pick_state(const struct coopt_sampler *s, struct pick_state *out);
// Whether the sampler's choice is the argmax of any logits (temperature <= 0, no penalty).
bool coopt_sampler_greedy(const struct coopt_sampler *s);
// The random state (xoshiro256**): set after the op drew for the sampler, read by tests.
void coopt_sampler_set_rng(struct coopt_sampler *s, const uint64_t rng[4]);
void coopt_sampler_get_rng(const struct coopt_sampler *s, uint64_t rng[4]);
// The sample op on the host: coopt_sampler_sample's choice from x[0, n) for the sampler whose
// pick_state ps is (advancing ps->rng as it would advance the sampler's).
int32_t coopt_pick_row(const float *x, int32_t n, struct pick_state *ps);

#endif // COOPT_SAMPLER_H
