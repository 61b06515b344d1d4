"""iwm: Image World Models on a Joint-Embedding Predictive Architecture."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from iwm.version import __version__

if TYPE_CHECKING:
    from iwm.api import (
        Action,
        ActionCalibration,
        Pretrained,
        PretrainedEncoder,
        from_pretrained,
        load,
        load_encoder,
    )

__all__ = ["Action", "ActionCalibration", "Pretrained", "PretrainedEncoder",
           "from_pretrained", "load", "load_encoder", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `iwm.api` pulls in timm (and through it torch._dynamo, seconds of imports),
    # which the CLI's quick paths (`iwm config`, argument errors) should not pay for.
    if name in ("Action", "ActionCalibration", "Pretrained", "PretrainedEncoder",
                "from_pretrained", "load", "load_encoder"):
        import iwm.api

        return getattr(iwm.api, name)
    raise AttributeError(f"module 'iwm' has no attribute {name!r}")
