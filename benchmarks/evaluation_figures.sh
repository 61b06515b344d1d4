#!/usr/bin/env bash
# The evaluation figures of docs/RESULTS.md: MRR for conditioning none / sequence /
# feature, and the four finetuning protocols on the feature-conditioned run.
# Fashion-MNIST, preset iwm-equi-tiny shortened to fit a CPU session. Usage:
#   bash benchmarks/evaluation_figures.sh [OUT_DIR] [SEED]
set -euo pipefail
out=${1:-runs/figures}
seed=${2:-0}
iwm=${IWM:-iwm}
short=(train.epochs=0.5 train.batch_size=128 optim.warmup_epochs=0.1 "optim.ema=[0.98,1.0]"
       train.seed=$seed train.progress=false)
for cond in none sequence feature; do
  run=$out/equi-$cond-s$seed
  [ -f "$run/results/mrr.json" ] && continue
  $iwm pretrain iwm-equi-tiny model.conditioning=$cond "${short[@]}" --run-dir "$run"
  $iwm eval mrr "$run" --images 128 --bank 64 --seed "$seed"
done
ft=(finetune.epochs=2 finetune.train_limit=5000 finetune.test_limit=2000 finetune.seed=$seed)
for protocol in encoder random-predictor predictor end-to-end; do
  run=$out/equi-feature-s$seed
  [ -f "$run/results/finetune_$protocol.json" ] && continue
  $iwm finetune "$run" --protocol $protocol "${ft[@]}"
done
