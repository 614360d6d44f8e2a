#!/usr/bin/env bash
# Reproduce the paper's section 4 (and DunDi-AT) on the data reachable here, with the
# product's own commands only, and regenerate the reports in docs/results/.
#
#   make results                      # everything (about 10 h on 2 CPU cores; 2-3 h without
#                                     # the mnist-full, certified-full and at-full stages)
#   STAGES="mnist report" make results
#
# Stages: mnist (Table 1, Fig. 6, Table 2, Fig. 7 + adaptive/feature on mnist-10k), fashion
# (one native model and its DunDi_R / DunDi_P on full Fashion-MNIST), cifar (VGG-16, only when
# CIFAR-10's files are present), at (DunDi-AT vs Madry-style adversarial training), autoattack
# (AutoAttack on the exact two-step rule: DunDi-AT vs Madry on the same images), certified
# (certified DunDi: training, dundi certify, AutoAttack on the certified run), mnist-full
# (Table 1 and the paper's transfer protocol on full MNIST, 60,000/10,000, per model and with
# one shared source), certified-full
# (certified DunDi on full MNIST, the whole 10,000-image test set), at-full (DunDi-AT vs a
# Madry-style LeNet-5 on full MNIST under AutoAttack on the exact rule), report.
#
# Rerunning continues: a training stage whose run directory is complete is skipped and every
# evaluation resumes from its finished shards. Runs and raw Parquet rows go to $OUT
# (runs/results); the reports (Markdown, PNG, JSON summaries) go to $DOCS (docs/results).
set -euo pipefail

OUT=${OUT:-runs/results}
DOCS=${DOCS:-docs/results}
STAGES=${STAGES:-"mnist fashion cifar at autoattack certified mnist-full certified-full at-full report"}
LIMIT=${LIMIT:-500}          # test samples per evaluation (a seeded random choice, same for every model)
SEED=${SEED:-0}
DUNDI=${DUNDI:-dundi}
EVAL=(--workers "${EVAL_WORKERS:-0}" --limit "$LIMIT" --seed "$SEED" --no-progress)
mkdir -p "$OUT" "$DOCS"
STAGE_LOG="$OUT/stages.tsv"

log() { printf '[reproduce %(%H:%M:%S)T] %s\n' -1 "$*"; }

# timed NAME CMD...: run CMD, append "NAME<TAB>seconds" to the stage log.
timed() {
  local name=$1 start=$SECONDS
  shift
  log "$name"
  "$@"
  printf '%s\t%s\n' "$name" "$((SECONDS - start))" >> "$STAGE_LOG"
}

# indexed DIR: DIR is a finished DunDi run with a live oracle index (run.json records it; the
# index files live in versioned folders, oracle/v<N>/)
indexed() { [[ -f "$1/run.json" ]] && grep -q '"oracle": {' "$1/run.json"; }

# train DIR CMD...: run a `dundi train*` command unless DIR already holds a finished run.
train() {
  local dir=$1
  shift
  if [[ -f "$dir/run.json" ]]; then
    log "kept $dir (finished before)"
    [[ "$1" == "train" ]] && ! indexed "$dir" && "$DUNDI" index build "$dir" --oracles 20 --seed "$SEED"
    return 0
  fi
  timed "$dir" "$DUNDI" "$@" --out "$dir" --seed "$SEED" --no-progress
}

# evaluate DUNDI_RUN NATIVE_RUN OUT_DIR [extra args]: the paper's four attacks under all three
# threat models at the paper's budgets, then PGD robust accuracy vs eps (CE and margin).
evaluate() {
  local run=$1 native=$2 dir=$3 curve=$4
  shift 4
  local threats=(--threat transfer adaptive feature)
  timed "$dir paper-attacks" "$DUNDI" evaluate "$run" --native "$native" "${threats[@]}" \
    --attacks paper "$@" "${EVAL[@]}" --out "$dir"
  for loss in ce margin; do
    timed "$dir pgd-$loss" "$DUNDI" evaluate "$run" --native "$native" "${threats[@]}" \
      --attacks pgd --eps $curve --steps 40 --attack-arg loss=$loss "${EVAL[@]}" --out "$dir"
  done
}

# table1 DOCS_FILE RUN...: accuracy on the whole test split, natives once, DunDi runs at n = 1, 10, 20
# (the evaluations' Table 1 covers only their $LIMIT samples). One JSON object per line.
table1() {
  local file=$1 run
  shift
  mkdir -p "$(dirname "$file")"
  : > "$file.tmp"
  for run in "$@"; do
    if grep -q '"kind": "native"' "$run/run.json"; then
      "$DUNDI" classify "$run" --json | tail -n 1 >> "$file.tmp"
    else
      for n in 1 10 20; do "$DUNDI" classify "$run" --n "$n" --json | tail -n 1 >> "$file.tmp"; done
    fi
  done
  mv "$file.tmp" "$file"
}

# ---- mnist-10k: the paper's MNIST experiments ---------------------------------------------
stage_mnist() {
  local d=$OUT/mnist-10k
  "$DUNDI" data fetch mnist-10k
  for i in 1 4 5; do
    train "$d/native$i" train-native --dataset mnist-10k --model "lenet$i" --epochs 10
    train "$d/R$i" train --dataset mnist-10k --backbone "lenet$i" --tuples 360000 --epochs 1
    train "$d/P$i" train --dataset mnist-10k --backbone "lenet$i" --pretrained "$d/native$i" \
      --tuples 360000 --epochs 1
  done
  for t in 18000 36000 180000; do  # Table 2: DunDi_R1 vs the number of tuples (360K is R1)
    train "$d/R1-tuples$t" train --dataset mnist-10k --backbone lenet1 --tuples "$t" --epochs 1
  done
  table1 "$DOCS/mnist-10k/table1_full_test.jsonl" "$d"/native{1,4,5} "$d"/{R,P}{1,4,5} "$d"/R1-tuples*
  for i in 1 4 5; do
    for kind in R P; do
      evaluate "$d/$kind$i" "$d/native$i" "$d/eval/$kind$i" "0.05 0.1 0.2 0.3"
    done
  done
  for t in 18000 36000 180000; do
    evaluate "$d/R1-tuples$t" "$d/native1" "$d/eval/R1-tuples$t" "0.05 0.1 0.2 0.3"
  done
}

# ---- full MNIST (60,000 / 10,000; offline from the Python package registry) -----------------
# The paper's Table 1 on the paper's data: LeNet-1/4/5 natives, DunDi_R and DunDi_P, whole test
# set at n = 1, 10, 20; then the paper's transfer protocol (its four attacks crafted on the
# native LeNet) on $LIMIT seeded test images.
stage_mnist-full() {
  local d=$OUT/mnist
  "$DUNDI" data fetch mnist
  for i in 1 4 5; do
    train "$d/native$i" train-native --dataset mnist --model "lenet$i" --epochs "${NATIVE_EPOCHS:-10}"
    train "$d/R$i" train --dataset mnist --backbone "lenet$i" --tuples 360000 --epochs 1
    train "$d/P$i" train --dataset mnist --backbone "lenet$i" --pretrained "$d/native$i" \
      --tuples 360000 --epochs 1
  done
  table1 "$DOCS/mnist/table1_full_test.jsonl" "$d"/native{1,4,5} "$d"/{R,P}{1,4,5}
  for i in 1 4 5; do
    for kind in R P; do
      timed "$d/eval/$kind$i paper-attacks" "$DUNDI" evaluate "$d/$kind$i" --native "$d/native$i" \
        --threat transfer --attacks paper "${EVAL[@]}" --out "$d/eval/$kind$i"
    done
  done
  # The shared-source protocol: the four attacks crafted once on Feinman et al.'s CNN (the code
  # the paper cites crafts on it), every model above scored on the same 2,000 images.
  train "$d/feinman" train-native --dataset mnist --model feinman-cnn --epochs 3
  timed "$d/shared-source" "$DUNDI" transfer "$d/feinman" --targets "$d"/{R,P}{1,4,5} "$d"/native{1,4,5} \
    --attacks paper --limit 2000 --seed "$SEED" --out "$d/shared-source"
  mkdir -p "$DOCS/mnist/shared-source"
  cp "$d/shared-source/transfer.json" "$DOCS/mnist/shared-source/transfer.json"
}

# ---- certified DunDi on full MNIST: whole 10,000-image test set, deployed rule n=20 m=3 k=5 ----
stage_certified-full() {
  local c=$OUT/cert docs=$DOCS/certified
  mkdir -p "$docs"
  train "$c/mnist-full-C40" train --dataset mnist --backbone cnn-ibp --certified --cert-eps 0.4 \
    --cert-warmup 1 --cert-ramp 20 --epochs 40
  timed "$c/mnist-full-C40 certify" "$DUNDI" certify "$c/mnist-full-C40" \
    --eps 0.05 0.1 0.15 0.2 0.25 0.3 0.35 0.4 --json | tail -n 1 > "$docs/mnist-full-certify.json"
}

# ---- full Fashion-MNIST: LeNet-5, eps scaled to 0.1 as is usual for this dataset ------------
stage_fashion() {
  local d=$OUT/fashion-mnist
  "$DUNDI" data fetch fashion-mnist
  train "$d/native5" train-native --dataset fashion-mnist --model lenet5 --epochs 10
  train "$d/R5" train --dataset fashion-mnist --backbone lenet5 --tuples 360000 --epochs 1
  train "$d/P5" train --dataset fashion-mnist --backbone lenet5 --pretrained "$d/native5" \
    --tuples 360000 --epochs 1
  table1 "$DOCS/fashion-mnist/table1_full_test.jsonl" "$d/native5" "$d/R5" "$d/P5"
  for kind in R P; do
    evaluate "$d/$kind"5 "$d/native5" "$d/eval/${kind}5" "0.025 0.05 0.1 0.2" --eps 0.1
  done
}

# ---- CIFAR-10 (VGG-16): runs only where the files are ---------------------------------------
stage_cifar() {
  local d=$OUT/cifar10
  if ! "$DUNDI" data fetch cifar10 ${CIFAR10_DIR:+--source-dir "$CIFAR10_DIR"}; then
    log "CIFAR-10 is not present (set CIFAR10_DIR to the python-version batches): skipped"
    printf 'cifar10\tskipped: no CIFAR-10 files\n' >> "$STAGE_LOG"
    return 0
  fi
  train "$d/native" train-native --dataset cifar10 --model vgg16 --epochs 20
  train "$d/R" train --dataset cifar10 --backbone vgg16 --tuples 360000 --epochs 1
  train "$d/P" train --dataset cifar10 --backbone vgg16 --pretrained "$d/native" --tuples 360000 --epochs 1
  table1 "$DOCS/cifar10/table1_full_test.jsonl" "$d/native" "$d/R" "$d/P"
  for kind in R P; do
    evaluate "$d/$kind" "$d/native" "$d/eval/$kind" "0.01 0.02 0.05"
  done
}

# ---- DunDi-AT vs Madry-style adversarial training (mnist-10k, eps 0.3) ----------------------
stage_at() {
  local d=$OUT/mnist-10k at=$OUT/at
  "$DUNDI" data fetch mnist-10k
  [[ -f "$d/native5/run.json" ]] || train "$d/native5" train-native --dataset mnist-10k --model lenet5 --epochs 10
  train "$at/madry5" train-native --dataset mnist-10k --model lenet5 --epochs 40 \
    --adversarial --adv-eps 0.3 --adv-steps 10 --adv-mix 1.0 --adv-warmup 5
  # DunDi-AT at two budgets: 6 epochs over 30K tuples (AT5) and over 60K tuples (AT5-long)
  train "$at/AT5" train --dataset mnist-10k --backbone lenet5 --tuples 30000 --epochs 6 \
    --adversarial --adv-eps 0.3 --adv-steps 10 --adv-mix 0.5 --adv-warmup 2
  train "$at/AT5-long" train --dataset mnist-10k --backbone lenet5 --tuples 60000 --epochs 6 \
    --adversarial --adv-eps 0.3 --adv-steps 10 --adv-mix 0.5 --adv-warmup 2
  # One evaluation per model on the same samples: the strongest white-box attacks we have
  # (PGD 100 steps x 5 restarts, CE and margin; PGD 1,000 steps), a black-box check (Square,
  # 2,000 queries) and the robust-accuracy curve. The Madry model is the native run of its own
  # evaluation (subject AT5), so its white-box robust accuracy is the transfer rows' native column.
  local subject run native threats loss
  for subject in AT5 AT5-long madry5; do
    run=$at/$subject native=$d/native5 threats=(--threat adaptive feature)
    if [[ $subject == madry5 ]]; then
      run=$at/AT5 native=$at/madry5 threats=(--threat transfer)
    fi
    for loss in ce margin; do
      timed "$at/eval/$subject pgd100x5-$loss" "$DUNDI" evaluate "$run" --native "$native" "${threats[@]}" \
        --attacks pgd --eps 0.3 --steps 100 --attack-arg restarts=5 --attack-arg loss=$loss \
        "${EVAL[@]}" --out "$at/eval/$subject"
    done
    timed "$at/eval/$subject pgd-curve" "$DUNDI" evaluate "$run" --native "$native" "${threats[@]}" \
      --attacks pgd --eps 0.1 0.2 0.3 0.4 --steps 40 "${EVAL[@]}" --out "$at/eval/$subject"
    timed "$at/eval/$subject pgd1000" "$DUNDI" evaluate "$run" --native "$native" "${threats[@]}" \
      --attacks pgd --eps 0.3 --steps 1000 --attack-arg alpha=0.01 --attack-arg loss=margin \
      "${EVAL[@]}" --out "$at/eval/$subject"
    timed "$at/eval/$subject square" "$DUNDI" evaluate "$run" --native "$native" "${threats[@]}" \
      --attacks square --eps 0.3 --steps 2000 "${EVAL[@]}" --out "$at/eval/$subject"
    if [[ $subject != madry5 ]]; then  # the paper's transfer protocol: crafted on the plain native LeNet-5
      timed "$at/eval/$subject paper-attacks" "$DUNDI" evaluate "$run" --native "$d/native5" \
        --threat transfer --attacks paper "${EVAL[@]}" --out "$at/eval/$subject"
    fi
  done
}

# ---- AutoAttack on the exact rule (k = 5): the headline robustness figures ----------------------
# One evaluation holds both models on the same images: DunDi-AT (the README's recipe, AT5-long)
# under `adaptive` (the stand-in whose argmax is Algorithm 1, plus the step-1 attack), and the
# Madry-style model as the native run, attacked white-box on its own logits under `transfer`
# (its robust accuracy is the native column of those rows). AA_LIMIT test images (default: all).
stage_autoattack() {
  local d=$OUT/mnist-10k at=$OUT/at aa=$OUT/at/eval-autoattack
  local aa_eval=(--workers "${EVAL_WORKERS:-0}" --limit "${AA_LIMIT:-2000}" --seed "$SEED" --no-progress)
  indexed "$at/AT5-long" && [[ -f "$at/madry5/run.json" ]] || stage_at
  timed "$aa/AT5-long+madry5 autoattack" "$DUNDI" evaluate "$at/AT5-long" --native "$at/madry5" \
    --threat adaptive transfer --attacks autoattack --eps 0.3 --k 5 "${aa_eval[@]}" --out "$aa/AT5-long+madry5"
  for plain in R5 P5; do  # plain DunDi_R3 / DunDi_P3: one line each
    indexed "$d/$plain" || continue
    timed "$aa/$plain autoattack" "$DUNDI" evaluate "$d/$plain" --native "$d/native5" --threat adaptive \
      --attacks autoattack --eps 0.3 --k 5 "${aa_eval[@]}" --out "$aa/$plain"
  done
}

# ---- DunDi-AT vs Madry-style adversarial training on full MNIST, AutoAttack on the exact rule ----
# The README's DunDi-AT recipe (AT5-long) and a Madry-style LeNet-5 trained on the 54,000 full-MNIST
# training images, then one AutoAttack evaluation holding both on the same AA_FULL_LIMIT test images.
stage_at-full() {
  local d=$OUT/mnist at=$OUT/at-full
  "$DUNDI" data fetch mnist
  train "$at/madry5" train-native --dataset mnist --model lenet5 --epochs "${MADRY_EPOCHS:-15}" \
    --adversarial --adv-eps 0.3 --adv-steps 10 --adv-mix 1.0 --adv-warmup 3
  train "$at/AT5-long" train --dataset mnist --backbone lenet5 --tuples 60000 --epochs 6 \
    --adversarial --adv-eps 0.3 --adv-steps 10 --adv-mix 0.5 --adv-warmup 2
  timed "$at/eval-autoattack AT5-long+madry5" "$DUNDI" evaluate "$at/AT5-long" --native "$at/madry5" \
    --threat adaptive transfer --attacks autoattack --eps 0.3 --k 5 --workers "${EVAL_WORKERS:-0}" \
    --limit "${AA_FULL_LIMIT:-2000}" --seed "$SEED" --no-progress --out "$at/eval-autoattack"
}

# ---- Certified DunDi (interval-bound training, the two-step certificate) -------------------
stage_certified() {
  local c=$OUT/cert at=$OUT/at docs=$DOCS/certified
  mkdir -p "$docs"
  train "$c/mnist-C" train --dataset mnist-10k --backbone cnn-ibp --certified --cert-eps 0.35 --epochs 60
  "$DUNDI" certify "$c/mnist-C" --eps 0.1 0.2 0.3 --json | tail -n 1 > "$docs/mnist-10k-certify.json"
  # the strongest attacks on the exact rule, on samples certified or not, beside Madry's model
  [[ -f "$at/madry5/run.json" ]] || stage_at
  timed "$c/eval-autoattack" "$DUNDI" evaluate "$c/mnist-C" --native "$at/madry5" --threat adaptive transfer \
    --attacks autoattack --eps 0.3 --k 5 --workers "${EVAL_WORKERS:-0}" --limit "${CERT_AA_LIMIT:-300}" \
    --seed "$SEED" --no-progress --out "$c/eval-autoattack"
  # the whole 2,000-image test split under the same cascade, on every CPU (27 min on 2 cores)
  timed "$c/eval-aa-whole" "$DUNDI" evaluate "$c/mnist-C" --threat adaptive --attacks autoattack --eps 0.3 \
    --k 5 --limit all --seed "$SEED" --no-progress --out "$c/eval-aa-whole"
  train "$c/fashion-C" train --dataset fashion-mnist --backbone cnn-ibp --certified --cert-eps 0.12 \
    --epochs 15 --cert-warmup 1 --cert-ramp 7
  "$DUNDI" certify "$c/fashion-C" --eps 0.1 --json | tail -n 1 > "$docs/fashion-mnist-certify.json"
}

stage_report() {
  local d=$OUT/mnist-10k f=$OUT/fashion-mnist at=$OUT/at
  [[ -d $d/eval ]] && "$DUNDI" report "$d"/eval/{R1,R4,R5,P1,P4,P5,R1-tuples*} --out "$DOCS/mnist-10k"
  [[ -d $f/eval ]] && "$DUNDI" report "$f"/eval/* --out "$DOCS/fashion-mnist"
  [[ -d $OUT/mnist/eval ]] && "$DUNDI" report "$OUT"/mnist/eval/* --out "$DOCS/mnist"
  [[ -d $OUT/cifar10/eval ]] && "$DUNDI" report "$OUT"/cifar10/eval/* --out "$DOCS/cifar10"
  [[ -d $at/eval ]] && "$DUNDI" report "$at"/eval/{AT5,AT5-long,madry5} "$d/eval/R5" --out "$DOCS/at"
  [[ -d $at/eval-autoattack ]] && "$DUNDI" report "$at"/eval-autoattack/* --out "$DOCS/autoattack"
  [[ -d $OUT/cert/eval-autoattack ]] && "$DUNDI" report "$OUT/cert/eval-autoattack" --out "$DOCS/certified"
  [[ -d $OUT/cert/eval-aa-whole ]] && "$DUNDI" report "$OUT/cert/eval-aa-whole" --out "$DOCS/certified/whole-split"
  [[ -d $OUT/at-full/eval-autoattack ]] && "$DUNDI" report "$OUT/at-full/eval-autoattack" --out "$DOCS/at-full"
  cp "$STAGE_LOG" "$DOCS/stages.tsv"
  {
    echo "date: $(date -u +%FT%TZ)"
    echo "python: $(python -c 'import sys; print(sys.version.split()[0])')"
    python - <<'EOF'
from importlib.metadata import version
for p in ("dundi", "torch", "ray", "faiss-cpu", "numpy", "pyarrow"):
    try:
        print(f"{p}: {version(p)}")
    except Exception:
        print(f"{p}: not installed")
EOF
    echo "cpu: $(nproc) cores; torch threads $(python -c 'import torch; print(torch.get_num_threads())')"
    echo "seed: $SEED for every model's training and every evaluation's sample (one training seed per model)"
    echo "Table 1 (*/table1_full_test.jsonl) and \`dundi certify\` (*-certify.json): the whole test split."
    # what each committed evaluation used, read from its report.json (checked by the figures test)
    python -m dundi.evaluation.figures.samples
  } > "$DOCS/environment.txt"
  # the published tables (README.md, docs/results/**/README.md) from the reports just written
  if [[ "$DOCS" == docs/results ]]; then python -m dundi.evaluation.figures; fi
}

for stage in $STAGES; do
  "stage_$stage"
done
log "done: reports in $DOCS, runs and raw rows in $OUT"
