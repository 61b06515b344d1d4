#!/usr/bin/env bash
# Follow-ups to the cpu grid (docs/RESULTS.md, "Reproducing the paper's findings"): is a
# finding that does not hold a matter of budget or of hyperparameters?
#   bash benchmarks/paper/followup.sh STUDY_DIR OUT_DIR
# A: the invariant cell pretrained 7.5x longer (3 epochs instead of 0.4), linear probe.
# B: predictor finetuning of grid runs with the pretrained predictor at the random one's
#    learning rate (finetune.predictor_lr_scale=1 instead of the paper's 0.1).
set -euo pipefail
study=${1:-runs/study-cpu}
out=${2:-runs/followup}
iwm=${IWM:-iwm}
cpu=(model.predictor_width=64 model.predictor_heads=2 train.batch_size=128
     optim.warmup_epochs=0.1 "optim.ema=[0.98,1.0]" train.checkpoint_every=200
     train.log_every=50 train.progress=false)
ft=(finetune.epochs=2 finetune.train_limit=4000 finetune.test_limit=2000
    finetune.batch_size=64 finetune.lr=3.0e-3 finetune.seed=0)

# long RUN_NAME DEPTH STRENGTH: a feature-conditioned cell pretrained for 3 epochs (seed 0),
# then the grid's evaluations.
long() {
  local run=$out/$1
  if [ ! -f "$run/results/probe_linear.json" ]; then
    [ -d "$run/checkpoints" ] || $iwm pretrain iwm-equi-tiny "${cpu[@]}" train.epochs=3 \
        model.conditioning=feature model.predictor_depth="$2" views.strength="$3" \
        train.seed=0 --run-dir "$run"
    $iwm probe "$run" probe.train_limit=8000 probe.test_limit=4000
  fi
  [ -f "$run/results/mrr.json" ] || $iwm eval mrr "$run" --images 128 --bank 64 --seed 0
  for protocol in predictor random-predictor; do
    [ -f "$run/results/finetune_$protocol.json" ] || \
        $iwm finetune "$run" --protocol $protocol "${ft[@]}"
  done
}
long feature-shallow-jitter-e3-s0 2 jitter
# A': the equivariant cell at the same 3 epochs, for finding 3 at that budget.
long feature-deep-strong-e3-s0 6 strong

for cell in feature-shallow-jitter feature-deep-strong; do
  copy=$out/$cell-s0-lr1
  [ -d "$copy" ] || { mkdir -p "$copy"; cp -r "$study/runs/$cell-s0/config.yaml" \
      "$study/runs/$cell-s0/checkpoints" "$copy/"; }
  [ -f "$copy/results/finetune_predictor.json" ] || \
      $iwm finetune "$copy" --protocol predictor "${ft[@]}" finetune.predictor_lr_scale=1.0
done
