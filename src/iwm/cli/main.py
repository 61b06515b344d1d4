"""The ``iwm`` command line.

User errors (:class:`iwm.errors.IWMError`) print one line and exit with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from iwm.config import load_config, preset_names, resolve_config_path
from iwm.errors import IWMError


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from iwm.training.loop import load_run_config, new_run_dir, pretrain

    target = Path(args.config)
    if args.resume and target.is_dir():
        # `iwm pretrain RUN --resume`: the run directory carries its own config.
        cfg, run_dir = load_run_config(target, args.overrides), target
    else:
        cfg = load_config(args.config, args.overrides)
        run_dir = Path(args.run_dir) if args.run_dir else new_run_dir(
            cfg, resolve_config_path(args.config).stem)
        if not args.resume and (run_dir / "checkpoints").exists():
            raise IWMError(f"{run_dir} already holds a run: pass --resume to continue it, "
                           "or choose another train.run_name / --run-dir")
    pretrain(cfg, run_dir, resume=args.resume)
    print(f"run directory: {run_dir}")


def _cmd_probe(args: argparse.Namespace) -> None:
    from iwm.evaluation.probe import run_linear_probe

    result = run_linear_probe(Path(args.run), args.overrides, device=args.device)
    print(f"linear probe accuracy: {result['accuracy']:.4f} "
          f"(train {result['train_accuracy']:.4f}; {result['n_train']} train / "
          f"{result['n_test']} test images) -> {result['path']}")


def _cmd_eval_mrr(args: argparse.Namespace) -> None:
    from iwm.evaluation.mrr import run_mrr

    r = run_mrr(Path(args.run), n_images=args.images, bank_size=args.bank,
                distance=args.distance, device=args.device, seed=args.seed)
    parts = ", ".join(f"{k} {v:.3f}" for k, v in r["per_transform"].items() if v is not None)
    print(f"MRR {r['mrr']:.4f} (bank {r['bank']}, {r['n_images']} images, {r['distance']}); "
          f"per transform: {parts} -> {r['path']}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from iwm.cli.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, device=args.device)


def _cmd_config(args: argparse.Namespace) -> None:
    if args.config is None:
        print("presets: " + ", ".join(preset_names()))
        return
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iwm", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain I-JEPA / IWM from a config")
    p.add_argument("config", help="preset name (see `iwm config`), YAML file, or a run "
                                  "directory with --resume")
    p.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.epochs=2")
    p.add_argument("--run-dir", help="where to write the run (default: train.out_dir/NAME)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.set_defaults(fn=_cmd_pretrain)

    p = sub.add_parser("probe", help="linear probe of a run's frozen encoder")
    p.add_argument("run", help="run directory")
    p.add_argument("overrides", nargs="*", help="probe.* overrides, e.g. probe.train_limit=10000")
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=_cmd_probe)

    p = sub.add_parser("eval", help="evaluate a run")
    evals = p.add_subparsers(dest="evaluation", required=True)
    p = evals.add_parser("mrr", help="world-model quality: mean reciprocal rank of the "
                                     "predicted transformation")
    p.add_argument("run", help="run directory or checkpoint")
    p.add_argument("--bank", type=int, default=256, help="transformations ranked per image")
    p.add_argument("--images", type=int, default=256, help="test images to evaluate")
    p.add_argument("--distance", choices=("cosine", "l2"), default="cosine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=_cmd_eval_mrr)

    p = sub.add_parser("demo", help="the main job: pretrain a tiny IWM on Fashion-MNIST, "
                                    "probe it, summarise")
    p.add_argument("--out", default="runs/demo", help="output directory")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    p.add_argument("--device", default="auto")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("config", help="list presets, or print a resolved config")
    p.add_argument("config", nargs="?", help="preset name or YAML file")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may follow options (`iwm pretrain RUN --resume train.epochs=20`),
    # which argparse does not collect into the positional list by itself.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        args.fn(args)
    except IWMError as e:
        if args.debug:
            raise
        print(f"iwm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("iwm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
