#!/usr/bin/env bash
# The GPU check: the `gpu` tests, a DunDi-AT run through the CLI on the GPU, the GPU side of the
# benchmarks (bench/gpu.py: CPU vs GPU in one run, ratios), the certified recipe at CNN7 size
# (bench/gpu_certified.sh, under 8 minutes), FAISS on the GPU against the CPU index
# (bench/faiss_gpu_check.py), and the AutoAttack cascade on the whole full-MNIST test split with
# `dundi evaluate --device cuda` (the faiss and autoattack parts: target under 10 minutes on one
# H100/H200). Record its output, with the date and the GPU, in docs/gpu.md.
#
#   bash bench/gpu_check.sh                          # everything, on the GPU machine
#   PARTS="faiss autoattack" bash bench/gpu_check.sh # only those parts
#   DEVICE=cpu LIMIT=32 TINY=1 PARTS="faiss autoattack" bash bench/gpu_check.sh
#                                                    # the CPU dry run: the GPU parts say SKIPPED
# PYTHON=... picks the interpreter (default: python3); RUN=... evaluates that full-MNIST DunDi run
# instead of training one; LIMIT (default: all) is the number of test images evaluated.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-all}
PARTS=${PARTS:-tests train bench certified faiss autoattack}
rc=0
part() { [[ " $PARTS " == *" $1 "* ]]; }
date -u +"%Y-%m-%dT%H:%M:%SZ"
if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    gpu=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || rc=1
    $PY -c "import torch, faiss; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
'|', torch.cuda.get_device_name(0), '| faiss', faiss.__version__, 'GPUs seen by faiss:', faiss.get_num_gpus())" || exit 1
else
    gpu=0
    echo "no CUDA GPU seen by PyTorch on this machine: every part that needs one says SKIPPED"
    if [[ $DEVICE == cuda* ]]; then
        echo "SKIPPED all GPU parts: DEVICE=$DEVICE but there is no GPU (DEVICE=cpu runs the CPU dry run)"
        exit 0
    fi
fi
skip() { echo "SKIPPED $1: no CUDA GPU"; }

if part tests; then
    echo "== pytest -m gpu"
    $PY -m pytest -m gpu -rs -q -p no:cacheprovider tests/test_gpu.py tests/test_oracle_gpu.py || rc=1
fi

out=$(mktemp -d ./.gpu-check.XXXXXX)  # inside the repository: the log names the run relative to it
trap 'rm -rf "$out"' EXIT
if part train; then
    echo "== dundi train --device cuda (DunDi-AT, mnist-10k, 1 epoch)"
    if (( gpu )); then
        time $PY -m dundi train --dataset mnist-10k --backbone lenet5 --adversarial \
            --adv-eps 0.3 --epochs 1 --tuples 20000 --device cuda --no-progress --out "$out/at" --json || rc=1
    else skip "dundi train --device cuda"; fi
fi

if part bench; then
    echo "== bench/gpu.py (the CLI's defaults: batch 128; then large batches, where a GPU pays)"
    if (( gpu )); then
        $PY bench/gpu.py || rc=1
        $PY bench/gpu.py --batch 1024 --tuples 32768 --images 4096 || rc=1
    else skip "bench/gpu.py"; fi
fi

if part certified; then
    echo "== bench/gpu_certified.sh (CNN7 certified DunDi and softmax IBP on full MNIST, certified)"
    if (( gpu )); then
        time PYTHON=$PY bash bench/gpu_certified.sh || rc=1
    else skip "bench/gpu_certified.sh"; fi
fi

if part faiss; then
    echo "== bench/faiss_gpu_check.py (a FAISS index built and searched on the GPU vs the CPU index)"
    $PY bench/faiss_gpu_check.py || rc=1   # prints SKIPPED itself without a FAISS GPU build or a GPU
fi

if part autoattack; then
    echo "== dundi evaluate --device $DEVICE: the AutoAttack cascade on the full-MNIST test split (limit: $LIMIT)"
    start=$(date +%s)
    run=${RUN:-}
    if [[ -z $run ]]; then  # a plain DunDi_R3 on full MNIST, 1 epoch (TINY: 2,000 images)
        run="$out/mnist"
        tiny=(); [[ -n "${TINY:-}" ]] && tiny=(--limit 2000 --tuples 4000 --oracles 10)
        $PY -m dundi train --dataset mnist --backbone lenet5 --epochs 1 "${tiny[@]}" --device "$DEVICE" \
            --no-progress --out "$run" --json | tail -n 1 || rc=1
    fi
    trained=$(date +%s)
    # --json prints the summary as one JSON object, last: robust accuracy, cost and layout
    $PY -m dundi evaluate "$run" --threat adaptive --attacks autoattack --eps 0.3 --limit "$LIMIT" \
        --device "$DEVICE" --no-progress --out "$out/eval" --json | tail -n 1 \
        | $PY -c "import json, sys; s = json.loads(sys.stdin.read()); w = [x for x in s['worst_case'] if x['norm'] == 'Linf']; \
print(json.dumps({'device': '$DEVICE', 'samples': s['clean_accuracy']['count'], 'clean_accuracy': s['clean_accuracy']['dundi'], \
'robust_accuracy_linf_0.3': w[0]['robust_accuracy'] if w else None, 'layout': s['timing'].get('layout_reason'), \
'evaluate_seconds': s['timing']['seconds']}))" || rc=1
    echo "autoattack part: $(( trained - start )) s training, $(( $(date +%s) - trained )) s evaluating on $DEVICE"
fi
exit $rc
