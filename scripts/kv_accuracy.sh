#!/usr/bin/env bash
# Accuracy of each KV-cache type against the F32 cache: PPL, ΔPPL, mean KLD, top-1 agreement
# (coopt perplexity --kl-divergence against an F32 baseline) and LAMBADA accuracy, as Markdown
# rows. Usage: scripts/kv_accuracy.sh [BUILD_DIR] > rows.md   (uses $COOPT_MODELS, $COOPT_DATA)
set -euo pipefail
B=${1:-build}/coopt
M=${COOPT_MODELS:-../shared/models}
D=${COOPT_DATA:-../shared/data}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
TYPES="f32 f16 bf16 fp8_e4m3 fp8_e4m3:1 fp8_e5m2 fp8_e5m2:1"  # ":1" = --kv-scale-search 1 (plain amax scale)
echo "| model | text | KV type | PPL | ΔPPL | mean KLD | top-1 agree | LAMBADA acc |"
echo "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"
for model in stories260K.gguf story-lmrs tinystories-mha-25m; do
  for text in tinystories-valid-excerpt.txt wiki.test.raw; do
    args=(-c 256)
    [ "$text" = wiki.test.raw ] && args=(-c 512 --chunks 60)
    "$B" perplexity -m "$M/$model" -f "$D/$text" "${args[@]}" --kv-type f32 --save-logits "$TMP/base.bin" \
      > "$TMP/base.txt" 2>/dev/null
    for spec in $TYPES; do
      kv=${spec%%:*}
      ss=16; [ "$spec" != "$kv" ] && ss=${spec#*:}
      label=$kv; [ "$ss" = 1 ] && label="$kv (amax scale)"
      sarg=(); case $kv in fp8*) sarg=(--kv-scale-search "$ss");; esac
      "$B" perplexity -m "$M/$model" --kl-divergence "$TMP/base.bin" -f "$D/$text" "${args[@]}" --kv-type "$kv" "${sarg[@]}" \
        > "$TMP/kl.txt" 2>/dev/null
      ppl=$(grep -m1 -E '^Mean PPL\(Q\)' "$TMP/kl.txt" | sed -E 's/.*: *//')
      dppl=$(grep -m1 -E '^Relative ΔPPL' "$TMP/kl.txt" | sed -E 's/.*: *//')
      kld=$(grep -m1 -E '^Mean +KLD' "$TMP/kl.txt" | sed -E 's/.*: *//')
      top=$(grep -m1 -E '^Same top p' "$TMP/kl.txt" | sed -E 's/.*: *//')
      lam=""
      if [ "$text" = tinystories-valid-excerpt.txt ]; then
        lam=$("$B" lambada -m "$M/$model" -f "$D/lambada_test.jsonl" --limit 1000 --kv-type "$kv" "${sarg[@]}" 2>/dev/null \
              | grep -m1 '^acc' | sed -E 's/^acc = ([0-9.]+ ± [0-9.]+).*/\1/')
      fi
      echo "| $model | $text | $label | $ppl | $dppl | $kld | $top | $lam |"
    done
  done
done
