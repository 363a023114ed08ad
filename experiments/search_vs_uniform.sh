#!/usr/bin/env bash
# Issue #14's table (and #18's Gemma-3-270M table with MODEL=gemma3-270m DENSE=1 SPARSITIES="0.25 0.5"):
# a model (SmolLM2-135M by default) at 25 %, 37.5 % and 50 %, the pipeline's exported model against the
# uniform widths pruned sequentially (same pruner, same calibration), on the claim protocol: perplexity
# over 32 windows of 2048 tokens, the five zero-shot tasks over 500 documents each.
# Resumable (every pipeline stage is keyed by its settings); about 1 h per sparsity on 2 idle cores.
# Usage: bash experiments/search_vs_uniform.sh [extra pipeline overrides, e.g. search.stages=...]
#   TAG names the runs (<TAG>-s<sparsity>) and the results file; SPARSITIES="0.5 0.25 0.375" sets which
#   rows run and in what order (the table is written from those runs once all of them have run).
#   MODEL picks the model config; DENSE=1 also evaluates the dense model on the same protocol first.
# Writes experiments/results/search_vs_uniform_<TAG>.json (<MODEL>_<TAG> for another model than the
# default) with python -m experiments.search_vs_uniform.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/search_vs_uniform}
TAG=${TAG:-default}
SPARSITIES=${SPARSITIES:-0.25 0.375 0.5}
MODEL=${MODEL:-smollm2-135m}
PROTOCOL="eval=default eval.ppl_windows=32 eval.limit=500"
if [ "${DENSE:-0}" = 1 ] && [ ! -f "$OUT/dense/$MODEL/results.json" ]; then   # the protocol is fixed here
  $PY -m tyr.recipes.evaluate model=$MODEL $PROTOCOL "hydra.run.dir=$OUT/dense/$MODEL"
fi
runs=()
for sp in $SPARSITIES; do
  $PY -m tyr.recipes.pipeline model=$MODEL target_sparsity=$sp data.calibration.num_sequences=32 \
    $PROTOCOL 'compare=[uniform_reprune]' recover=none "paths.output_dir=$OUT" "name=$TAG-s$sp" "$@"
  runs+=("$OUT/pipeline/$MODEL/$TAG-s$sp")
done
stem=search_vs_uniform_$TAG
[ "$MODEL" = smollm2-135m ] || stem=search_vs_uniform_${MODEL}_$TAG
$PY -m experiments.search_vs_uniform "${runs[@]}" --out "experiments/results/$stem.json"
