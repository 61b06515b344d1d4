#!/usr/bin/env bash
# The dense task (per-patch background / edge / interior of Fashion-MNIST, a linear
# per-token head, mIoU; docs/evaluation.md) at a budget where its curves level off: every
# protocol of one pretrained run, scratch first, `iwm finetune RUN --protocol P --task
# segmentation` with `finetune.epochs=EPOCHS` on LIMIT training images, per seed.
#
#     bash benchmarks/dense_study.sh RUN [OUT] [OVERRIDES...]        # default runs/dense
#     EPOCHS=5 LIMIT=10000 SEEDS='0 1 2' PROTOCOLS='scratch encoder predictor' \
#         bash benchmarks/dense_study.sh runs/full/iwm-equi-tiny-s2 runs/dense \
#         train.precision=bf16
#
# RUN is copied once to OUT/run (never written to); each result goes to
# OUT/e<EPOCHS>-s<seed>/<protocol>.json and OUT/summary.md tabulates them. Finished cells
# are skipped, so it can be stopped and started again.
set -u
. "$(dirname "$0")/study_steps.sh"
run=${1:?usage: dense_study.sh RUN [OUT] [OVERRIDES...]}
out=${2:-runs/dense}
shift $(( $# >= 2 ? 2 : 1 ))
read -ra iwm <<< "${IWM:-iwm}"
python=${PYTHON:-python}
epochs=${EPOCHS:-5}
copy=$out/run
copy_run_once "$run" "$copy" || exit 1
for seed in ${SEEDS:-0}; do
  cell=$out/e$epochs-s$seed
  mkdir -p "$cell"
  for protocol in ${PROTOCOLS:-scratch encoder random-predictor predictor end-to-end}; do
    [ -f "$cell/$protocol.json" ] && continue
    "${iwm[@]}" finetune "$copy" --protocol "$protocol" --task segmentation \
      "finetune.epochs=$epochs" "finetune.train_limit=${LIMIT:-10000}" \
      "finetune.test_limit=${TEST_LIMIT:-2000}" "finetune.seed=$seed" "$@" \
      > "$cell/$protocol.txt" || exit 1
    cp "$copy/results/segment_$protocol.json" "$cell/$protocol.json"
    cp "$copy/results/segment_${protocol}_curve.png" "$cell/$protocol.png"
  done
done
"$python" - "$out" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = ["| cell | protocol | mIoU | patch accuracy | curve (mIoU at each evaluation) "
        "| trainable params | train s |", "|" + "---|" * 7]
for path in sorted(out.glob("e*-s*/*.json")):
    r = json.loads(path.read_text())
    curve = " / ".join(f"{v:.3f}" for values in r["curve"]["eval"].values() for v in values)
    rows.append(f"| {path.parent.name} | {r['protocol']} | {r['miou']:.4f} | "
                f"{r['patch_accuracy']:.4f} | {curve} | {r['trainable_params']:,} | "
                f"{r['train_seconds']:.0f} |")
(out / "summary.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
