#!/usr/bin/env bash
# How to spend a short adaptation budget on SmolLM2-135M (2 dense heads of 9, causal MoSA at sparsity 4,
# calibrated routers, mean fill: recipes/smollm2-goal.yaml), each variant for about 6 minutes on 2 CPU cores:
#   bash benchmarks/adaptation_sweep.sh            # writes out/adaptation-sweep/*/summary.md and a table
# Every variant starts from the same conversion; the held-out perplexity is the recipe's (4,096 tokens of the
# last 10 Wikipedia articles in blocks of 1,024).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=out/adaptation-sweep
RECIPE=recipes/smollm2-goal.yaml
COMMON=(evaluation.every=0 checkpointing.every=1000 logging.plot=false)
run() {  # name, overrides...
  local name=$1; shift
  [ -f "$OUT/$name/summary.json" ] || mosa-retrofit train "$RECIPE" output_dir="$OUT/$name" "${COMMON[@]}" "$@" --quiet
}
run e2e-attention-lr3e-4 stages.adaptation.steps=20 stages.adaptation.lr=3e-4
run e2e-attention-lr1e-3 stages.adaptation.steps=20 stages.adaptation.lr=1e-3
run e2e-all-lr3e-4 stages.adaptation.steps=20 stages.adaptation.lr=3e-4 stages.adaptation.trainable=all
run layer-distill-lr1e-3 \
  "stages=[{name: layer_distill, kind: layer_distill, steps: 60, lr: 1.0e-3, trainable: attention}]"

python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| variant | ppl after conversion | ppl after | × original | training tokens | wall time of the stage |")
print("|---|---|---|---|---|---|")
for d in sorted(p for p in out.iterdir() if (p / "summary.json").exists()):
    ev = json.loads((d / "summary.json").read_text())["evals"]
    orig, conv, last = ev[0]["ppl"], ev[1]["ppl"], ev[-1]
    print(f"| {d.name} | {conv:.2f} | {last['ppl']:.2f} | {last['ppl'] / orig:.2f} | {last['tokens']:,} | "
          f"{last['time']:.0f} s |")
EOF
