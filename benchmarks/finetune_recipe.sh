#!/usr/bin/env bash
# The finetuning recipe study: every protocol (scratch, encoder, random-predictor,
# predictor, end-to-end) of one pretrained run over a grid of epochs x base lr, each beside
# its baselines (scratch of the same cell, the linear probe of the run's encoder, raw
# pixels; docs/evaluation.md, "Baselines"), with its training curve.
#
#     bash benchmarks/finetune_recipe.sh RUN [OUT] [OVERRIDES...]
#     EPOCHS='1 3' LRS='1e-3 3e-4' bash benchmarks/finetune_recipe.sh runs/pairing/relative-s0 \
#         runs/ft-recipe finetune.train_limit=20000 train.precision=bf16
#     PROTOCOLS='encoder scratch' ... # a subset, in this order (scratch first: the others
#                                     # of a cell find it)
#
# RUN is copied once to OUT/run (checkpoints and config; never written to); each cell's
# results and curves go to OUT/cells/e<EPOCHS>-lr<LR>/, then OUT/summary.md tabulates them.
# Finished (cell, protocol) pairs are skipped, so it can be stopped and started again; a
# different grid or OVERRIDES needs another OUT. Each call passes --baselines, which only
# computes what RUN's copy does not hold yet (the probes once per set of images).
set -u
. "$(dirname "$0")/study_steps.sh"
run=${1:?usage: finetune_recipe.sh RUN [OUT] [OVERRIDES...]}
out=${2:-runs/ft-recipe}
shift $(( $# >= 2 ? 2 : 1 ))
read -ra iwm <<< "${IWM:-iwm}"  # e.g. IWM='python -m iwm.cli.main'
python=${PYTHON:-python}
copy=$out/run
copy_run_once "$run" "$copy" || exit 1
for epochs in ${EPOCHS:-1 3}; do
  for lr in ${LRS:-1e-3 3e-4}; do
    cell=$out/cells/e$epochs-lr$lr
    mkdir -p "$cell" "$copy/results"
    for protocol in ${PROTOCOLS:-scratch encoder random-predictor predictor end-to-end}; do
      [ -f "$cell/finetune_$protocol.json" ] && continue
      # This cell's scratch where the others look for it (a later cell replaced it).
      [ -f "$cell/finetune_scratch.json" ] && cp "$cell/finetune_scratch.json" "$copy/results/"
      "${iwm[@]}" finetune "$copy" --protocol "$protocol" --baselines "finetune.epochs=$epochs" \
        "finetune.lr=$lr" "$@" > "$cell/finetune_$protocol.txt" || exit 1
      cp "$copy/results/finetune_$protocol.json" "$copy/results/finetune_${protocol}_curve.png" \
        "$cell/"
    done
  done
done
"$python" - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = ["| cell | protocol | head | accuracy | curve | linear probe | raw pixels | scratch "
        "| trainable params | GFLOPs/image | train s | final loss |", "|" + "---|" * 12]
for path in sorted(out.glob("cells/*/finetune_*.json")):
    r = json.loads(path.read_text())
    base = r.get("baselines", {})
    acc = [f"{base.get(k, {}).get('accuracy', float('nan')):.4f}"
           for k in ("linear_probe", "raw_pixels", "scratch")]
    # Results written before head_init existed started from a random head.
    init = (r.get("head_init") or {}).get("kind", "random")
    curve = " / ".join(f"{v:.3f}" for values in r["curve"]["eval"].values() for v in values)
    rows.append(f"| {path.parent.name} | {r['protocol']} | {r.get('head', '?')}, {init} | "
                f"{r['accuracy']:.4f} | {curve} | "
                f"{' | '.join(acc)} | {r['trainable_params']:,} | "
                f"{r['flops_per_image'] / 1e9:.3g} | {r['train_seconds']:.0f} | "
                f"{r['curve']['loss'][-1]:.3f} |")
(out / "summary.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
