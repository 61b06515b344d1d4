"""What iwm tells the user while it works: one-line notes and progress, on stderr.

Every message of a long command goes through here: on stderr, so that the results a
command prints on stdout stay machine-readable, and behind an ``enabled`` flag, so that a
caller can silence all of it (``train.progress=false``; the evaluations' ``progress``
arguments).

Progress is a tqdm bar when stderr is a terminal and plain lines otherwise: a bar redraws
itself with carriage returns, which in a log file (``iwm pretrain ... > log 2>&1``) is one
line of hundreds of kilobytes that no pager, ``tail`` or ``grep`` can use.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

LINE_FRACTION = 0.1
"""Without a terminal, an automatic progress line each time this fraction is done..."""
LINE_SECONDS = 60.0
"""...or when this long has passed since the last line, whichever comes first."""


def say(message: str, enabled: bool = True) -> None:
    """One line ``iwm: message`` on stderr, flushed (a log file shows it at once)."""
    if enabled:
        print(f"iwm: {message}", file=sys.stderr, flush=True)


def stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def duration(seconds: float) -> str:
    """``1:02:03`` or ``2:03``: as tqdm writes times, so both modes read alike."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(max(seconds, 0.0))), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def plus_minus(stderr: float | None, digits: int = 3) -> str:
    """`` ± 0.025`` for a standard error; nothing where there is none (one image)."""
    return "" if stderr is None else f" ± {stderr:.{digits}f}"


class Progress:
    """Progress of ``total`` units: a tqdm bar on a terminal, else plain lines.

    Without a terminal, :meth:`update` prints a line each :data:`LINE_FRACTION` of the
    total or :data:`LINE_SECONDS` (``auto=True``), and :meth:`log` prints one with its
    fields; on a terminal :meth:`log` sets the bar's postfix. A line reads
    ``iwm: DESC UNIT n/total FIELDS elapsed 0:12 left 1:48``; times count from the
    creation, the rate only what this process did (``initial`` units were done before).
    """

    def __init__(self, total: int, desc: str, *, unit: str = "batch", initial: int = 0,
                 enabled: bool = True, auto: bool = True) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.enabled = enabled
        self.auto = auto
        self._initial = initial
        self._start = self._last_line = time.perf_counter()
        self._last_share = self._share(initial)
        self._bar: tqdm | None = None
        if enabled and stderr_is_terminal():
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
                             dynamic_ncols=True, file=sys.stderr)

    def _share(self, n: int) -> int:
        return math.floor(n / max(self.total, 1) / LINE_FRACTION + 1e-9)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if not (self.enabled and self.auto):
            return
        share = self._share(self.n)
        if share > self._last_share or time.perf_counter() - self._last_line >= LINE_SECONDS:
            self._last_share = share
            self._line({})

    def log(self, fields: Mapping[str, str]) -> None:
        """Show ``fields`` (e.g. the loss): the bar's postfix, or a line now."""
        if self._bar is not None:
            self._bar.set_postfix(dict(fields))
        elif self.enabled:
            self._line(fields)

    def _line(self, fields: Mapping[str, str]) -> None:
        now = time.perf_counter()
        self._last_line = now
        elapsed = now - self._start
        done = self.n - self._initial
        left = (self.total - self.n) * elapsed / done if done > 0 else math.inf
        parts = [f"{self.desc} {self.unit} {self.n}/{self.total}",
                 *(f"{k} {v}" for k, v in fields.items()),
                 f"elapsed {duration(elapsed)}", f"left {duration(left)}"]
        say(" ".join(parts))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def track(items: Iterable[T], total: int, desc: str, *, unit: str = "batch",
          enabled: bool = True) -> Iterator[T]:
    """``items``, with a :class:`Progress` of ``total`` that counts each item once the
    consumer asks for the next one (so 100% means the last one is done)."""
    with Progress(total, desc, unit=unit, enabled=enabled) as progress:
        for item in items:
            yield item
            progress.update()


def batches_of(n_items: int, batch_size: int) -> int:
    """The number of batches of ``batch_size`` (the last one may be smaller)."""
    return math.ceil(n_items / batch_size)
