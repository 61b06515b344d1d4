# Resumable steps shared by the study scripts (sourced, not run): each step is skipped
# once its marker or result exists, so a study can be stopped and started again.

# pretrain_once RUN PRETRAIN_ARGS...: pretrain into RUN (bf16, checkpoints for resuming),
# resuming a run that was stopped; skipped once RUN/eval/pretrained exists.
pretrain_once() {
  local run=$1; shift
  mkdir -p "$run/eval"
  [ -f "$run/eval/pretrained" ] && return
  local resume=
  [ -d "$run/checkpoints" ] && resume=--resume
  iwm pretrain "$@" train.precision=bf16 train.progress=false --run-dir "$run" $resume \
    || return 1
  touch "$run/eval/pretrained"
}

# eval_step RUN NAME RESULT COMMAND...: run COMMAND (an `iwm eval` that writes
# RUN/results/RESULT.json), its output to RUN/eval/NAME.txt and its result copied to
# RUN/eval/NAME.json; skipped once that exists.
eval_step() {
  local run=$1 name=$2 result=$3; shift 3
  [ -f "$run/eval/$name.json" ] && return
  "$@" > "$run/eval/$name.txt" && cp "$run/results/$result.json" "$run/eval/$name.json"
}

# copy_run_once RUN COPY: RUN's checkpoints and config copied to COPY once, without its
# results, report, TensorBoard logs or study markers, for studies that write results into
# a run and must never touch RUN's own (RUN may be a symlink: its target is only read).
copy_run_once() {
  local run=$1 copy=$2
  [ -f "$copy/config.yaml" ] && return
  mkdir -p "$copy.tmp" && cp -a "$run"/. "$copy.tmp"/ &&
    rm -rf "$copy.tmp"/{results,report,tensorboard,eval} &&
    mv "$copy.tmp" "$copy"
}
