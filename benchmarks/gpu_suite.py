"""Every measurement of the training step's speed and scale that needs a GPU, in one command.

    python benchmarks/gpu_suite.py --out OUT [--ijepa-repo PATH] [--only PIECE,...]
    python benchmarks/gpu_suite.py --out OUT --smoke      # the same pieces, toy sizes, CPU

Pieces, in order (each runs as its own process with a time limit; one that fails or runs
out of time is recorded with its output, and the rest still run):

  env         the device, driver and library versions
  tests       the test suite's CUDA tests (``pytest -m cuda``)
  matmul      the device's measured bf16 matmul rate: the ceiling a step works against
  throughput  ``train_throughput.py``: ViT-S/16 and ViT-B/16 at 224 px in bf16, batch 128,
              eager and compiled (images/s, step split, peak memory, FLOPs/image, MFU)
  official    ``vs_official_ijepa.py`` at ViT-B/16, 224 px, bf16, batch 128, against the
              official I-JEPA code (needs ``--ijepa-repo``, a clone of it; skipped without)
  input       the input pipeline's share (``input_wait``) while ViT-B/16 pretrains on a
              folder of ImageNet-sized JPEGs decoded by DataLoader workers
  ddp         ``torchrun`` with one process per visible GPU (NCCL): a short pretraining run

Writes ``OUT/suite.json`` (every piece's status, seconds and figures), ``OUT/suite.log``
(every command and its output) and ``OUT/summary.md``, the table it prints last. Scratch
(JSON of the scripts, the JPEG folder, runs) goes to a temporary folder, or ``--work``.
The device needs only this checkout (``src/`` is put on the children's PYTHONPATH) and the
packages of ``pyproject.toml``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
PIECES = ("env", "tests", "matmul", "throughput", "official", "input", "ddp")


class PieceFailed(Exception):
    """A command of a piece exited non-zero or ran out of time (its output is in the log)."""


@dataclass
class Sizes:
    """What the pieces run: a GPU's real sizes, or toy ones for a CPU smoke run."""

    device: str
    config: str
    batch: int
    image_size: int
    encoders: tuple[str, ...]
    compile: tuple[bool, ...]
    steps: int
    warmup: int
    matmul_size: int
    official: tuple[str, ...]
    jpegs: int
    jpeg_size: tuple[int, int]
    input_epochs: int
    workers: int
    ddp_procs: int

    @classmethod
    def gpu(cls) -> Sizes:
        import torch

        return cls(device="cuda", config="iwm-inv-vitb16", batch=128, image_size=224,
                   encoders=("vit_small", "vit_base"), compile=(False, True), steps=20,
                   warmup=5, matmul_size=8192,
                   official=("--model", "vit_base", "--image-size", "224", "--patch-size",
                             "16", "--pred-width", "384", "--batch-size", "128"),
                   jpegs=6400, jpeg_size=(500, 375), input_epochs=2,
                   workers=min(12, max(1, (os.cpu_count() or 2) - 2)),
                   ddp_procs=max(1, torch.cuda.device_count()))

    @classmethod
    def smoke(cls) -> Sizes:
        return cls(device="cpu", config="iwm-inv-tiny", batch=8, image_size=28,
                   encoders=("vit_micro",), compile=(False,), steps=2, warmup=1,
                   matmul_size=256,
                   official=("--model", "vit_tiny", "--image-size", "40", "--patch-size",
                             "4", "--pred-depth", "1", "--pred-width", "48",
                             "--batch-size", "4"),
                   jpegs=32, jpeg_size=(80, 60), input_epochs=1, workers=1, ddp_procs=2)


@dataclass
class Suite:
    out: Path
    work: Path
    sizes: Sizes
    ijepa_repo: Path | None
    deadline: float | None = None
    """``time.monotonic()`` by which every command must have ended (``--time-limit``)."""
    log: Any = None
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def save(self, name: str | None = None, partial: dict[str, Any] | None = None) -> None:
        """Write suite.json; ``partial``: the figures so far of the piece still running,
        so that a call killed from outside still returns them."""
        results = dict(self.results)
        if name is not None:
            results[name] = {"status": "running", "figures": partial}
        (self.out / "suite.json").write_text(json.dumps(results, indent=2) + "\n")

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        path = [str(REPO / "src"), str(BENCH)]
        env["PYTHONPATH"] = os.pathsep.join(path + [p for p in [env.get("PYTHONPATH")] if p])
        return env

    def run(self, cmd: list[str], timeout: float) -> str:
        """Run ``cmd`` in the repository, its output into the log; its stdout + stderr."""
        if self.left() < timeout:
            timeout = self.left()
            if timeout < 5:
                raise PieceFailed("no time left (--time-limit)")
        self.log.write(f"\n$ {' '.join(cmd)}\n")
        self.log.flush()
        try:
            done = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            self.log.write(out + f"\n[timed out after {timeout:.0f} s]\n")
            raise PieceFailed(f"timed out after {timeout:.0f} s: {' '.join(cmd[:3])} ...") \
                from None
        self.log.write(done.stdout)
        self.log.flush()
        if done.returncode != 0:
            tail = done.stdout.strip().splitlines()[-1:] or [""]
            raise PieceFailed(f"exit {done.returncode}: {tail[0][:200]}")
        return done.stdout

    def python(self, *args: str, timeout: float) -> str:
        return self.run([sys.executable, *args], timeout)


# ---------------------------------------------------------------- the pieces


def piece_env(s: Suite) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cpus": os.cpu_count()}
    for name in ("torchvision", "timm", "kornia"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpus=torch.cuda.device_count(),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    # Whether the training code imports here: a missing package (kornia, say) shows now,
    # not as every later piece failing.
    try:
        s.python("-c", "import iwm.training.loop", timeout=120)
        info["iwm_imports"] = "ok"
    except PieceFailed as e:
        info["iwm_imports"] = str(e)
    if shutil.which("nvidia-smi"):
        info["nvidia_smi"] = s.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,"
                                    "power.limit", "--format=csv,noheader"], 60).strip()
    return info


def piece_tests(s: Suite) -> dict[str, Any]:
    out = s.python("-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-o",
                   "addopts=", timeout=300)
    return {"result": out.strip().splitlines()[-1]}


def piece_matmul(s: Suite) -> dict[str, Any]:
    js = s.work / "matmul.json"
    s.python(str(BENCH / "matmul_rate.py"), "--device", s.sizes.device, "--dtype", "bf16",
             "--size", str(s.sizes.matmul_size), "--json", str(js), timeout=120)
    return json.loads(js.read_text())


def piece_throughput(s: Suite) -> dict[str, Any]:
    z = s.sizes
    measured = s.results.get("matmul", {}).get("figures", {}).get("tflops")
    runs: dict[str, Any] = {}
    failures = []
    for encoder in z.encoders:
        for compiled in z.compile:
            name = f"{encoder}{' compiled' if compiled else ''}"
            js = s.work / f"throughput-{encoder}-{int(compiled)}.json"
            try:
                s.python(str(BENCH / "train_throughput.py"), "--config", z.config,
                         "--device", z.device, "--channels", "3", "--steps", str(z.steps),
                         "--warmup", str(z.warmup), "--json", str(js),
                         f"train.batch_size={z.batch}", f"data.image_size={z.image_size}",
                         f"model.encoder={encoder}", "train.precision=bf16",
                         f"train.compile={str(compiled).lower()}", timeout=420)
            except PieceFailed as e:  # the other variants still run
                failures.append(f"{name}: {e}")
                continue
            r = json.loads(js.read_text())
            runs[name] = {k: r[k] for k in (
                "images_per_s", "step_time_ms", "step_time_ms_synced", "split",
                "peak_memory_bytes", "flops_per_image", "achieved_tflops", "peak_tflops",
                "mfu", "device_name")}
            # Against what this device's matmul reaches, beside the datasheet's peak.
            runs[name]["of_matmul_rate"] = r["achieved_tflops"] / measured if measured else None
            s.save("throughput", {"runs": runs, "failures": failures})
    if failures and not runs:
        raise PieceFailed("; ".join(failures))
    return {"runs": runs, "failures": failures}


def piece_official(s: Suite) -> dict[str, Any]:
    if s.ijepa_repo is None:
        return {"skipped": "no --ijepa-repo (a clone of facebookresearch/ijepa)"}
    js = s.work / "official.json"
    bf16 = ["--bf16"] if s.sizes.device == "cuda" else []
    variants = ["--iwm-variant", "train.compile=true"] if True in s.sizes.compile else []
    s.python(str(BENCH / "vs_official_ijepa.py"), "--ijepa-repo", str(s.ijepa_repo),
             "--device", s.sizes.device, *bf16, *s.sizes.official, "--steps",
             str(s.sizes.steps), "--warmup", str(s.sizes.warmup), "--rounds", "2",
             *variants, "--json", str(js), timeout=540)
    r = json.loads(js.read_text())
    return {k: r[k] for k in ("device_name", "precision", "images_per_s", "speedup",
                              "step_time_ms", "flops_per_image", "peak_memory_bytes")}


def write_jpeg_folder(folder: Path, n: int, size: tuple[int, int], classes: int = 8) -> None:
    """``n`` JPEGs in ``classes`` class folders: a few distinct ones written, the rest
    copies (decoding costs the same either way, and writing thousands takes minutes)."""
    from decode_throughput import write_jpegs  # sibling script

    originals = folder.parent / f"{folder.name}-distinct"
    originals.mkdir(parents=True, exist_ok=True)
    distinct = write_jpegs(originals, min(n, 64), *size)
    for i in range(n):
        target = folder / f"c{i % classes}" / f"{i:06d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(distinct[i % len(distinct)], target)
    shutil.rmtree(originals)


def pretrain_args(s: Suite, folder: Path, run: Path, config: str, image_size: int,
                  batch: int) -> list[str]:
    # holdout=0: the input pieces time every JPEG written, and a flat folder would
    # otherwise keep a tenth of them back as its test split.
    return ["pretrain", config, f"data.name=imagefolder:{folder}", "data.holdout=0",
            f"data.image_size={image_size}", f"data.num_workers={s.sizes.workers}",
            f"train.batch_size={batch}", f"train.epochs={s.sizes.input_epochs}",
            f"train.device={s.sizes.device}", "train.log_every=10", "train.progress=false",
            "train.checkpoint_every=100000", "--run-dir", str(run)]


def input_figures(run: Path) -> dict[str, Any]:
    from iwm.training.metrics import read_metrics

    rows = read_metrics(run)
    if not rows:
        raise PieceFailed(f"{run}: no metrics were logged")
    # The first interval holds the workers' start-up; the rest is the steady state.
    steady = rows[1:] or rows
    return {"steps": int(rows[-1]["step"]),
            "input_wait_first": rows[0]["input_wait"],
            "input_wait_median": statistics.median(r["input_wait"] for r in steady),
            "input_wait_max": max(r["input_wait"] for r in steady),
            "images_per_s_median": statistics.median(r["images_per_s"] for r in steady)}


def jpeg_folder(s: Suite) -> Path:
    """The pieces' image folder, written by the first that needs it."""
    folder = s.work / "jpegs"
    if not folder.is_dir():
        write_jpeg_folder(folder, s.sizes.jpegs, s.sizes.jpeg_size)
    return folder


def piece_input(s: Suite) -> dict[str, Any]:
    z = s.sizes
    run = s.work / "input-run"
    s.python("-m", "iwm.cli.main", *pretrain_args(s, jpeg_folder(s), run, z.config,
                                                  z.image_size, z.batch), timeout=540)
    return {"workers": z.workers, "images": z.jpegs, "jpeg_size": list(z.jpeg_size),
            **input_figures(run)}


def piece_ddp(s: Suite) -> dict[str, Any]:
    z = s.sizes
    run = s.work / "ddp-run"
    # The tiny preset at its own size: this checks the launch, not the model's speed.
    s.python("-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={z.ddp_procs}",
             "-m", "iwm.cli.main", *pretrain_args(s, jpeg_folder(s), run, "iwm-inv-tiny", 28,
                                                  16 * z.ddp_procs), timeout=300)
    return {"processes": z.ddp_procs, **input_figures(run)}


RUNNERS: dict[str, Callable[[Suite], dict[str, Any]]] = {
    "env": piece_env, "tests": piece_tests, "matmul": piece_matmul,
    "throughput": piece_throughput, "official": piece_official, "input": piece_input,
    "ddp": piece_ddp,
}


# ---------------------------------------------------------------- the summary


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def describe(name: str, figures: dict[str, Any]) -> list[str]:
    """Lines of the summary for one piece that ran."""
    f = figures
    if "skipped" in f:
        return [f"skipped: {f['skipped']}"]
    if name == "env":
        return [", ".join(f"{k} {v}" for k, v in f.items() if v is not None)]
    if name == "tests":
        return [f["result"]]
    if name == "matmul":
        return [f"{f['tflops']:.1f} TFLOP/s {f['dtype']} ({f['size']}^3)"]
    if name == "throughput":
        lines = [f"{run}: {r['images_per_s']:.1f} img/s, {r['step_time_ms']:.1f} ms/step, "
                 f"MFU {_pct(r['mfu'])} (of the matmul rate {_pct(r['of_matmul_rate'])}), "
                 f"{r['flops_per_image'] / 1e9:.1f} GFLOP/img, peak "
                 f"{r['peak_memory_bytes'] / 2**30:.1f} GiB, data "
                 f"{_pct(r['split']['data'])} of a synced step"
                 for run, r in f["runs"].items()]
        return lines + [f"failed: {x}" for x in f["failures"]]
    if name == "official":
        ips = f["images_per_s"]
        return [f"{f['precision']}: official {ips['official']:.1f} img/s; " + ", ".join(
            f"{k} {ips[k]:.1f} img/s ({v:.2f}x)" for k, v in f["speedup"].items())]
    if name in ("input", "ddp"):
        who = (f"{f['processes']} process(es)" if name == "ddp"
               else f"{f['workers']} workers, {f['images']} JPEGs")
        if name == "ddp" and f["processes"] == 1:
            who += " (one GPU: the launch only, no process group)"
        return [f"{who}: {f['images_per_s_median']:.1f} img/s, input_wait median "
                f"{_pct(f['input_wait_median'])} (max {_pct(f['input_wait_max'])}, first "
                f"interval {_pct(f['input_wait_first'])}) over {f['steps']} steps"]
    return [json.dumps(f)]


def summary(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| piece | status | s | figures |", "|---|---|---|---|"]
    for name, r in results.items():
        texts = describe(name, r["figures"]) if r["status"] == "ok" else [r["error"]]
        for i, text in enumerate(texts):
            lead = (name, r["status"], f"{r['seconds']:.0f}") if i == 0 else ("", "", "")
            lines.append(f"| {' | '.join(lead)} | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for suite.json, "
                   "suite.log and summary.md")
    p.add_argument("--only", default=",".join(PIECES),
                   help=f"comma-separated pieces, run in the suite's order ({', '.join(PIECES)})")
    p.add_argument("--ijepa-repo", type=Path, default=None,
                   help="a clone of the official I-JEPA code, for the `official` piece")
    p.add_argument("--work", type=Path, default=None,
                   help="scratch folder (default: a temporary one, removed afterwards)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="end every command within this many seconds of the start, and skip "
                        "the pieces there is no time left for (fit a lease's call limit)")
    p.add_argument("--smoke", action="store_true",
                   help="toy sizes on the CPU: checks that every piece runs, measures nothing")
    args = p.parse_args(argv)
    chosen = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(chosen) - set(PIECES))
    if unknown or not chosen:
        p.error(f"--only {args.only!r}: unknown pieces {unknown}; choose from "
                f"{', '.join(PIECES)}")
    args.pieces = [x for x in PIECES if x in chosen]
    if args.ijepa_repo is not None and not (args.ijepa_repo / "src" / "helper.py").is_file():
        p.error(f"--ijepa-repo {args.ijepa_repo}: not a clone of the official I-JEPA code "
                "(no src/helper.py)")
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device here: this suite measures a GPU (--smoke runs its "
                    "pieces at toy sizes on the CPU)")
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = parse_args(argv)
    sizes = Sizes.smoke() if args.smoke else Sizes.gpu()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="iwm-suite-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
        suite = Suite(out=args.out, work=work, sizes=sizes, ijepa_repo=args.ijepa_repo,
                      deadline=deadline)
        with open(args.out / "suite.log", "w") as log:
            suite.log = log
            for name in args.pieces:
                print(f"[{name}] ...", flush=True)
                start = time.perf_counter()
                if suite.left() < 30:
                    suite.results[name] = {"status": "skipped", "seconds": 0.0,
                                           "error": "no time left (--time-limit)"}
                    continue
                try:
                    entry = {"status": "ok", "figures": RUNNERS[name](suite)}
                except PieceFailed as e:
                    entry = {"status": "failed", "error": str(e)}
                except Exception as e:  # a bug in one piece must not cost the others
                    entry = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                entry["seconds"] = time.perf_counter() - start
                suite.results[name] = entry
                suite.save()
    table = summary(suite.results)
    (args.out / "summary.md").write_text(table)
    print(table)
    return suite.results


if __name__ == "__main__":
    main()
