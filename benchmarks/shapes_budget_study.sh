#!/usr/bin/env bash
# How far the Shapes world model is from the paper's bank-256 MRR (0.79-0.85), and what
# moves it: the iwm-equi-shapes recipe (4 epochs, 0.477 on seed 0) against one change at
# a time, scored with the paper's protocol (bank 256, every field varying together) on
# every kept checkpoint, so that each cell also gives MRR against steps
# (docs/RESULTS.md, "The paper's bank on colour").
#
#     bash benchmarks/shapes_budget_study.sh [RUNS_DIR]     # default runs/shapes-budget
#     CELLS=sjp SEEDS='0 1' bash benchmarks/shapes_budget_study.sh
#
# Cells: sjp = half the sources clean (views.source_jitter_p=0.5, what lifted the
# Fashion-MNIST presets' API check), 4 epochs; long = 8 epochs (the schedule stretched,
# not continued), the preset's source jitter unless LONG_SJP sets
# views.source_jitter_p (the 2026-12-04 run had LONG_SJP=0.0: every source clean). On
# a 2-core AMD EPYC (bf16 CPU), 16-29 min of pretraining per 4 epochs (by machine) and
# 50 s per checkpoint scored on 128 images. Finished steps are skipped.
set -u
. "$(dirname "$0")/study_steps.sh"
out=${1:-runs/shapes-budget}
for seed in ${SEEDS:-0}; do
  for cell in ${CELLS:-sjp long}; do
    case $cell in
      sjp) args=(views.source_jitter_p=0.5 train.checkpoint_every=625) ;;
      long) args=(train.epochs=8 train.checkpoint_every=1250
                  ${LONG_SJP:+views.source_jitter_p=$LONG_SJP}) ;;
      *) echo "unknown cell '$cell': use sjp or long" >&2; exit 2 ;;
    esac
    run=$out/$cell-s$seed
    pretrain_once "$run" iwm-equi-shapes "${args[@]}" train.keep_checkpoints=6 \
      train.seed="$seed" || exit 1
    for ckpt in "$run"/checkpoints/step_*.pt; do
      step=$(basename "$ckpt" .pt)
      eval_step "$run" "mrr_bank256_$step" "mrr_$step" iwm eval mrr "$ckpt" --bank 256 \
        --images 128 --bf16 --no-per-transform
    done
    eval_step "$run" mrr_bank256 mrr iwm eval mrr "$run" --bank 256 --images 256 --bf16 \
      --no-per-transform
    eval_step "$run" mrr_bank64 mrr iwm eval mrr "$run" --bank 64 --images 256 --bf16
  done
done
