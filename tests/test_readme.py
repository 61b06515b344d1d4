"""The README's examples run: its Python blocks, in order, and its `iwm export` / `iwm embed`
lines, against a tiny run at the path the README uses."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from conftest import write_image
from iwm.cli.main import main
from tiny_run import make_tiny_run

README = Path(__file__).resolve().parents[1] / "README.md"
RUN = "runs/first"  # the run the README's Python examples load
INTEROP_RUN = "runs/inv"  # the one its command-line and interop lines use
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
# Quick commands on an existing run; the others (pretrain, demo, ...) are tested elsewhere.
RUNNABLE = ("iwm export ", "iwm embed ")


def blocks() -> list[tuple[str, str]]:
    return BLOCK.findall(README.read_text())


def test_readme_opens_with_the_two_commands_and_links_the_docs():
    text = README.read_text()
    assert "make demo   # creates .venv" in text and "make test   # creates .venv" in text
    for page in ("configs", "data", "evaluation", "distributed", "RESULTS", "method"):
        link = f"docs/{page}.md"
        assert f"({link})" in text and (README.parent / link).is_file(), link


def test_readme_examples_run(tmp_path, monkeypatch):
    code = [c for lang, c in blocks() if lang == "python"]
    assert code and RUN in code[0], f"the README's first Python example must load {RUN!r}"
    for name in (RUN, INTEROP_RUN):
        run = make_tiny_run(tmp_path / "work" / Path(name).name)
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        run.rename(tmp_path / name)
    write_image(tmp_path / "photos" / "a.png", np.full((40, 30, 3), 90, dtype=np.uint8))
    monkeypatch.chdir(tmp_path)

    namespace: dict = {}
    for lang, text in blocks():
        if lang == "python":
            exec(compile(text, str(README), "exec"), namespace)
            continue
        for line in text.splitlines():
            if line.startswith(RUNNABLE):
                args = shlex.split(line.split("#")[0])[1:]
                assert main(args) == 0, line
    assert Path("exported/inv-timm/model.safetensors").is_file()
    assert np.load("features.npy").shape[0] == 1


@pytest.mark.parametrize("lang, text", [b for b in blocks() if b[0] == "python"])
def test_python_blocks_compile(lang, text):
    compile(text, str(README), "exec")


def test_readme_pretrain_lines_are_valid_and_their_run_names_distinct():
    # Every `iwm pretrain PRESET key=value ...` line resolves (a typo in a key fails here),
    # and no two of them write the same run directory.
    from iwm.config import load_config

    names = []
    for _lang, text in blocks():
        for line in text.splitlines():
            words = shlex.split(line.split("#")[0])
            if words[:2] != ["iwm", "pretrain"] or words[2].startswith("runs/"):
                continue
            options = [i for i, w in enumerate(words) if w.startswith("-")]
            overrides = words[3:options[0] if options else None]
            cfg = load_config(words[2], overrides)
            names.append(cfg.train.run_name)
    assert len(names) >= 2 and len(set(names)) == len(names), names
