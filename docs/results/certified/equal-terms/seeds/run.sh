#!/bin/bash
# Equal terms, seeds 1 and 2 (seed 0 is the page's main table): prototype-head certified DunDi and
# softmax IBP on the same cnn-ibp network, data, batches and schedule; full MNIST, 10 epochs, one
# torch thread each. EPS=0.4 (default) trains for the 0.3 column, EPS=0.15 for the 0.1 column.
# Resumable: a seed whose certificate file exists is skipped. Raw files land beside this script.
#
#   bash docs/results/certified/equal-terms/seeds/run.sh          # then EPS=0.15 bash ...
set -euo pipefail
cd "$(dirname "$0")/../../../../.."
EPS=${EPS:-0.4}
HERE=docs/results/certified/equal-terms/seeds
TAG=$([[ $EPS == 0.4 ]] && echo "" || echo "-eps${EPS/./}")
export OMP_NUM_THREADS=1
for s in 1 2; do
  for kind in proto sm; do
    name=$kind$TAG-s$s R=runs/cert30/seeds/$kind$TAG-s$s
    [[ -s $HERE/$name-certify.json ]] && continue
    flags=(--dataset mnist --certified --cert-eps "$EPS" --cert-warmup 1 --cert-ramp 5 --epochs 10
           --seed $s --no-progress --out "$R")
    if [[ $kind == proto ]]; then
      dundi train --backbone cnn-ibp --cert-head prototypes "${flags[@]}"
      dundi index build "$R" --oracle-kind prototypes
    else
      dundi train-native --model cnn-ibp "${flags[@]}"
    fi
    dundi certify "$R" --eps 0.1 0.2 0.3 --json > "$HERE/$name-certify.tmp"
    mv "$HERE/$name-certify.tmp" "$HERE/$name-certify.json"
    python docs/results/certified/equal-terms/train_facts.py "$R" > "$HERE/$name-train.json"
  done
done
