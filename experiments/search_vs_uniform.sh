#!/usr/bin/env bash
# Issue #14's table: SmolLM2-135M at 25 %, 37.5 % and 50 %, the pipeline's exported model against the
# uniform widths pruned sequentially (same pruner, same calibration), on the claim protocol: perplexity
# over 32 windows of 2048 tokens, the five zero-shot tasks over 500 documents each.
# Resumable (every pipeline stage is keyed by its settings); about 1 h per sparsity on 2 idle cores.
# Usage: bash experiments/search_vs_uniform.sh [extra pipeline overrides, e.g. search.stages=...]
#   TAG names the runs (<TAG>-s<sparsity>) and the results file; SPARSITIES="0.5 0.25 0.375" sets which
#   rows run and in what order (the table is written from those runs once all of them have run).
# Writes experiments/results/search_vs_uniform.json (python -m experiments.search_vs_uniform).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/search_vs_uniform}
TAG=${TAG:-default}
SPARSITIES=${SPARSITIES:-0.25 0.375 0.5}
runs=()
for sp in $SPARSITIES; do
  $PY -m tyr.recipes.pipeline model=smollm2-135m target_sparsity=$sp data.calibration.num_sequences=32 \
    eval=default eval.ppl_windows=32 eval.limit=500 'compare=[uniform_reprune]' recover=none \
    "paths.output_dir=$OUT" "name=$TAG-s$sp" "$@"
  runs+=("$OUT/pipeline/smollm2-135m/$TAG-s$sp")
done
$PY -m experiments.search_vs_uniform "${runs[@]}" --out "experiments/results/search_vs_uniform_$TAG.json"
