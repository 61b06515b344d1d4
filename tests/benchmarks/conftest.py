"""Fixtures of the benchmark scripts' tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ijepa_stand_in import forget_stand_in, write_stand_in


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[Path]:
    """A stand-in clone of the official I-JEPA code (see ijepa_stand_in.py)."""
    yield write_stand_in(tmp_path / "ijepa")
    forget_stand_in()
