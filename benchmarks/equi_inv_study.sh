#!/usr/bin/env bash
# The paper's finding 3 at the presets' full recipes: the equivariant world model wins
# predictor finetuning while the invariant one wins linear probing. Per seed, pretrain
# iwm-equi-tiny and iwm-inv-tiny (5 epochs, bf16), then `iwm finetune RUN --protocol
# predictor --baselines` at the defaults (5 epochs of all 60,000 images; the linear probe
# of the same encoder comes with it), finetuning seed = pretraining seed. OUT/summary.md
# tabulates both per seed with Equi - Inv and a paired t-test over the seeds.
#
#     bash benchmarks/equi_inv_study.sh [OUT] [FINETUNE_OVERRIDES...]   # default runs/equi-inv
#     SEEDS='0 1 2' bash benchmarks/equi_inv_study.sh runs/equi-inv train.precision=bf16
#     PRETRAIN='train.epochs=0.02' SEEDS=0 bash benchmarks/equi_inv_study.sh /tmp/smoke \
#         finetune.epochs=0.02 finetune.train_limit=512 finetune.test_limit=256
#
# On 2 cores: about 16 min of pretraining and 28 min of predictor finetuning per preset
# and seed (4.4 hours for 3 seeds). Pretraining resumes, finished finetunings are skipped,
# so it can be stopped and started again. PRESETS overrides the pair (Equi first).
set -u
. "$(dirname "$0")/study_steps.sh"
out=${1:-runs/equi-inv}
shift $(( $# >= 1 ? 1 : 0 ))
read -ra iwm <<< "${IWM:-iwm}"
python=${PYTHON:-python}
read -ra pretrain_args <<< "${PRETRAIN:-}"
presets=${PRESETS:-iwm-equi-tiny iwm-inv-tiny}
for seed in ${SEEDS:-0 1 2}; do
  for preset in $presets; do
    run=$out/$preset-s$seed
    pretrain_once "$run" "$preset" train.checkpoint_every=500 train.seed="$seed" \
      ${pretrain_args[@]+"${pretrain_args[@]}"} || exit 1
    [ -f "$run/eval/finetune_predictor.json" ] && continue
    "${iwm[@]}" finetune "$run" --protocol predictor --baselines "finetune.seed=$seed" "$@" \
      > "$run/eval/finetune_predictor.txt" || exit 1
    cp "$run/results/finetune_predictor.json" "$run/eval/"
  done
done
"$python" - "$out" $presets <<'EOF'
import json, statistics, sys
from pathlib import Path

from scipy import stats

out, equi, inv = Path(sys.argv[1]), sys.argv[2], sys.argv[3]


def scores(preset: str) -> dict[int, tuple[float, float]]:
    """seed -> (predictor finetuning, linear probe of the same encoder), in %."""
    found = {}
    for path in out.glob(f"{preset}-s*/eval/finetune_predictor.json"):
        r = json.loads(path.read_text())
        probe = (r.get("baselines", {}).get("linear_probe") or {}).get("accuracy")
        if probe is not None:
            found[int(path.parent.parent.name.rsplit("-s", 1)[1])] = (100 * r["accuracy"],
                                                                     100 * probe)
    return found


a, b = scores(equi), scores(inv)
seeds = sorted(set(a) & set(b))
rows = [f"| seed | predictor ft, {equi} | {inv} | Equi - Inv | linear probe, {equi} | {inv} "
        "| Equi - Inv |", "|" + "---|" * 7]
for s in seeds:
    rows.append(f"| {s} | {a[s][0]:.2f} | {b[s][0]:.2f} | {a[s][0] - b[s][0]:+.2f} | "
                f"{a[s][1]:.2f} | {b[s][1]:.2f} | {a[s][1] - b[s][1]:+.2f} |")
if len(seeds) > 1:
    for i, name in enumerate(("predictor finetuning", "linear probe")):
        d = [a[s][i] - b[s][i] for s in seeds]
        t = stats.ttest_rel([a[s][i] for s in seeds], [b[s][i] for s in seeds])
        rows.append(f"\n{name}: Equi - Inv {statistics.mean(d):+.2f} +- "
                    f"{statistics.stdev(d):.2f} over {len(d)} seeds, "
                    f"paired t = {t.statistic:.2f}, p = {t.pvalue:.3f}")
(out / "summary.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
