"""Progress and notes for humans: a bar on a terminal, plain lines in a log file."""

from __future__ import annotations

import pytest

from iwm import console
from iwm.console import Progress, duration, say, track


def _lines(capsys) -> list[str]:
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout is for results
    return captured.err.splitlines()


def test_without_a_terminal_lines_come_every_tenth_and_end_with_a_newline(capsys):
    with Progress(200, "eval mrr", unit="batch") as progress:
        for _ in range(200):
            progress.update()
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n")
    lines = err.splitlines()
    assert [line.split()[4] for line in lines] == [f"{20 * i}/200" for i in range(1, 11)]
    assert lines[0].startswith("iwm: eval mrr batch 20/200 elapsed ") and " left " in lines[0]


def test_log_prints_its_fields_and_the_time_left(capsys):
    progress = Progress(400, "pretrain", unit="step", initial=100, auto=False)
    progress.update(50)  # auto=False: no line of its own
    assert _lines(capsys) == []
    progress.log({"loss": "0.1234", "lr": "1.00e-03", "img/s": "512"})
    [line] = _lines(capsys)
    assert line.startswith("iwm: pretrain step 150/400 loss 0.1234 lr 1.00e-03 img/s 512 "
                           "elapsed 0:00 left ")


def test_disabled_progress_and_notes_say_nothing(capsys, monkeypatch):
    monkeypatch.setattr(console, "stderr_is_terminal", lambda: True)
    progress = Progress(10, "x", enabled=False)
    for _ in range(10):
        progress.update()
    progress.log({"loss": "1"})
    progress.close()
    assert list(track(range(3), 3, "y", enabled=False)) == [0, 1, 2]
    say("hello", enabled=False)
    assert _lines(capsys) == []


def test_on_a_terminal_it_is_a_tqdm_bar(capsys, monkeypatch):
    monkeypatch.setattr(console, "stderr_is_terminal", lambda: True)
    with Progress(5, "finetune", unit="step") as progress:
        for _ in range(5):
            progress.update()
        progress.log({"loss": "0.5"})
    err = capsys.readouterr().err
    assert "\r" in err and "5/5" in err and "loss=0.5" in err and "iwm:" not in err


def test_track_counts_an_item_once_it_is_done(capsys):
    for i in track(range(4), 4, "probe features"):
        # Item i is being worked on: i done so far, and the line of the i-th was printed.
        done = [line.split()[4] for line in _lines(capsys)]
        assert done == ([f"{i}/4"] if i else [])
    assert [line.split()[4] for line in _lines(capsys)] == ["4/4"]


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (62.4, "1:02"), (3723, "1:02:03"),
                                           (float("inf"), "?")])
def test_durations_read_as_tqdm_writes_them(seconds, text):
    assert duration(seconds) == text
