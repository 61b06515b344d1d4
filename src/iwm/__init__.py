"""iwm: Image World Models on a Joint-Embedding Predictive Architecture."""

__version__ = "0.1.0"
