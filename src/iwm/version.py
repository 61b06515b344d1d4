"""The package version, in a module of its own so that any module can read it without
importing the ``iwm`` package facade (which lazily imports :mod:`iwm.api`).

Read from the installed package's metadata, so it is pyproject.toml's ``version``; a
source tree put on ``sys.path`` without installing has no metadata and says so.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("iwm")
except PackageNotFoundError:
    __version__ = "0+unknown"
