"""Which rows of a global batch this process computes.

Every random draw of a training step (data order, crops, views, masks) is made for the
GLOBAL batch, identically on every process; each process then computes only its own
rows. So N processes (or N gradient-accumulation micro-batches) see exactly the samples
and transformations one process would see with the whole batch, and their token counts
agree (the context is truncated to the global batch's smallest one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypeVar

from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Part ``index`` of ``count`` equal parts of a global batch."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} is not in [0, {self.count})")

    def rows(self, local: int) -> slice:
        """This shard's rows of a global batch made of ``count`` parts of ``local`` rows."""
        return slice(self.index * local, (self.index + 1) * local)


SINGLE = Shard()
"""The whole batch in one process."""


def take_rows(params: T, rows: Tensor | slice) -> T:
    """The given rows of every tensor field of a dataclass of per-sample tensors."""
    return dataclasses.replace(params, **{  # type: ignore[type-var]
        f.name: getattr(params, f.name)[rows] for f in dataclasses.fields(params)  # type: ignore[arg-type]
        if isinstance(getattr(params, f.name), Tensor)})
