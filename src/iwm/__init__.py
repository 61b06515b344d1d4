"""iwm: Image World Models on a Joint-Embedding Predictive Architecture."""

from iwm.api import Pretrained, load

__all__ = ["Pretrained", "load", "__version__"]
__version__ = "0.1.0"
