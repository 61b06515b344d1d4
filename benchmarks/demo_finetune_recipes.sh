#!/usr/bin/env bash
# The one-epoch finetuning recipes tried for the demo's "reusing the world model" step
# (docs/RESULTS.md, "The demo reuses its world model"): each on the demo's own run, on the
# linear probe's 10,000 train / 5,000 test images, one epoch of batch 64 (156 steps).
#
#     bash benchmarks/demo_finetune_recipes.sh RUN [OUT]      # default runs/demo-ft
#     RECIPES='linear linear-random' bash benchmarks/demo_finetune_recipes.sh RUN
#
# Each result is copied to OUT/<recipe>.json (RUN/results keeps the last of a protocol);
# finished recipes are skipped. About 65 s each on 2 cores, evaluation included.
set -u
run=${1:?usage: demo_finetune_recipes.sh RUN [OUT]}
out=${2:-runs/demo-ft}
mkdir -p "$out"
base=(finetune.train_limit=10000 finetune.test_limit=5000 finetune.eval_points=3
      finetune.epochs=1 finetune.batch_size=64)
short=(finetune.predictor_lr_scale=1.0 finetune.warmup_epochs=0.1
       'finetune.crop_scale=[1.0,1.0]' finetune.hflip=false)
linear=(finetune.warmup_epochs=0.1 'finetune.crop_scale=[1.0,1.0]' finetune.hflip=false
        finetune.head=linear finetune.lr=3e-3)
for recipe in ${RECIPES:-defaults short short-lr3e-3 short-pred0.3 short-linear short-b32 \
                          short-2ep linear short-random linear-random}; do
  protocol=predictor
  case $recipe in
    defaults) args=() ;;                       # `iwm finetune`'s own, at one epoch
    short) args=("${short[@]}") ;;             # pretrained predictor at the head's lr
    short-lr3e-3) args=("${short[@]}" finetune.lr=3e-3) ;;
    short-pred0.3) args=("${short[@]}" finetune.predictor_lr_scale=0.3 finetune.lr=2e-3) ;;
    short-linear) args=("${short[@]}" finetune.head=linear) ;;
    short-b32) args=("${short[@]}" finetune.batch_size=32) ;;
    short-2ep) args=("${short[@]}" finetune.epochs=2) ;;
    linear) args=("${linear[@]}") ;;           # the demo's recipe
    short-random) protocol=random-predictor args=("${short[@]}") ;;
    linear-random) protocol=random-predictor args=("${linear[@]}") ;;
    *) echo "unknown recipe '$recipe'" >&2; exit 2 ;;
  esac
  [ -f "$out/$recipe.json" ] && continue
  iwm finetune "$run" --protocol "$protocol" train.precision=bf16 "${base[@]}" "${args[@]}" \
    > "$out/$recipe.txt" || exit 1
  cp "$run/results/finetune_$protocol.json" "$out/$recipe.json"
done
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text())
    curve = " / ".join(f"{a:.3f}" for a in r["curve"]["eval"][r["dataset"]])
    print(f"{path.stem:<14} {r['protocol']:<17} {r['accuracy']:.4f}  steps {r['steps']}  "
          f"train {r['train_seconds']:.0f} s  curve {curve}")
PY
