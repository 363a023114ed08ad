#!/usr/bin/env bash
# Issue 15 table: SmolLM2-135M pruned uniformly (prune recipe, HyWIA-comp) at 50 % and 25 %, recovered
# by distillation from the dense model with LoRA and with full training, evaluated before and after
# with the full protocol of the issue (perplexity over 32 windows of 2048 tokens, the five zero-shot
# tasks over 500 documents each); then LoRA at 0.1M / 0.3M / 1M tokens at 50 % (perplexity only) for
# the perplexity-against-tokens plot. Writes experiments/results/recovery.json and
# experiments/results/recovery_ppl_vs_tokens.png (python -m experiments.recovery_report).
# Every stage is keyed by its settings: rerunning skips what is done and resumes an interrupted training.
# Usage: bash experiments/recovery.sh [extra overrides for the recover recipe, e.g. recover.bf16=true]
#   SPARSITIES="0.5 0.25" (the table's rows) and PARTS="table searched tokens" (the uniform table, the
#   searched model's recoveries, the perplexity-against-tokens runs) choose what runs, so the hours can
#   be spread over several sittings; what is done is skipped anyway. CURVE="50000 100000 ..." sets the token
#   budgets of the perplexity-against-tokens runs; SEARCHED_RUN=<pipeline run dir> picks the searched model.
# Cost on 2 idle cores with bf16 autocast (docs/journal.md): about 250 tokens/s (LoRA) and 230 (full), so
# the default 200K tokens per recovery train in 13-16 min and the 1M-token curve point in about 67 min.
# Each full evaluation takes about 25 min; the whole script several hours.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/recovery}
TOKENS_LORA=${TOKENS_LORA:-200000}
TOKENS_FULL=${TOKENS_FULL:-200000}
SPARSITIES=${SPARSITIES:-0.5 0.25}
PARTS=${PARTS:-table searched tokens}
CURVE=${CURVE:-100000 300000 1000000}   # the token budgets of the perplexity-against-tokens runs
FULL_EVAL="eval=default eval.ppl_windows=32 eval.limit=500 recover.bf16=true"
want() { [[ " $PARTS " == *" $1 "* ]]; }
want table && for sp in $SPARSITIES; do
  run="$OUT/prune-s$sp"
  $PY -m tyr.recipes.prune model=smollm2-135m target_sparsity=$sp eval=quick data.calibration.num_sequences=32 \
    "hydra.run.dir=$run"
  $PY -m tyr.recipes.recover "run=$run" recover=lora recover.tokens=$TOKENS_LORA $FULL_EVAL "$@"
  $PY -m tyr.recipes.recover "run=$run" recover=full recover.tokens=$TOKENS_FULL $FULL_EVAL "$@"
done
# searched + recovered against uniform + recovered: the searched model of SEARCHED_RUN (a finished pipeline
# run, e.g. one of experiments/search_vs_uniform.sh) or else of the demo pipeline, with the same budgets as
# the uniform one
roots=("$OUT")
if want searched; then
  searched=${SEARCHED_RUN:-$OUT/pipeline/smollm2-135m/demo-s0.5}
  [ -n "${SEARCHED_RUN:-}" ] || $PY -m tyr.recipes.pipeline +experiment=demo "paths.output_dir=$OUT"
  [ -n "${SEARCHED_RUN:-}" ] && roots+=("$SEARCHED_RUN")
  $PY -m tyr.recipes.recover "run=$searched" recover=lora recover.tokens=$TOKENS_LORA $FULL_EVAL "$@"
  $PY -m tyr.recipes.recover "run=$searched" recover=full recover.tokens=$TOKENS_FULL $FULL_EVAL "$@"
fi
want tokens && for tokens in $CURVE; do   # perplexity against tokens (50 %, LoRA, quick protocol, no tasks)
  $PY -m tyr.recipes.recover "run=$OUT/prune-s0.5" recover=lora recover.tokens=$tokens recover.bf16=true eval=quick eval.tasks=[] \
    export=false "$@"
done
$PY -m experiments.recovery_report "${roots[@]}"
