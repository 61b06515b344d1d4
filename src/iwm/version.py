"""The package version, in a module of its own so that any module can read it without
importing the ``iwm`` package facade (which lazily imports :mod:`iwm.api`)."""

__version__ = "0.1.0"
