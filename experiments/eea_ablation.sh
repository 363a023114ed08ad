#!/usr/bin/env bash
# Issue 4: EEA ablation on SmolLM2-135M at 50 %: build one supernet per EEA mode and evaluate the
# centre allocation (every module at its 50 % level) on WikiText-2. Usage: bash experiments/eea_ablation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m tyr.recipes.build -m model=smollm2-135m target_sparsity=0.5 pruner=hywia \
  supernet.eea=none,uniform,expectation,path evaluate_centre=true \
  eval=quick "eval.perplexity=[wikitext2_test]" eval.ppl_windows=16 "eval.tasks=[]" \
  data.calibration.num_sequences=32 "$@"
