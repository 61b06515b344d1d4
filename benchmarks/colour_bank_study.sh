#!/usr/bin/env bash
# The paper's world-model protocol on colour: every field of the action varying together,
# bank 256 (and 64), on Shapes, for IWM Equi, IWM Inv and I-JEPA (which has no action, so
# it must sit at chance), 3 seeds, each preset's full recipe (docs/RESULTS.md, "The
# paper's bank on colour"). I-JEPA runs with the Shapes presets' schedule and batch so
# that only the world model differs.
#
#     bash benchmarks/colour_bank_study.sh [RUNS_DIR]          # default runs/colour-bank
#     SEEDS=1 MODELS='equi inv' bash benchmarks/colour_bank_study.sh   # a subset, in order
#
# On a 2-core AMD EPYC (bf16 CPU), per cell: about 29 min of pretraining (3,124 steps
# of iwm-equi-shapes), then 92 s for bank 256, 135 s for bank 64 and 97 s for the API
# check. Seeds run in the outer loop, so a partial study has every model at
# the first seeds. Finished steps are skipped: it can be stopped and started again.
set -u
. "$(dirname "$0")/study_steps.sh"
out=${1:-runs/colour-bank}
ijepa=(data.name=shapes data.image_size=32 train.epochs=4 train.batch_size=64
       optim.warmup_epochs=0.05 'optim.ema=[0.98,1.0]')
for seed in ${SEEDS:-0 1 2}; do
  for model in ${MODELS:-equi inv ijepa}; do
    case $model in
      equi) preset=(iwm-equi-shapes) ;;
      inv) preset=(iwm-inv-shapes) ;;
      ijepa) preset=(ijepa-tiny "${ijepa[@]}") ;;
      *) echo "unknown model '$model': use equi, inv or ijepa" >&2; exit 2 ;;
    esac
    run=$out/$model-s$seed
    # Every checkpoint kept, for the MRR against steps.
    pretrain_once "$run" "${preset[@]}" train.checkpoint_every=625 train.keep_checkpoints=6 \
      train.seed="$seed" || exit 1
    # The paper's protocol (the main bank alone); bank 64 below breaks it down by factor.
    eval_step "$run" mrr_bank256 mrr iwm eval mrr "$run" --bank 256 --images 256 --bf16 \
      --no-per-transform
    eval_step "$run" mrr_bank64 mrr iwm eval mrr "$run" --bank 64 --images 256 --bf16
    eval_step "$run" api_check api_check iwm eval api-check "$run" --bank 64 --images 256 \
      --bf16
  done
done
