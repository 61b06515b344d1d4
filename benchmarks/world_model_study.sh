#!/usr/bin/env bash
# Seeing and using the world model on the presets' full recipes (docs/world_model.md):
# per preset and seed, pretrain (bf16), train the latent decoder, and measure it
# (`iwm eval decoder`), action inference with both energies (`iwm eval infer-action
# --energy direct|residual`), the MRR (bank 64 and the paper's 256) and the API check.
# Results are copied to RUN/eval/.
#
#     bash benchmarks/world_model_study.sh [RUNS_DIR]                 # default runs/full
#     PRESETS=iwm-equi-shapes SEEDS='1 2' bash benchmarks/world_model_study.sh
#
# On 2 free cores (bf16 CPU): pretraining about 30 min (iwm-equi-tiny) or 25 min
# (iwm-equi-shapes), then about 12 min of decoder and evaluation per cell. Finished
# steps are skipped, so it can be stopped and started again.
set -u
. "$(dirname "$0")/study_steps.sh"
out=${1:-runs/full}
for preset in ${PRESETS:-iwm-equi-tiny iwm-equi-shapes}; do
  for seed in ${SEEDS:-0 1 2}; do
    run=$out/$preset-s$seed
    pretrain_once "$run" "$preset" train.checkpoint_every=500 train.seed="$seed" || exit 1
    [ -f "$run/decoder/decoder.json" ] || iwm decoder "$run" || exit 1
    eval_step "$run" decoder decoder iwm eval decoder "$run" --images 512
    for energy in direct residual; do
      eval_step "$run" "infer_action_$energy" infer_action iwm eval infer-action "$run" \
        --images 256 --bf16 --energy "$energy"
    done
    eval_step "$run" mrr mrr iwm eval mrr "$run" --bank 64 --images 256 --bf16
    # The paper's protocol: every field of the action varying together, bank 256.
    eval_step "$run" mrr_bank256 mrr iwm eval mrr "$run" --bank 256 --images 256 --bf16
    eval_step "$run" api_check api_check iwm eval api-check "$run" --bank 64 --images 256 \
      --bf16
  done
done
