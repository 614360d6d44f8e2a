#!/usr/bin/env bash
# The certified recipe at the field's scale, for one GPU: a CNN7-sized certified DunDi and the
# softmax IBP baseline on the same network, batches and schedule, on full MNIST; each certified
# on the whole test set at L-inf 0.1 and 0.3, the figures printed as JSON and kept beside the
# runs. Budget: under 8 minutes on one H100/H200 for both (the epochs below are sized for it).
#
#   bash bench/gpu_certified.sh                 # on the GPU machine (PYTHON=... picks python)
#   TINY=1 DEVICE=cpu bash bench/gpu_certified.sh   # the same steps on CPU in about a minute
#
# Output: $OUT (default runs/gpu-certified) holds both runs and figures.jsonl, one line per run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu-certified}
DEVICE=${DEVICE:-cuda}
if [[ -n "${TINY:-}" ]]; then   # the CPU check: a slice of the data, two short epochs, a small eval
    DATA=(--dataset mnist-10k --limit 600); EPOCHS=(--epochs 3 --cert-warmup 1 --cert-ramp 1)
    EVAL=(--limit 200); ARCH=${ARCH:-cnn7}
else
    DATA=(--dataset mnist); EPOCHS=(--epochs ${EPOCHS:-24} --cert-warmup 1 --cert-ramp 12)
    EVAL=(); ARCH=${ARCH:-cnn7}
fi
mkdir -p "$OUT"
: > "$OUT/figures.jsonl"
common=("${DATA[@]}" --backbone "$ARCH" --certified --cert-eps 0.4 "${EPOCHS[@]}" --device "$DEVICE" --no-progress)
for kind in dundi softmax; do
    run="$OUT/$kind-$ARCH"
    start=$(date +%s)
    if [[ $kind == dundi ]]; then
        # learned class prototypes as the oracles: the head that certifies level with softmax IBP
        # on equal terms (docs/results/certified/equal-terms)
        $PY -m dundi train "${common[@]}" --cert-head prototypes --out "$run" --json | tail -n 1
    else
        $PY -m dundi train-native "${common[@]}" --out "$run" --json | tail -n 1
    fi
    seconds=$(( $(date +%s) - start ))
    $PY -m dundi certify "$run" --eps 0.1 0.3 "${EVAL[@]}" --json | tail -n 1 \
        | $PY -c "import json, sys; f = json.loads(sys.stdin.read()); f['wall_seconds_train'] = $seconds; \
f['device'] = '$DEVICE'; print(json.dumps(f))" | tee -a "$OUT/figures.jsonl"
done
