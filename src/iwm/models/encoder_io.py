"""Checks on state dicts before loading them, so mismatches get a readable error."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


def state_shapes_mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Tensor],
                          limit: int = 5) -> str:
    """A short description of missing, unexpected and differently shaped keys ('' if none)."""
    problems = []
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k}: {tuple(found[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items()
              if k in found and tuple(found[k].shape) != tuple(v.shape)]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            problems.append(f"{label}: {', '.join(items[:limit])}{more}")
    return "; ".join(problems)
