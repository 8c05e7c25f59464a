#!/usr/bin/env python3
"""
make_golden.py -- regenerates the golden files of tests/test_golden.c from the real test models,
with the float64 numpy reference in scripts/ref_llama.py. Run from the repository root:

    python3 scripts/make_golden.py          # models from $COOPT_MODELS (default ../shared/models)

Deterministic: fixed prompts, greedy decoding, no randomness. Token ids of the Hugging Face models
come from their tokenizer.json through the `tokenizers` library (its post-processor adds BOS).

File format, one pair per case <name> (written to tests/golden/):

  <name>.json         {"model": "<path relative to $COOPT_MODELS>",
                       "alt_models": ["<other path with the same weights>", ...],   (optional)
                       "n_vocab": V,
                       "prompts": [[ids...], ...],           P prompts, different lengths
                       "prompt_texts": ["...", ...],          what was tokenized (documentation)
                       "steps": N,
                       "greedy_tokens": [[N ids], ...],       per prompt
                       "logit_scale": max |logit| over the file,
                       "min_top2_margin": smallest (top1 - top2) logit gap over all rows,
                       "f32_rel_err": max |logit_f32 - logit_f64| / logit_scale of the same
                                      reference run in float32 (how far plain f32 drifts),
                       "story_prompt_text", "story_tokens", "story_text"   (stories260K only:
                                      40 greedy tokens after the prompt and their text)}
  <name>.logits.bin   float32 little-endian [P][N+1][V]: for each prompt the logits of its last
                      prompt token (after prefill), then of each greedily chosen token in turn
                      (row i+1 = logits after feeding greedy_tokens[p][i]).

The script refuses to write a case whose greedy choice is fragile (top-2 margin below
MIN_MARGIN): the engine runs in float32 and must pick the same tokens.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ref_llama as R  # noqa: E402

MODELS = os.environ.get("COOPT_MODELS", "../shared/models")
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden")
STEPS = 4
STORY_STEPS = 40
MIN_MARGIN = 0.05  # logit units; the tests' tolerance is ~1e-4 * scale ~ 2e-3
README_STORY = ("Once upon a time, there was a little girl named Lily. "
                "She loved to play outside in the park.")


def hf_ids(model_dir, text):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(MODELS, model_dir, "tokenizer.json")).encode(text).ids


def make_case(name, model_rel, prompts, texts, alt_models=(), extra=None):
    m = R.load(os.path.join(MODELS, model_rel))
    m32 = m.astype(np.float32)
    rows, greedy, margins, f32err = [], [], [], 0.0
    for p in prompts:
        toks, lg = R.greedy(m, p, STEPS)
        # the f32 run is fed the f64 run's tokens so the rows are comparable
        lg32 = np.stack([R.forward(m32, list(p) + toks[:i])[-1] for i in range(STEPS + 1)])
        srt = np.sort(lg, axis=1)
        margins.append(float((srt[:, -1] - srt[:, -2]).min()))
        f32err = max(f32err, float(np.abs(lg32 - lg).max()))
        rows.append(lg)
        greedy.append(toks)
    logits = np.stack(rows).astype("<f4")  # [P][N+1][V]
    scale = float(np.abs(logits).max())
    assert min(margins) >= MIN_MARGIN, \
        "%s: fragile greedy choice (margin %g)" % (name, min(margins))
    meta = {
        "model": model_rel,
        "n_vocab": int(m.n_vocab),
        "prompts": [list(map(int, p)) for p in prompts],
        "prompt_texts": texts,
        "steps": STEPS,
        "greedy_tokens": greedy,
        "logit_scale": scale,
        "min_top2_margin": min(margins),
        "f32_rel_err": f32err / scale,
        "reference": "scripts/ref_llama.py, float64",
    }
    if alt_models:
        meta["alt_models"] = list(alt_models)
    if extra:
        meta.update(extra(m))
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        # one key per line, values compact: small diffs when regenerated
        f.write("{\n" + ",\n".join(" %s: %s" % (json.dumps(k), json.dumps(v))
                                    for k, v in meta.items()) + "\n}\n")
    logits.tofile(os.path.join(OUT, name + ".logits.bin"))
    print("%-22s prompts %s greedy %s scale %.2f margin %.3f f32_rel_err %.2e" % (
        name, [len(p) for p in prompts], greedy, scale, min(margins), f32err / scale))


def story_extra(prompt):
    def extra(m):
        toks, lg = R.greedy(m, prompt, STORY_STEPS)
        srt = np.sort(lg, axis=1)
        margin = float((srt[:-1, -1] - srt[:-1, -2]).min())
        text = R.pieces_to_text(m.vocab, prompt + toks)
        assert text.lstrip(" ").startswith(README_STORY), "story mismatch: %r" % text
        assert margin >= MIN_MARGIN, "fragile story decoding (margin %g)" % margin
        print("story (margin %.3f): %s" % (margin, text.strip()))
        return {"story_prompt_text": "Once upon a time", "story_tokens": toks,
                "story_text": text, "story_min_top2_margin": margin}
    return extra


def main():
    os.makedirs(OUT, exist_ok=True)

    # story-lmrs: three prompts of different lengths (6, 15, 18 tokens with BOS): with 16-token
    # KV pages the second crosses a page boundary while decoding, the third during prefill.
    texts = ["Once upon a time",
             "One day, a little girl named Sue found a shiny coin under her bed. She",
             "Once upon a time, there was a little bird who lived in a tree. "
             "Every morning, the bird"]
    make_case("story-lmrs", "story-lmrs", [hf_ids("story-lmrs", t) for t in texts], texts)

    text = "Once upon a time, there was a little boy"
    make_case("tinystories-mha-25m", "tinystories-mha-25m",
              [hf_ids("tinystories-mha-25m", text)], [text])

    # stories260K uses its own 512-piece vocabulary (ids of the Llama-2 32000 vocab would be out
    # of range): <s> ▁Once ▁upon ▁a ▁time.
    prompt = [1, 403, 407, 261, 378]
    vocab = R.load(os.path.join(MODELS, "stories260K.gguf")).vocab
    assert [vocab[i] for i in prompt] == \
        ["<s>", "\u2581Once", "\u2581upon", "\u2581a", "\u2581time"]
    make_case("stories260K", "stories260K.gguf", [prompt], ["Once upon a time"],
              alt_models=["stories260K.bin"], extra=story_extra(prompt))

    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT)
                if not f.startswith("tok_"))
    print("golden files: %d bytes" % total)


if __name__ == "__main__":
    main()
