"""Seeded study grids (``iwm study``): the paper's findings as runs, a table and verdicts."""
