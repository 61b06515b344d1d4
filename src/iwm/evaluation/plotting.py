"""Matplotlib for the evaluations' figures, the one way they get it."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend.

    Agg: figures are written on servers without a display. Imported lazily because
    matplotlib is slow to import and only the commands that draw need it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
