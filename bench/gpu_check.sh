#!/usr/bin/env bash
# The GPU check (a few minutes on one GPU): the `gpu` tests, a DunDi-AT run through the CLI on
# the GPU, the GPU side of the benchmarks (bench/gpu.py: CPU vs GPU in one run, ratios), then
# the certified recipe at CNN7 size (bench/gpu_certified.sh, under 8 minutes).
# Record its output, with the date and the GPU, in docs/gpu.md.
#
#   bash bench/gpu_check.sh            # PYTHON=... to pick the interpreter (default: python3)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rc=0
date -u +"%Y-%m-%dT%H:%M:%SZ"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || rc=1
$PY -c "import torch, faiss; print('torch', torch.__version__, 'CUDA', torch.version.cuda,
'|', torch.cuda.get_device_name(0), '| faiss', faiss.__version__, 'GPUs seen by faiss:', faiss.get_num_gpus())" || exit 1

echo "== pytest -m gpu"
$PY -m pytest -m gpu -rs -q -p no:cacheprovider tests/test_gpu.py tests/test_oracle_gpu.py || rc=1

echo "== dundi train --device cuda (DunDi-AT, mnist-10k, 1 epoch)"
out=$(mktemp -d ./.gpu-check.XXXXXX)  # inside the repository: the log names the run relative to it
time $PY -m dundi train --dataset mnist-10k --backbone lenet5 --adversarial \
    --adv-eps 0.3 --epochs 1 --tuples 20000 --device cuda --no-progress --out "$out/at" --json || rc=1
rm -rf "$out"

echo "== bench/gpu.py (the CLI's defaults: batch 128; then large batches, where a GPU pays)"
$PY bench/gpu.py || rc=1
$PY bench/gpu.py --batch 1024 --tuples 32768 --images 4096 || rc=1

echo "== bench/gpu_certified.sh (CNN7 certified DunDi and softmax IBP on full MNIST, certified)"
time PYTHON=$PY bash bench/gpu_certified.sh || rc=1
exit $rc
