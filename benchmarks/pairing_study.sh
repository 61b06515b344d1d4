#!/usr/bin/env bash
# Training pairs whose action explains them: views.pairing=independent (before) against
# relative (after), on the demo's own recipe, 3 seeds, each scored by the MRR under the old
# protocol (first block, ties ranked), the new one (union of blocks, unseeable entries
# tied to the truth) and the API check (docs/RESULTS.md, "Pairs the action explains").
#
#     bash benchmarks/pairing_study.sh [RUNS_DIR]        # default runs/pairing
#     SEEDS='1 2' PAIRINGS=relative bash benchmarks/pairing_study.sh   # a subset, in order
#
# About 4 min of training and 3 min of evaluation per cell on 2 free cores (bf16 CPU).
# Finished cells are skipped, so it can be stopped and started again.
set -u
out=${1:-runs/pairing}
demo=(train.batch_size=64 optim.warmup_epochs=0.1 'optim.ema=[0.98,1.0]'
      train.checkpoint_every=500 train.epochs=1.5 train.precision=bf16 train.progress=false)
for pairing in ${PAIRINGS:-independent relative}; do
  for seed in ${SEEDS:-0 1 2}; do
    run=$out/$pairing-s$seed
    if [ ! -f "$run/results/api_check.json" ]; then
      if [ -d "$run/checkpoints" ]; then resume=--resume; else resume=; fi
      iwm pretrain iwm-equi-tiny "${demo[@]}" views.pairing=$pairing train.seed=$seed \
        --run-dir "$run" $resume || exit 1
    fi
    mkdir -p "$run/eval"
    for protocol in "first rank" "union rank" "union truth"; do
      set -- $protocol
      json=$run/eval/mrr_$1_$2.json
      [ -f "$json" ] && continue
      iwm eval mrr "$run" --bank 64 --images 256 --blocks "$1" --ties "$2" > "$run/eval/mrr_$1_$2.txt" &&
        cp "$run/results/mrr.json" "$json"
    done
    [ -f "$run/eval/api_check.json" ] ||
      { iwm eval api-check "$run" --bank 64 --images 256 > "$run/eval/api_check.txt" &&
        cp "$run/results/api_check.json" "$run/eval/api_check.json"; }
  done
done
