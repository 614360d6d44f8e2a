#!/usr/bin/env bash
# Enrollment without retraining: train DunDi_R on 8 of the 10 classes of mnist-10k and of
# Fashion-MNIST (2 held out, drawn with --seed 0: classes 6 and 7 for both) and each run's
# 10-class twin, and DunDi-AT on the same 8 mnist-10k classes (its 10-class twin is the AT5 run
# of docs/results/at, same settings) and certified DunDi on them (its twin: docs/results/certified's
# run); then enroll the held-out classes from 1, 10 and 20 train
# images each and print the table of docs/results/enrollment/README.md (bench/enrollment.py).
#
#   docs/results/enrollment/run.sh            # RUNS=runs/enroll OUT=runs/enrollment
#
# A finished run is skipped, an interrupted one resumes from its checkpoint, and the attack
# evaluations resume from their finished shards.
set -euo pipefail
RUNS=${RUNS:-runs/enroll}
OUT=${OUT:-runs/enrollment}
AT10=${AT10:-runs/at/AT5}
CERT10=${CERT10:-runs/results/cert/mnist-C}
DUNDI=${DUNDI:-dundi}
mkdir -p "$RUNS"

train() {
    local out=$1; shift
    if [ -f "$RUNS/$out/run.json" ] && [ -d "$RUNS/$out/oracle" ]; then echo "have $RUNS/$out"; return; fi
    echo "training $RUNS/$out"
    nice -n 10 "$DUNDI" train "$@" --seed 0 --no-progress --out "$RUNS/$out" > "$RUNS/$out.log" 2>&1
}
train mnist-R8    --dataset mnist-10k --backbone lenet5 --holdout-random 2
train mnist-R10   --dataset mnist-10k --backbone lenet5
train fashion-R8  --dataset fashion-mnist --backbone lenet5 --holdout-random 2
train fashion-R10 --dataset fashion-mnist --backbone lenet5
train mnist-AT8   --dataset mnist-10k --backbone lenet5 --holdout-random 2 \
                  --adversarial --adv-eps 0.3 --adv-warmup 2 --epochs 6
CERT="--backbone cnn-ibp --certified --cert-eps 0.35 --epochs 60"   # docs/results/certified's settings
train mnist-C8    --dataset mnist-10k $CERT --holdout-random 2
if [ ! -f "$CERT10/run.json" ]; then
    train C10 --dataset mnist-10k $CERT
    CERT10=$RUNS/C10
fi
if [ ! -f "$AT10/run.json" ]; then
    train AT10 --dataset mnist-10k --backbone lenet5 --adversarial --adv-eps 0.3 --adv-warmup 2 --epochs 6
    AT10=$RUNS/AT10
fi

nice -n 10 python bench/enrollment.py --runs "$RUNS" --at10 "$AT10" --cert10 "$CERT10" --out "$OUT" \
    --robust --certified --json
