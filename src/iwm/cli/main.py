"""The ``iwm`` command line.

User errors (:class:`iwm.errors.IWMError`) print one line and exit with status 2;
``--debug`` shows the traceback instead. A run stopped by SIGTERM/SIGUSR1 after writing
its checkpoint exits with status 75 (:class:`iwm.errors.Preempted`; requeue it and
``--resume``), one stopped by Ctrl-C after writing it with 130
(:class:`iwm.errors.Interrupted`), as does a second Ctrl-C that quits at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from iwm.config import load_config, preset_description, preset_names, resolve_config_path
from iwm.errors import Interrupted, IWMError, Preempted, Stopped
from iwm.evaluation.bank import MRR_BLOCKS, MRR_TIES
from iwm.models.action_search import ENERGY_KINDS
from iwm.version import __version__

if TYPE_CHECKING:
    from iwm.study.grid import Study


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from iwm.training.loop import pretrain
    from iwm.training.run_dir import load_run_config, new_run_dir

    slurm = None
    if args.slurm is not None:
        from iwm.training.slurm import parse_slurm_options

        slurm = parse_slurm_options(args.slurm)  # before the config: a typo fails fast
    target = Path(args.config)
    if args.resume and not (target.exists() or args.config in preset_names()):
        raise IWMError(f"--resume: {target} is not a run directory (no such folder); pass "
                       "the folder of an earlier run (e.g. runs/NAME), or a preset or YAML "
                       "file with --run-dir DIR")
    if args.resume and target.is_dir():
        # `iwm pretrain RUN --resume`: the run directory carries its own config.
        cfg, run_dir = load_run_config(target, args.overrides), target
    else:
        cfg = load_config(args.config, args.overrides)
        # A run directory as the config (a run to start from) names the new run after it.
        name = target.name if target.is_dir() else resolve_config_path(args.config).stem
        run_dir = Path(args.run_dir) if args.run_dir else new_run_dir(cfg, name)
        if not args.resume and (run_dir / "checkpoints").exists():
            raise IWMError(f"{run_dir} already holds a run: pass --resume to continue it, "
                           "or choose another train.run_name / --run-dir")
    if slurm is not None:
        from iwm.training.slurm import submit_pretrain

        job = submit_pretrain(cfg, run_dir, slurm, resume=args.resume)
        print(f"submitted SLURM job {job.job_id} ({slurm.nodes} node(s) x "
              f"{slurm.tasks_per_node} process(es))")
        print(f"run directory: {run_dir}")
        print(f"logs: {job.paths.folder} ({job.paths.stdout.name}, ...)")
        return
    pretrain(cfg, run_dir, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # once, not once per torchrun process
        print(f"run directory: {run_dir}")


def _cmd_probe(args: argparse.Namespace) -> None:
    from iwm.evaluation.probe import run_linear_probe

    result = run_linear_probe(Path(args.run), args.overrides, device=args.device)
    print(f"linear probe accuracy: {result['accuracy']:.4f} "
          f"(train {result['train_accuracy']:.4f}; {result['n_train']} train / "
          f"{result['n_test']} test images) -> {result['path']}")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from iwm.evaluation.finetune_run import baselines_text, run_finetune

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    r = run_finetune(Path(args.run), args.protocol, tasks, args.task, args.overrides,
                     device=args.device, compare_separate=args.compare_separate,
                     baselines=args.baselines)
    metric = "accuracy" if args.task == "classification" else "miou"
    per_task = ", ".join(f"{name} {v[metric]:.4f}" for name, v in r["tasks"].items())
    gflops = "".join(f"{v['flops_per_image'] / 1e9:.3g} GFLOPs/image, "
                     for v in r["tasks"].values() if len(r["tasks"]) == 1)
    line = (f"{args.protocol} {metric}: {per_task} ({r['trainable_params']:,} trainable "
            f"params, {gflops}{r['train_seconds']:.1f} s training, {r['seconds']:.1f} s)")
    if "separate" in r:
        s = r["separate"]
        line += (f"; separate predictors: mean {s[f'mean_{metric}']:.4f} "
                 f"({s['trainable_params']:,} params, {s['seconds']:.1f} s)")
    start = []
    if r.get("head_init", {}).get("kind") == "probe":
        curve = r["curve"]
        at_zero = ", ".join(f"{name} {values[0]:.4f}" for name, values in curve["eval"].items())
        start = [f"  head initialised as a linear probe ({r['head_init']['seconds']:.1f} s): "
                 f"{metric} before finetuning {at_zero}"]
    print(f"{line} -> {r['path']}", *start, *baselines_text(r), sep="\n")


def _cmd_eval_mrr(args: argparse.Namespace) -> None:
    from iwm.console import plus_minus
    from iwm.evaluation.mrr import run_mrr
    from iwm.evaluation.ranking import chance_mrr_stderr

    r = run_mrr(Path(args.run), n_images=args.images, bank_size=args.bank,
                distance=args.distance, device=args.device, seed=args.seed,
                per_transform=args.per_transform, context=args.context, blocks=args.blocks,
                ties=args.ties, bf16=args.bf16)
    parts = ", ".join(f"{k} {v:.3f}" for k, v in r["per_transform"].items() if v is not None)
    noise = chance_mrr_stderr(r["bank"], r["n_images"])
    print(f"MRR {r['mrr']:.4f}{plus_minus(r['stderr'], 4)} (bank {r['bank']}, "
          f"{r['n_images']} images, {r['distance']}, blocks {r['blocks']}, ties {r['ties']}; "
          f"chance "
          f"{r['chance']:.4f} ± {noise:.4f}); per transform: {parts} -> {r['path']}")
    if r["decomposition"]:
        print("why (chance / MRR / oracle: transformed context, null action / residual: "
              "p(a) - p(null) + clean latents / slope of the nearest entry's factor):")
        for name, d in r["decomposition"].items():
            rec = r["recovered"].get(name) or {}
            slope = "" if rec.get("slope") is None else f" / slope {rec['slope']:.2f}"
            mrr = r["mrr"] if name == "all" else r["per_transform"][name]
            chance = r["chance"] if name == "all" else r["per_transform_chance"][name]
            print(f"  {name:<10} {chance:.3f} / {mrr:.3f} / {d['oracle']:.3f} / "
                  f"{d['residual']:.3f}{slope}")
    if r["sensitivity"]:
        print("latent change over each factor's range, relative to the distance between "
              "images (encoder / predictor / alignment):")
        for factor, v in r["sensitivity"].items():
            print(f"  {factor:<10} {v['encoder']:.3f} / {v['predictor']:.3f} / "
                  f"{v['alignment']:+.2f}")


def _cmd_eval_api_check(args: argparse.Namespace) -> None:
    from iwm.console import plus_minus
    from iwm.evaluation.api_check import run_api_check
    from iwm.evaluation.ranking import chance_mrr_stderr

    # Checked here too: the library raises ValueError (a caller's bug), the command line
    # answers a typo with one line.
    if args.bank < 2 or args.images < 1:
        raise IWMError(f"--bank {args.bank} (>= 2), --images {args.images} (>= 1)")
    r = run_api_check(Path(args.run), n_images=args.images, k=args.bank, seed=args.seed,
                      device=args.device, bf16=args.bf16)
    parts = ", ".join(f"{k} {v:.3f}" for k, v in r["per_factor"].items() if v is not None)
    noise = chance_mrr_stderr(r["bank"], r["n_images"])
    print(f"world model through the API: MRR {r['mrr']:.4f}{plus_minus(r['stderr'], 4)} "
          f"(chance {r['chance']:.3f} ± {noise:.3f}; bank {r['bank']}, {r['n_images']} "
          f"images); per factor: {parts} -> {r['path']}")


def _cmd_decoder(args: argparse.Namespace) -> None:
    from iwm.training.decoder import run_decoder

    r = run_decoder(Path(args.run), args.overrides, device=args.device)
    t = r["train"]
    held_out = (f"; held-out PSNR {t['val_psnr']:.2f} dB on {t['val_images']} test images "
                f"(their mean image: {t['val_mean_image_psnr']:.2f} dB)"
                if "val_psnr" in t else "")
    print(f"latent decoder: {t['steps']} steps in {t['seconds']:.0f} s{held_out} -> "
          f"{r['path']}; see it with `iwm imagine {args.run} IMAGE --action brightness=1.3`, "
          f"measure it with `iwm eval decoder {args.run}`")


def _cmd_imagine(args: argparse.Namespace) -> None:
    from iwm.evaluation.imagine import parse_action, run_imagine

    action = parse_action(args.action)  # before loading anything: a typo fails fast
    path = run_imagine(args.run, args.images, action, args.out, device=args.device)
    print(f"source | prediction, decoded | real transformed | real, decoded -> {path}")


def _cmd_infer(args: argparse.Namespace) -> None:
    import json

    from iwm.evaluation.infer_action import infer_files

    if len(args.images) % 2:
        raise IWMError(f"{len(args.images)} image files: give them in pairs, SOURCE TARGET "
                       "[SOURCE TARGET ...]")
    pairs = list(zip(args.images[::2], args.images[1::2], strict=True))
    r = infer_files(args.run, pairs, destructive=args.destructive, raw=args.raw,
                    seed=args.seed, device=args.device)
    b = r["budget"]
    print(f"{r['calibration']}; CEM {b['iterations']} x {b['population']} ({b['evaluations']} "
          f"predictor calls per pair, {r['energy']} energy, {r['seconds']:.1f} s)")
    units = {"brightness": "", "contrast": "", "saturation": "", "hue": " turns"}
    for pair in r["pairs"]:
        answer = pair.get("calibrated", pair["raw"])
        said = ", ".join(f"{f} {answer[f]:.3f}{units[f]}" for f in r["factors"])
        flags = [f for f in ("grayscale", "solarize") if answer[f]]
        if answer["blur_sigma"] > 0:
            flags.append(f"blur_sigma {answer['blur_sigma']:.2f}")
        extra = f"; source: {', '.join(flags)}" if r["destructive"] and flags else ""
        raw = (" (raw: " + ", ".join(f"{pair['raw'][f]:.3f}" for f in r["factors"]) + ")"
               if "calibrated" in pair else "")
        print(f"  {pair['source']} -> {pair['target']}: {said}{extra}{raw}, "
              f"energy {pair['energy']:.4g}")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2) + "\n")
        print(f"-> {args.json}")


def _cmd_eval_decoder(args: argparse.Namespace) -> None:
    from iwm.evaluation.decoder_eval import SETTINGS, run_decoder_eval

    if args.images < 1:
        raise IWMError(f"--images {args.images}: must be at least 1")
    r = run_decoder_eval(Path(args.run), n_images=args.images, seed=args.seed,
                         device=args.device)
    print(f"latent decoder on {r['n_images']} test images: PSNR {r['psnr']:.2f} dB, SSIM "
          f"{r['ssim']:.3f} (their mean image: {r['mean_image_psnr']:.2f} dB, SSIM "
          f"{r['mean_image_ssim']:.3f}) -> {r['path']}")
    if r["factors"]:
        print("factor measured on the images against the requested one, slope / R^2 "
              "(real: the pixels; real_decoded: the decoder's ceiling; predicted: the world "
              "model, decoded; null: no world model):")
        print(f"  {'factor':<11}" + "".join(f"{name:>16}" for name in SETTINGS))
    for factor, entry in r["factors"].items():
        cells = []
        for name in SETTINGS:
            fit = entry[name]
            cells.append("–" if fit["slope"] is None else
                         f"{fit['slope']:.2f} / " + ("–" if fit["r2"] is None
                                                     else f"{fit['r2']:.2f}"))
        print(f"  {factor:<11}" + "".join(f"{c:>16}" for c in cells))


def _cmd_eval_infer_action(args: argparse.Namespace) -> None:
    from iwm.evaluation.infer_action import run_infer_action

    if args.images < 1:
        raise IWMError(f"--images {args.images}: must be at least 1")
    if args.calibration_images < 0:
        raise IWMError(f"--calibration-images {args.calibration_images}: must be 0 (no "
                       "calibration) or more")
    r = run_infer_action(Path(args.run), n_images=args.images, seed=args.seed,
                         device=args.device, bf16=args.bf16, energy=args.energy,
                         calibration_images=args.calibration_images,
                         calibration_degree=args.calibration_degree)
    b = r["budget"]
    print(f"action inference: {r['n_images']} images, CEM {b['iterations']} x "
          f"{b['population']} ({b['evaluations']} predictor calls, "
          f"{r['ms_per_image']:.0f} ms per image on {r['device']})")
    print(f"  {'factor':<11}{'R^2: model':>11}{'calibrated':>11}{'no change':>10}{'pixels':>8}"
          f"{'MAE: model':>12}{'calibrated':>11}{'no change':>10}{'pixels':>8}")

    def cell(v: dict | None, key: str, width: int) -> str:
        value = None if v is None else v[key]
        return f"{'-' if value is None else f'{value:.3f}':>{width}}"

    for factor, s in r["per_factor"].items():
        if s is not None:
            fixed = s.get("calibrated")
            print(f"  {factor:<11}{cell(s['model'], 'r2', 11)}{cell(fixed, 'r2', 11)}"
                  f"{cell(s['no_change'], 'r2', 10)}{cell(s['pixels'], 'r2', 8)}"
                  f"{cell(s['model'], 'mae', 12)}{cell(fixed, 'mae', 11)}"
                  f"{cell(s['no_change'], 'mae', 10)}{cell(s['pixels'], 'mae', 8)}")
    cal = r["calibration"]
    kind = "affine" if cal and cal.get("degree") == 1 else "quadratic"
    fitted = (f"calibrated: the model's answers through per-factor {kind} maps fitted on "
              f"{cal['n_images']} training pairs" if cal else "calibrated: off")
    print(f"(MAE in ratios; hue in turns. {fitted}. pixels: least squares on pixel "
          f"statistics, 2-fold cross-fitted) -> {r['path']}")


def _cmd_eval_probe(args: argparse.Namespace) -> None:
    from iwm.evaluation.probe import run_probe

    # --encoder is sugar for the probe.encoder override, so the config stays the one source.
    overrides = [*args.overrides, *([f"probe.encoder={args.encoder}"] if args.encoder else [])]
    r = run_probe(Path(args.run), args.kind, overrides, device=args.device)
    print(f"{r['kind']} probe accuracy ({r['encoder']} encoder): {r['accuracy']:.4f} "
          f"(train {r['train_accuracy']:.4f}; {r['n_train']} train / {r['n_test']} test "
          f"images, {r['seconds']:.1f} s) -> {r['path']}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from iwm.cli.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, device=args.device, overrides=args.overrides)


def _cmd_export(args: argparse.Namespace) -> None:
    from iwm.interop.export import export

    out = export(args.run, args.format, Path(args.out))
    if args.format == "timm":
        print(f"timm encoder -> {out}; load it with "
              f"timm.create_model('local-dir:{out}', pretrained=True)")
    else:
        print(f"whole model -> {out}; load it with iwm.from_pretrained('{out}')")


def _cmd_import_ijepa(args: argparse.Namespace) -> None:
    from iwm.interop.ijepa import import_ijepa

    run_dir, cfg = import_ijepa(args.checkpoint, args.out, args.overrides)
    m = cfg.model
    print(f"I-JEPA {m.encoder}/{m.patch_size} at {cfg.data.image_size} px, predictor "
          f"{m.predictor_depth} x {m.predictor_width}, data {cfg.data.name} -> {run_dir}")
    print(f"evaluate it as a run (`iwm probe {run_dir}`), or train IWM from it: "
          f"`iwm pretrain {run_dir} model.init_from={run_dir} model.conditioning=feature`")


def _cmd_embed(args: argparse.Namespace) -> None:
    from iwm.interop.embed import embed_files

    r = embed_files(args.run, args.images, args.out, batch_size=args.batch_size,
                    device=args.device, num_workers=args.workers)
    skipped = f" ({r['n_skipped']} unreadable skipped)" if r["n_skipped"] else ""
    print(f"{r['n_images']} images{skipped} -> features ({r['n_images']}, {r['dim']}) -> "
          f"{', '.join(str(w) for w in r['written'])}")


def _cmd_shards(args: argparse.Namespace) -> None:
    from iwm.data.tarshards import write_shards

    out = Path(args.out)
    written = write_shards(args.folder, out, args.shard_size, args.holdout, args.seed)
    for split, n in written.items():
        print(f"{split}: {n} images -> {out / split}/shard-*.tar + index.json; train on "
              f"them with data.name=shards:{out / split}/shard-*.tar")


def _cmd_report(args: argparse.Namespace) -> None:
    from iwm.evaluation.report import build_report

    path = build_report(Path(args.run), Path(args.out) if args.out else None,
                        n_images=args.images, bank_size=args.bank, seed=args.seed,
                        device=args.device)
    print(f"report -> {path}")


def _cmd_study_run(args: argparse.Namespace) -> None:
    from iwm.errors import TrainingError
    from iwm.study.grid import load_study
    from iwm.study.runner import run_study

    study = load_study(args.grid)
    out = Path(args.out or f"runs/study-{args.scale}")
    failed = run_study(study, args.scale, out, seeds=args.seed, only=args.cell,
                       workers=args.workers, device=args.device)
    if not args.no_summary:
        _print_summary(study, args.scale, out)
    if failed:
        raise TrainingError(f"{len(failed)} task(s) failed: {', '.join(failed)} (logs under "
                            f"{out / 'logs'}); run the same command again to retry them")


def _print_summary(study: Study, scale: str, out: Path) -> None:
    from iwm.study.summary import summarise

    paths = summarise(study, scale, out)
    print(paths["table"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))


def _cmd_study_table(args: argparse.Namespace) -> None:
    from iwm.study.grid import load_study

    _print_summary(load_study(args.grid), args.scale,
                   Path(args.out or f"runs/study-{args.scale}"))


def _cmd_config(args: argparse.Namespace) -> None:
    if args.config is None:
        names = preset_names()
        width = max(map(len, names))
        print("presets (`iwm config NAME` prints one resolved, `iwm pretrain NAME` trains it):")
        for name in names:
            print(f"  {name:<{width}}  {preset_description(name)}")
        return
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


def _add_decoder_parsers(sub: argparse._SubParsersAction,
                         evals: argparse._SubParsersAction) -> None:
    """``iwm decoder``, ``iwm imagine`` and ``iwm eval decoder``: the latent decoder."""
    p = sub.add_parser("decoder", help="train a small decoder from the frozen target "
                                       "encoder's latents to pixels (saved in RUN/decoder/)")
    p.add_argument("run", help="run directory")
    p.add_argument("overrides", nargs="*",
                   help="decoder.* overrides, e.g. decoder.epochs=1 decoder.width=192")
    _add_device(p)
    p.set_defaults(fn=_cmd_decoder)
    p = sub.add_parser("imagine", help="draw what the world model predicts images look like "
                                       "after an action, through the latent decoder")
    p.add_argument("run", help="run directory (with a decoder: `iwm decoder RUN`) or export")
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
    p.add_argument("--action", required=True,
                   help="field=value pairs of iwm.Action, e.g. brightness=1.3,hue=0.1 "
                        "(brightness, contrast, saturation: factors, 1 = same; hue: turns; "
                        "grayscale, solarize: true/false and blur_sigma: done to the source)")
    p.add_argument("--out", required=True, help="the PNG to write")
    _add_device(p)
    p.set_defaults(fn=_cmd_imagine)
    p = sub.add_parser("infer", help="what changed between two images: the action that maps "
                                     "each source onto its target through the world model")
    p.add_argument("run", help="run directory or export (a run's stored calibration, from "
                               "`iwm eval infer-action RUN`, maps the answers)")
    p.add_argument("images", nargs="+", help="image files in pairs: SOURCE TARGET "
                                             "[SOURCE TARGET ...]")
    p.add_argument("--destructive", action="store_true",
                   help="also infer what was done to the source (grayscale, blur, solarize)")
    p.add_argument("--raw", action="store_true",
                   help="the search's own answers, without the run's calibration")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (fixes the answer)")
    p.add_argument("--json", help="also write every answer, raw and calibrated, to this file")
    _add_device(p)
    p.set_defaults(fn=_cmd_infer)
    p = evals.add_parser("decoder", help="the latent decoder: PSNR/SSIM on test images, and "
                                         "each factor measured on decoded predictions")
    p.add_argument("run", help="run directory with a decoder (results go to RUN/results/)")
    p.add_argument("--images", type=int, default=512, help="test images to evaluate")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the requested factors (default: 0)")
    _add_device(p)
    p.set_defaults(fn=_cmd_eval_decoder)


DEVICE_HELP = ("where to compute: auto (cuda if available, else mps, else cpu), cpu, cuda, "
               "cuda:N or mps (default: auto)")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=DEVICE_HELP)


def _add_bank_options(p: argparse.ArgumentParser) -> None:
    """The options the world-model evaluations (MRR, API check) share."""
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampled images and transformations (default: 0)")
    _add_device(p)
    p.add_argument("--bf16", action="store_true",
                   help="run the model under bf16 autocast: about twice as fast where bf16 is "
                        "native (recent CPUs, GPUs); results can differ where two "
                        "candidates are within rounding")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iwm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"iwm {__version__}",
                        help="print the installed iwm version and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "pretrain", help="pretrain I-JEPA / IWM from a config",
        epilog="exit status: 0 done; 2 bad input (config, data, checkpoint, disk); "
               f"{Preempted.exit_code} stopped by SIGTERM or SIGUSR1 after finishing the step "
               "and writing a checkpoint (e.g. SLURM preemption: requeue the job and run "
               "`iwm pretrain RUN --resume`); "
               f"{Interrupted.exit_code} Ctrl-C (the first one finishes the step and writes a "
               "checkpoint, a second quits at once).")
    p.add_argument("config", help="preset name (see `iwm config`), YAML file, or a run "
                                  "directory with --resume")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.epochs=2")
    p.add_argument("--run-dir", help="where to write the run (default: train.out_dir/NAME)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--slurm", metavar="OPTIONS",
                   help="submit to SLURM (submitit) instead of training here, requeued on "
                        "preemption and timeout: e.g. 'nodes=2,gpus=8,partition=learn,"
                        "time=4320' (keys: nodes gpus partition time cpus mem account qos "
                        "constraint requeue folder signal_delay; docs/distributed.md)")
    p.set_defaults(fn=_cmd_pretrain)

    p = sub.add_parser("probe", help="linear probe of a run's frozen encoder")
    p.add_argument("run", help="run directory")
    p.add_argument("overrides", nargs="*", help="probe.* overrides, e.g. probe.train_limit=10000")
    _add_device(p)
    p.set_defaults(fn=_cmd_probe)

    p = sub.add_parser("eval", help="evaluate a run")
    evals = p.add_subparsers(dest="evaluation", required=True)
    p = evals.add_parser("mrr", help="world-model quality: mean reciprocal rank of the "
                                     "predicted transformation")
    p.add_argument("run", help="run directory or checkpoint")
    p.add_argument("--bank", type=int, default=256, help="transformations ranked per image")
    p.add_argument("--images", type=int, default=256, help="test images to evaluate")
    p.add_argument("--per-transform", action=argparse.BooleanOptionalAction, default=True,
                   help="also rank a bank per jitter factor, the source-side transforms and "
                        "the sensitivity (default); --no-per-transform: only the main bank, "
                        "every field varying at once (the paper's protocol), in about "
                        "1 / (1 + factors) of the time")
    p.add_argument("--distance", choices=("cosine", "l2"), default="cosine",
                   help="how predictions are compared with the bank (default: cosine)")
    p.add_argument("--context", choices=("own", "batch-min"), default="own",
                   help="own: each image's whole context; batch-min: every context thinned "
                        "to the smallest of its batch of 64 (the protocol before 2026-11-29, "
                        "for comparisons)")
    p.add_argument("--blocks", choices=MRR_BLOCKS, default="union",
                   help="union: score every target block of an image; first: the first "
                        "block only (the protocol before 2026-12-02, for comparisons)")
    p.add_argument("--ties", choices=MRR_TIES, default="truth",
                   help="truth: bank entries whose rendering no 8-bit image could tell from "
                        "the true one count as the truth; rank: ranked like the others (the "
                        "protocol before 2026-12-02)")
    _add_bank_options(p)
    p.set_defaults(fn=_cmd_eval_mrr)
    p = evals.add_parser("api-check", help="the world model asked through the Python API "
                                           "(iwm.Action, encode, apply): MRR of the true "
                                           "jitter among torchvision-rendered ones")
    p.add_argument("run", help="run directory (results go to RUN/results/)")
    p.add_argument("--bank", type=int, default=64, help="jitters ranked per image")
    p.add_argument("--images", type=int, default=256, help="test images to evaluate")
    _add_bank_options(p)
    p.set_defaults(fn=_cmd_eval_api_check)
    p = evals.add_parser("infer-action", help="action inference: which jitter maps a test "
                                              "image onto its torchvision-jittered copy, "
                                              "searched through the world model; R^2 and "
                                              "MAE per factor beside no-change and pixel "
                                              "references")
    p.add_argument("run", help="run directory or checkpoint (results go to RUN/results/)")
    p.add_argument("--images", type=int, default=256, help="test images to evaluate")
    p.add_argument("--energy", choices=ENERGY_KINDS, default="residual",
                   help="what the search minimises: direct, the prediction's distance to "
                        "the target's latents (the training loss); residual, the predicted "
                        "change added to the source's latents, against the target's")
    p.add_argument("--calibration-images", type=int, default=128,
                   help="training images whose known jitters fit the per-factor map from "
                        "inferred to true that the 'calibrated' column applies (removes "
                        "the world model's systematic bias; 0: no calibration)")
    p.add_argument("--calibration-degree", type=int, choices=(1, 2), default=2,
                   help="the maps' degree in the action's coordinates: 1 affine, 2 "
                        "quadratic (increasing on the fitted range; default)")
    _add_bank_options(p)
    p.set_defaults(fn=_cmd_eval_infer_action)
    p = evals.add_parser("probe", help="frozen-encoder probe: linear (as `iwm probe`), "
                                       "attentive or kNN")
    p.add_argument("run", help="run directory")
    p.add_argument("overrides", nargs="*", help="probe.* overrides, e.g. probe.knn_k=10")
    p.add_argument("--kind", choices=("linear", "attentive", "knn"), default="linear",
                   help="probe head: linear, attentive (cross-attention pooling) or kNN "
                        "(default: linear)")
    p.add_argument("--encoder", choices=("target", "context"),
                   help="encoder to probe (default: probe.encoder, i.e. target = EMA)")
    _add_device(p)
    p.set_defaults(fn=_cmd_eval_probe)

    p = sub.add_parser("finetune", help="finetune a run's encoder and/or predictor with a "
                                        "head (protocols of docs/method.md: leveraging the "
                                        "world model)")
    p.add_argument("run", help="run directory (results go to RUN/results/)")
    p.add_argument("overrides", nargs="*",
                   help="config overrides, e.g. finetune.epochs=2 train.precision=bf16")
    # Not argparse choices: a typo gets the library's one-line "did you mean".
    p.add_argument("--protocol", required=True,
                   help="encoder: tune the target encoder; random-predictor / predictor: a "
                        "frozen encoder under a fresh / the pretrained predictor; end-to-end: "
                        "both (docs/method.md); scratch: the encoder's architecture at random "
                        "init, all at the base lr")
    p.add_argument("--tasks", help="comma-separated data sets (default: the run's), e.g. "
                                   "mnist or imagefolder:PATH (class sub-folders); several "
                                   "= multitask tuning with task tokens")
    p.add_argument("--baselines", action="store_true",
                   help="compute the missing baselines shown beside the result: scratch, "
                        "the linear probe of the run's encoder and raw pixels on the same "
                        "images (classification; each task of a multitask run gets its "
                        "probes, not scratch)")
    p.add_argument("--task", choices=("classification", "segmentation"),
                   default="classification", help="head: attentive classifier or per-patch "
                                                  "linear segmentation")
    p.add_argument("--compare-separate", action="store_true",
                   help="with several --tasks, also tune one predictor per task")
    _add_device(p)
    p.set_defaults(fn=_cmd_finetune)

    p = sub.add_parser("demo", help="the main job: pretrain a tiny IWM on Fashion-MNIST, "
                                    "probe it, summarise")
    p.add_argument("overrides", nargs="*", help="config overrides on top of the demo's")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    _add_device(p)
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("export", help="write a run for other tools: the encoder for timm, or "
                                      "the whole model as safetensors")
    p.add_argument("run", help="run directory, checkpoint or exported folder")
    p.add_argument("--format", choices=("timm", "safetensors"), default="timm",
                   help="timm: the EMA target encoder for timm.create_model (default); "
                        "safetensors: the whole model, for iwm.from_pretrained")
    p.add_argument("--out", required=True, help="output folder (config.json + "
                                                "model.safetensors)")
    p.set_defaults(fn=_cmd_export)

    p = sub.add_parser("import-ijepa", help="a checkpoint of the official I-JEPA code as an "
                                            "iwm run, for the evaluations, exports and "
                                            "model.init_from")
    p.add_argument("checkpoint", help="a .pth.tar of facebookresearch/ijepa (e.g. "
                                      "IN1K-vit.h.14-300e.pth.tar)")
    p.add_argument("overrides", nargs="*", help="the data to evaluate on and other keys, "
                                                "e.g. data.name=imagefolder:/data/imagenet "
                                                "(the model keys come from the checkpoint)")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.set_defaults(fn=_cmd_import_ijepa)

    p = sub.add_parser("embed", help="pooled target-encoder features of image files")
    p.add_argument("run", help="run directory, checkpoint or exported folder")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched "
                                             "recursively; any format Pillow reads)")
    p.add_argument("--out", required=True, help="features.npy (+ features.paths.txt) or "
                                                "features.parquet (needs pyarrow)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images encoded at once (default: 64)")
    p.add_argument("--workers", type=int, default=0, help="image decoding processes")
    _add_device(p)
    p.set_defaults(fn=_cmd_embed)

    p = sub.add_parser("shards", help="write an image folder as tar shards (WebDataset "
                                      "layout) for data.name=shards:<pattern>")
    p.add_argument("folder", help="image folder (<class>/ sub-folders, optionally in "
                                  "train/ and test/ or val/), as for imagefolder:<folder>")
    p.add_argument("out", help="new folder: gets <split>/shard-NNNNNN.tar + index.json")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="test fraction of a folder without split folders, as data.holdout")
    p.add_argument("--seed", type=int, default=0, help="of the order images are written in")
    p.set_defaults(fn=_cmd_shards)

    p = sub.add_parser("report", help="an HTML page of a run: curves, MRR, probe/finetune "
                                      "results, retrieval examples, config")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", help="output folder (default: RUN/report)")
    p.add_argument("--images", type=int, default=6, help="test images in the retrieval grid")
    p.add_argument("--bank", type=int, default=32, help="transformations ranked per image")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampled images and transformations (default: 0)")
    _add_device(p)
    p.set_defaults(fn=_cmd_report)

    p = sub.add_parser("study", help="a seeded grid of pretraining runs and evaluations, "
                                     "summarised per finding (benchmarks/paper/grid.yaml)")
    study = p.add_subparsers(dest="study_command", required=True)
    for name, fn, text in (
            ("run", _cmd_study_run, "run the grid's pending cells (finished ones are skipped, "
                                    "half-finished ones resume), then write the table"),
            ("table", _cmd_study_table, "rewrite the table, findings and plots from the "
                                        "finished cells")):
        p = study.add_parser(name, help=text)
        p.add_argument("grid", help="grid YAML, e.g. benchmarks/paper/grid.yaml")
        p.add_argument("--scale", required=True, help="a scale of the grid file, e.g. cpu")
        p.add_argument("--out", help="output folder (default: runs/study-SCALE)")
        p.set_defaults(fn=fn)
        if name == "run":
            p.add_argument("--seed", type=int, action="append",
                           help="only this seed (repeatable; default: the grid's seeds)")
            p.add_argument("--cell", action="append", help="only this cell (repeatable; "
                                                           "'baselines' for the baselines)")
            p.add_argument("--workers", type=int,
                           help="cells at once, each in its own process (default: the "
                                "scale's)")
            _add_device(p)
            p.add_argument("--no-summary", action="store_true",
                           help="do not write the table afterwards")

    _add_decoder_parsers(sub, evals)
    p = sub.add_parser("config", help="list presets, or print a resolved config")
    p.add_argument("config", nargs="?", help="preset name or YAML file")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.epochs=2")
    p.set_defaults(fn=_cmd_config)
    return parser


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, line: str | None = None) -> str:
    # Library warnings (unreadable images skipped, a damaged checkpoint passed over) are
    # messages for the user, like errors: one line, without Python's source-line echo.
    return f"iwm: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may follow options (`iwm pretrain RUN --resume train.epochs=20`),
    # which argparse does not collect into the positional list by itself.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    previous_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        args.fn(args)
    except Stopped as e:
        # Not an error, even with --debug: a requeue script must see this status.
        print(f"iwm: {e}", file=sys.stderr)
        return e.exit_code
    except IWMError as e:
        if args.debug:
            raise
        print(f"iwm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("iwm: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous_format
    return 0


if __name__ == "__main__":
    sys.exit(main())
