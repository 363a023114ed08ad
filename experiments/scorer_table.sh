#!/usr/bin/env bash
# Issue 3 table: every scorer, with and without reconstruction, uniform 25 % and 50 %, SmolLM2-135M.
# 36 jobs (Hydra multirun, one directory each, failures recorded without stopping the sweep), then the
# summary table. Finished jobs are skipped, so an interrupted run resumes where it stopped.
# STREAMS=2 (default) runs two multiruns side by side with TYR_THREADS=1 each: on 2 cores that is
# faster than one stream with 2 threads, because lm-eval's Python side and the per-layer loop do not
# parallelise across threads. Usage: bash experiments/scorer_table.sh [extra hydra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/scorer_table}
STREAMS=${STREAMS:-2}
# the pruners of issue 7's comparison first, so a partial run already answers it
PRUNERS=(hywia magnitude wanda_sp flap taylor_element1 taylor_vector taylor_element2 obs hywia_comp)
threads=$(( $(nproc) / STREAMS )); (( threads > 0 )) || threads=1
pids=()
for ((s = 0; s < STREAMS; s++)); do
  mine=()
  for ((i = s; i < ${#PRUNERS[@]}; i += STREAMS)); do mine+=("${PRUNERS[i]}"); done
  list=$(IFS=,; echo "${mine[*]}")
  TYR_THREADS=$threads .venv/bin/python -m tyr.recipes.prune -m model=smollm2-135m "pruner=$list" \
    pruner.reconstruction=none,lstsq target_sparsity=0.25,0.5 eval=quick data.calibration.num_sequences=32 \
    "hydra.sweep.dir=$OUT" "$@" > "$OUT.stream$s.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
.venv/bin/python -m experiments.summarize "$OUT"
exit $status
