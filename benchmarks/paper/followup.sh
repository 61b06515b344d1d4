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

long=$out/feature-shallow-jitter-e3-s0
if [ ! -f "$long/results/probe_linear.json" ]; then
  [ -d "$long/checkpoints" ] || $iwm pretrain iwm-equi-tiny "${cpu[@]}" train.epochs=3 \
      model.conditioning=feature model.predictor_depth=2 views.strength=jitter train.seed=0 \
      --run-dir "$long"
  $iwm probe "$long" probe.train_limit=8000 probe.test_limit=4000
fi
[ -f "$long/results/mrr.json" ] || $iwm eval mrr "$long" --images 128 --bank 64 --seed 0
for protocol in predictor random-predictor; do
  [ -f "$long/results/finetune_$protocol.json" ] || \
      $iwm finetune "$long" --protocol $protocol "${ft[@]}"
done

# A': the equivariant cell at the same 3 epochs, for finding 3 at that budget.
equi=$out/feature-deep-strong-e3-s0
if [ ! -f "$equi/results/probe_linear.json" ]; then
  [ -d "$equi/checkpoints" ] || $iwm pretrain iwm-equi-tiny "${cpu[@]}" train.epochs=3 \
      model.conditioning=feature model.predictor_depth=6 views.strength=strong train.seed=0 \
      --run-dir "$equi"
  $iwm probe "$equi" probe.train_limit=8000 probe.test_limit=4000
fi
[ -f "$equi/results/mrr.json" ] || $iwm eval mrr "$equi" --images 128 --bank 64 --seed 0
for protocol in predictor random-predictor; do
  [ -f "$equi/results/finetune_$protocol.json" ] || \
      $iwm finetune "$equi" --protocol $protocol "${ft[@]}"
done

for cell in feature-shallow-jitter feature-deep-strong; do
  copy=$out/$cell-s0-lr1
  [ -d "$copy" ] || { mkdir -p "$copy"; cp -r "$study/runs/$cell-s0/config.yaml" \
      "$study/runs/$cell-s0/checkpoints" "$copy/"; }
  [ -f "$copy/results/finetune_predictor.json" ] || \
      $iwm finetune "$copy" --protocol predictor "${ft[@]}" finetune.predictor_lr_scale=1.0
done
