#!/usr/bin/env bash
# Issue 3 table: every scorer, with and without reconstruction, uniform 25 % and 50 %, SmolLM2-135M.
# 32 jobs (Hydra multirun, one directory each, failures recorded without stopping the sweep), then the
# summary table. Usage: bash experiments/scorer_table.sh [extra hydra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/scorer_table}
.venv/bin/python -m tyr.recipes.prune -m model=smollm2-135m \
  pruner=hywia,magnitude,taylor_vector,taylor_element1,taylor_element2,wanda_sp,flap,obs \
  pruner.reconstruction=none,lstsq target_sparsity=0.25,0.5 eval=quick data.calibration.num_sequences=32 threads=2 \
  "hydra.sweep.dir=$OUT" "$@"
.venv/bin/python -m experiments.summarize "$OUT"
