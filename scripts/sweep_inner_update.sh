#!/usr/bin/env bash
# The sweep behind GEM-BML+'s Gauss-Newton defaults (README, "Defaults"): each variant changes one setting of
# the defaults, meta-trains 1500 iterations x 25 tasks (seed 0) on sinusoid and sinusoid-challenging, and is
# scored on VALIDATION tasks (task seed 999; the README's tables use the test seed 12345), MSE after 10 steps.
# Two runs at a time, one thread each; about 15 minutes on 2 cores. Usage: [LANES=1] bash scripts/sweep_inner_update.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/sweep-inner-update}
HB=${HB:-.venv/bin/hbmeta}
variants=(
  "defaults|"
  "3-steps|--inner-steps 3"
  "prior-0.1|--prior-scale 0.1"
  "noise-0.1|--noise-scale 0.1"
  "noise-0.5|--noise-scale 0.5"
  "learned-noise|--learn-likelihood"
  "marginal-variances|--inner-variance marginal"
  "q2-warm-start|--gem-plus-mode joint"
  "svi|--inner-method svi"
)
run() {  # run SETTING NAME FLAGS...
  local setting=$1 name=$2; shift 2
  local dir="$OUT/$setting/$name"
  if [ ! -f "$dir/evaluation.json" ]; then  # an unfinished run from an earlier sitting resumes
    local resume=(); [ -f "$dir/checkpoint.pt" ] && resume=(--resume)
    "$HB" train "$setting" --iterations 1500 --seed 0 --checkpoint-every 500 --eval-tasks 1 --no-progress --out "$dir" "${resume[@]}" "$@" > /dev/null
    "$HB" evaluate "$dir" --seed 999 --steps 10 > /dev/null
  fi
}
for v in "${variants[@]}"; do
  name=${v%%|*}; flags=${v#*|}
  if [ "${LANES:-2}" = 1 ]; then  # LANES=1: one run at a time
    run sinusoid "$name" $flags
    run sinusoid-challenging "$name" $flags
  else
    run sinusoid "$name" $flags &
    run sinusoid-challenging "$name" $flags &
    wait
  fi
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
names = [p.name for p in sorted((out / "sinusoid").iterdir())]
print("| variant | sinusoid MSE after 1 / 10 steps | challenging MSE after 1 / 10 steps |\n|---|---|---|")
rows = {}
for name in names:
    cells = []
    for setting in ("sinusoid", "sinusoid-challenging"):
        e = json.loads((out / setting / name / "evaluation.json").read_text())
        cells.append(f"{e['1']['mse']:.3f} / {e['10']['mse']:.3f} ± {e['10']['ci95']:.3f}")
        rows.setdefault(name, {})[setting] = e
    print(f"| {name} | " + " | ".join(cells) + " |")
(out / "sweep.json").write_text(json.dumps(rows, indent=2))
PY
