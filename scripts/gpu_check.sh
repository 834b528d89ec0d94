#!/usr/bin/env bash
# The one GPU check (issue 12): under 8 minutes on one GPU, everything written under $OUT (default runs/gpu).
#   1. the tests that need CUDA (they skip on a CPU-only machine),
#   2. hbmeta bench step, bench scaling (conv4 at the image defaults, 1 / 2 / 5 inner steps: GEM-BML+ against MAML,
#      issue 23) and bench throughput on cuda (time / memory per meta-iteration, tasks per second),
#   3. hbmeta bench accuracy on cuda: Omniglot 5-way 1-shot, every algorithm, one seed, at the "gpu" budget
#      (3000 meta-iterations x 32 tasks; the paper's is 60000 x 32: --budget paper on a longer lease).
# Each stage has its own time limit, so a slow stage cannot eat the next one's time.
# Usage: bash scripts/gpu_check.sh            (a venv in .venv with the package installed, as the README says)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
PY=${PY:-.venv/bin/python}
HB=${HB:-.venv/bin/hbmeta}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local began=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - began)) s" | tee -a "$OUT/stages.txt"
}
stage cuda-tests 90 "$PY" -m pytest -q -o addopts="" -k "cuda or gpu" tests
stage bench-step 60 "$HB" bench step --device cuda --repeats 5 --out "$OUT/step"
stage bench-scaling 90 "$HB" bench scaling --device cuda --algos maml,fomaml,gem-bml+,ibaml --inner-steps 1,2,5 \
    --repeats 3 --warmup 1 --out "$OUT/scaling"
stage bench-throughput 60 "$HB" bench throughput --device cuda --out "$OUT/throughput"
stage bench-accuracy 240 "$HB" bench accuracy --device cuda --benchmarks omniglot-5w1s --budget gpu --seeds 0 \
    --out "$OUT/accuracy"
tail -n 5 "$OUT"/*.log > "$OUT/summary.txt" 2>/dev/null
cat "$OUT/stages.txt"
