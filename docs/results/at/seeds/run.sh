#!/usr/bin/env bash
# The headline DunDi-AT vs Madry-style LeNet-5 comparison (mnist-10k, AutoAttack on the exact
# two-step rule, L∞ eps 0.3) over training seeds 0, 1 and 2, each model trained again here. The
# published whole-split pair (docs/results/autoattack/whole-split, 2,000 images) costs four
# times the sample's evaluations per model and seed; the spread is measured on one fixed sample of LIMIT test
# images instead (default 500): the same images and the same attack draws for every seed
# (`dundi evaluate --seed 0`), so the rows differ by the training seed alone. Per seed, the
# commands of `STAGES="at autoattack"` with SEED=s (docs/results/reproduce.sh):
#   dundi train-native ... --epochs 40 --adversarial ... --adv-warmup 5      (Madry-style LeNet-5)
#   dundi train ... --tuples 60000 --epochs 6 --adversarial ... --adv-warmup 2 (DunDi-AT, AT5-long)
#   dundi evaluate AT5-long --threat adaptive --attacks autoattack --eps 0.3 --k 5 --limit 500 --seed 0
#   dundi evaluate AT5-long --native madry5 --threat transfer ... (Madry white-box on its logits)
# One torch thread, one step at a time. With LOCK=FILE every step takes `flock FILE` for itself,
# so other long jobs can run between steps. Rerunning continues: a finished step is skipped, an
# interrupted training resumes from its last epoch, an interrupted evaluation from its last shard.
#
#   LOCK=/path/to/lock SEEDS="0 1 2" bash docs/results/at/seeds/run.sh >> runs/at-seeds/run.log 2>&1
#
# Raw files: docs/results/at/seeds/s<seed>/report.json (both models, `dundi report`),
# docs/results/at/seeds/s<seed>/{madry5,AT5-long}-train.json (the run's settings and training
# time) and docs/results/at/seeds/stages.tsv (seconds per step, measured inside the lock).
set -euo pipefail
cd "$(dirname "$0")/../../../.."

OUT=${OUT:-runs/at-seeds}
DOCS=docs/results/at/seeds
SEEDS=${SEEDS:-"0 1 2"}
LIMIT=${LIMIT:-500}
DUNDI=${DUNDI:-dundi}
LOCK=${LOCK:-}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT" "$DOCS"

log() { printf '[at-seeds %(%F %H:%M:%S)T] %s\n' -1 "$*"; }

# step NAME CMD...: run CMD (under the lock if one is given, niced), append NAME and its seconds
# to the stage log; the time excludes the wait for the lock.
step() {
  local name=$1
  shift
  log "start $name"
  local timed=(bash -c 's=$SECONDS; "${@:2}"; rc=$?; [[ $rc == 0 ]] && printf "%s\t%s\n" "$1" $((SECONDS - s)) >> "'"$DOCS"'/stages.tsv"; exit $rc' _ "$name" "$@")
  if [[ -n $LOCK ]]; then flock "$LOCK" nice -n 10 "${timed[@]}"; else nice -n 10 "${timed[@]}"; fi
  log "done $name"
}

# train_json RUN FILE: the run's settings and training time, without machine paths
train_json() {
  python - "$1/run.json" "$2" <<'EOF'
import json, os, sys
meta = json.load(open(sys.argv[1]))
keep = {k: meta[k] for k in ("arch", "config", "dataset", "kind", "num_classes", "embed_dim",
                             "environment", "train_seconds") if k in meta}
tmp = sys.argv[2] + ".tmp"
with open(tmp, "w") as f:
    json.dump(keep, f, indent=1, sort_keys=True)
    f.write("\n")
os.replace(tmp, sys.argv[2])
EOF
}

# oracle_seed RUN: the seed that chose the live oracle index's oracles (empty without an index);
# each seed's index is built with the training seed (`dundi train`'s own index uses seed 0)
oracle_seed() {
  python -c 'import json, sys; print(json.load(open(sys.argv[1])).get("oracle", {}).get("seed", ""))' "$1/run.json"
}

# evaluated DIR: the evaluation in DIR ran to its end before (a marker this script leaves)
evaluated() { [[ -f "$1/.complete" ]]; }

for s in $SEEDS; do
  madry=$OUT/madry5-s$s at=$OUT/AT5-long-s$s
  if [[ ! -f $madry/run.json ]]; then
    step "at-seeds/madry5-s$s" "$DUNDI" train-native --dataset mnist-10k --model lenet5 --epochs 40 \
      --adversarial --adv-eps 0.3 --adv-steps 10 --adv-mix 1.0 --adv-warmup 5 --seed "$s" --no-progress --out "$madry"
  fi
  if [[ ! -f $at/run.json ]]; then
    step "at-seeds/AT5-long-s$s" "$DUNDI" train --dataset mnist-10k --backbone lenet5 --tuples 60000 --epochs 6 \
      --adversarial --adv-eps 0.3 --adv-steps 10 --adv-mix 0.5 --adv-warmup 2 --seed "$s" --no-progress --out "$at"
  fi
  [[ $(oracle_seed "$at") == "$s" ]] || step "at-seeds/AT5-long-s$s index" "$DUNDI" index build "$at" --oracles 20 --seed "$s"
  mkdir -p "$DOCS/s$s"
  train_json "$madry" "$DOCS/s$s/madry5-train.json"
  train_json "$at" "$DOCS/s$s/AT5-long-train.json"
  aa=(--attacks autoattack --eps 0.3 --k 5 --limit "$LIMIT" --seed 0 --workers 0 --threads 1 --no-progress)
  if ! evaluated "$OUT/eval-aa-$LIMIT-AT5-s$s"; then
    step "at-seeds/eval-aa-$LIMIT-AT5-s$s" "$DUNDI" evaluate "$at" --threat adaptive "${aa[@]}" \
      --out "$OUT/eval-aa-$LIMIT-AT5-s$s"
    touch "$OUT/eval-aa-$LIMIT-AT5-s$s/.complete"
  fi
  if ! evaluated "$OUT/eval-aa-$LIMIT-madry5-s$s"; then
    step "at-seeds/eval-aa-$LIMIT-madry5-s$s" "$DUNDI" evaluate "$at" --native "$madry" --threat transfer "${aa[@]}" \
      --out "$OUT/eval-aa-$LIMIT-madry5-s$s"
    touch "$OUT/eval-aa-$LIMIT-madry5-s$s/.complete"
  fi
  "$DUNDI" report "$OUT/eval-aa-$LIMIT-AT5-s$s" "$OUT/eval-aa-$LIMIT-madry5-s$s" --out "$DOCS/s$s"
  log "seed $s: $DOCS/s$s/report.json"
done
log "all seeds done: $SEEDS"
