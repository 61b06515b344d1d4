#!/usr/bin/env bash
# Multitask predictor tuning (the paper's finding 5: one predictor with task tokens matches
# separately tuned ones) at a budget where each task reaches its linear probe: per seed,
# one shared predictor over TASKS (`iwm finetune RUN --protocol predictor --tasks A,B,C`)
# and each task alone (`--tasks A --baselines`: its scratch, linear probe and raw pixels
# beside it), all with the demo's recipe (one epoch of up to 10,000 images per task, batch
# 64, linear head at lr 3e-3, the pretrained predictor at its 1/10, warmup 0.1 epoch, no
# crop or flip; docs/RESULTS.md, "The demo reuses its world model") and HEAD_INIT.
#
#     bash benchmarks/multitask_study.sh RUN [OUT] [OVERRIDES...]     # default runs/multitask
#     SEEDS='0 1 2' HEAD_INIT=probe TASKS=fashion-mnist,mnist,animal-mnist \
#         bash benchmarks/multitask_study.sh runs/demo/iwm-equi-tiny-... runs/multitask \
#         train.precision=bf16
#
# RUN is copied once to OUT/run (never written to); results go to
# OUT/<head_init>-s<seed>/{shared,<task>}.json and OUT/summary.md tabulates them. Finished
# cells are skipped, so it can be stopped and started again. About 4 minutes a seed on
# 2 cores for three tasks (the first seed also fits each task's probes and scratch).
set -u
. "$(dirname "$0")/study_steps.sh"
run=${1:?usage: multitask_study.sh RUN [OUT] [OVERRIDES...]}
out=${2:-runs/multitask}
shift $(( $# >= 2 ? 2 : 1 ))
read -ra iwm <<< "${IWM:-iwm}"
python=${PYTHON:-python}
tasks=${TASKS:-fashion-mnist,mnist,animal-mnist}
init=${HEAD_INIT:-probe}
copy=$out/run
# The result file a finetuning wrote: its output's "... -> PATH" line.
result_of() { grep -o -- '-> .*\.json' "$1" | tail -1 | cut -c4-; }
copy_run_once "$run" "$copy" || exit 1
recipe=(finetune.train_limit=10000 finetune.test_limit=5000 finetune.epochs=1
        finetune.batch_size=64 finetune.eval_points=1 finetune.head=linear finetune.lr=3e-3
        finetune.warmup_epochs=0.1 'finetune.crop_scale=[1.0,1.0]' finetune.hflip=false
        "finetune.head_init=$init")
for seed in ${SEEDS:-0 1 2}; do
  cell=$out/$init-s$seed
  mkdir -p "$cell"
  if [ ! -f "$cell/shared.json" ]; then
    "${iwm[@]}" finetune "$copy" --protocol predictor --tasks "$tasks" "${recipe[@]}" \
      "finetune.seed=$seed" "$@" > "$cell/shared.txt" || exit 1
    cp "$(result_of "$cell/shared.txt")" "$cell/shared.json"
  fi
  for task in ${tasks//,/ }; do
    [ -f "$cell/$task.json" ] && continue
    "${iwm[@]}" finetune "$copy" --protocol predictor --tasks "$task" --baselines \
      "${recipe[@]}" "finetune.seed=$seed" "$@" > "$cell/$task.txt" || exit 1
    cp "$(result_of "$cell/$task.txt")" "$cell/$task.json"
  done
done
"$python" - "$out" "$tasks" <<'EOF'
import json, statistics, sys
from pathlib import Path

out, tasks = Path(sys.argv[1]), sys.argv[2].split(",")
rows = ["| cell | " + " | ".join(f"{t}: shared / alone / probe" for t in tasks)
        + " | mean: shared / alone | trainable params: shared / alone |",
        "|" + "---|" * (len(tasks) + 3)]
gaps: dict[str, list[float]] = {}  # by head init: the cells' names start with it
for cell in sorted(p for p in out.iterdir() if (p / "shared.json").is_file()):
    shared = json.loads((cell / "shared.json").read_text())
    alone = {t: json.loads((cell / f"{t}.json").read_text()) for t in tasks
             if (cell / f"{t}.json").is_file()}
    if len(alone) < len(tasks):
        continue
    per = []
    for t in tasks:
        probe = alone[t].get("baselines", {}).get("linear_probe", {}).get("accuracy")
        per.append(f"{shared['tasks'][t]['accuracy']:.4f} / {alone[t]['accuracy']:.4f} / "
                   + ("n/a" if probe is None else f"{probe:.4f}"))
    m_shared = statistics.mean(shared["tasks"][t]["accuracy"] for t in tasks)
    m_alone = statistics.mean(alone[t]["accuracy"] for t in tasks)
    gaps.setdefault(cell.name.rsplit("-s", 1)[0], []).append(m_shared - m_alone)
    params = sum(a["trainable_params"] for a in alone.values())
    rows.append(f"| {cell.name} | {' | '.join(per)} | {m_shared:.4f} / {m_alone:.4f} | "
                f"{shared['trainable_params']:,} / {params:,} |")
for init, values in gaps.items():
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    rows.append(f"\n{init} heads: shared minus alone, mean over tasks: "
                f"{statistics.mean(values):+.4f}{spread} ({len(values)} seeds)")
(out / "summary.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
