#!/usr/bin/env bash
# Issue-5 measurements on the embedded SmolLM2 (CPU). Needs the two quickstart runs first:
#   mosa-retrofit train recipes/smollm2-quickstart.yaml
#   mosa-retrofit train recipes/smollm2-quickstart.yaml conversion.mosa.routing=causal output_dir=out/smollm2-quickstart-causal
set -euo pipefail
R=benchmarks/results
EXPERT=out/smollm2-quickstart/final
CAUSAL=out/smollm2-quickstart-causal/final
EVAL="--block-size 256 --max-tokens 8192 --cost-seq-len 8192"
{
  echo "## held-out perplexity: expert-choice vs causal routing (256-token blocks, 8192 tokens)"
  mosa-retrofit eval "$EXPERT" $EVAL --baseline
  mosa-retrofit eval "$EXPERT" $EVAL --causal
  mosa-retrofit eval "$CAUSAL" $EVAL
} 2>/dev/null | tee $R/generate_ppl.md
mosa-retrofit bench generate "$CAUSAL" --contexts 2048,8192 --decode-context 4096 --decode-tokens 16 \
  --output $R/generate_quickstart_causal.md
for S in 8 16; do  # whole KV groups: 1 dense group of 3, 2 routed groups sharing one selection and K/V
  mosa-retrofit convert smollm2-135m out/smollm2-kvgroup-s$S --overwrite --dense-heads 3 --head-choice first \
    --sparsity $S --router-granularity kv_group --routing causal --router-init calibrated > /dev/null
  mosa-retrofit bench generate out/smollm2-kvgroup-s$S --contexts 2048,8192 --decode-context 2048 --decode-tokens 4 \
    --output $R/generate_kvgroup_s$S.md
done
