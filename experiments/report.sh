#!/usr/bin/env bash
# The SmolLM2 report (issues #3 and #7): uniform rows of every scorer (runs/scorer_table, see
# scorer_table.sh) with the pipeline's searched / uniform / OWL / dense rows (runs/pipeline/smollm2-135m),
# one table (Markdown + CSV), plots and a page in docs/report/. Same protocol everywhere: eval=quick.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m experiments.summarize runs/scorer_table runs/pipeline/smollm2-135m --out runs/report --report docs/report --update docs/journal.md "$@"
