"""The study's grid file: axes of named levels, blocks of cells, scales, evaluations.

A cell picks one level on every axis; its name joins the levels
(``feature-deep-strong``). A block is a product of levels (``all`` = every level of the
axis); a scale runs the union of its blocks, in file order, without duplicates. Each
level is a list of ``key=value`` config overrides, which a scale may replace (the depth
of "deep" differs between a tiny CPU model and a GPU one). See
``benchmarks/paper/grid.yaml`` for the paper's grid and ``docs/study.md`` for the format.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from iwm.config import load_config
from iwm.errors import ConfigError


@dataclass(frozen=True)
class Cell:
    """One pretraining configuration of the grid (run once per seed)."""

    name: str
    levels: dict[str, str]
    """Axis -> level, e.g. ``{"conditioning": "feature", "depth": "deep", ...}``."""
    preset: str
    overrides: tuple[str, ...]

    def fingerprint(self) -> str:
        """Identifies what the cell trains: a finished cell with another fingerprint is
        stale (the grid file changed), and is never silently reused."""
        text = json.dumps([self.preset, list(self.overrides)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Evaluations:
    """What every cell measures after pretraining, and its budget."""

    mrr_images: int = 128
    mrr_bank: int = 64
    probe: tuple[str, ...] = ()
    """Overrides for the linear probe (``probe.*``)."""
    finetune: tuple[str, ...] = ()
    """Overrides for predictor finetuning, pretrained vs. random predictor (``finetune.*``)."""
    multitask_tasks: tuple[str, ...] = ()
    """Data sets for multitask predictor tuning vs. separate predictors (empty: skipped)."""
    multitask_roles: tuple[str, ...] = ()
    """Roles (see :attr:`Study.roles`) of the cells that run the multitask evaluation."""


@dataclass(frozen=True)
class Scale:
    name: str
    preset: str
    overrides: tuple[str, ...]
    blocks: tuple[str, ...]
    evaluations: Evaluations
    workers: int = 1
    """Cells run at once, each in its own process."""
    threads: int = 0
    """Torch CPU threads per worker process (0: leave torch's default)."""
    levels: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    """Per-scale replacements of axis levels' overrides."""


@dataclass(frozen=True)
class Study:
    seeds: tuple[int, ...]
    axes: dict[str, dict[str, tuple[str, ...]]]
    """Axis -> level -> overrides, in file order."""
    blocks: dict[str, dict[str, tuple[str, ...]]]
    """Block -> axis -> levels."""
    roles: dict[str, str]
    """Named cells the findings refer to: ``invariant``, ``equivariant``, ``ijepa``."""
    scales: dict[str, Scale]
    source: str = "<dict>"

    def scale(self, name: str) -> Scale:
        if name not in self.scales:
            raise ConfigError(f"--scale {name!r}: {self.source} defines "
                              f"{', '.join(self.scales)}")
        return self.scales[name]

    def cells(self, scale: str) -> list[Cell]:
        """The scale's cells, in file order, each built (and so validated) once."""
        s = self.scale(scale)
        cells: dict[str, Cell] = {}
        for block in s.blocks:
            choices = self.blocks[block]
            for combo in itertools.product(*(choices[axis] for axis in self.axes)):
                levels = dict(zip(self.axes, combo, strict=True))
                name = "-".join(combo)
                if name in cells:
                    continue
                overrides = [*s.overrides]
                for axis, level in levels.items():
                    overrides += s.levels.get(axis, {}).get(level, self.axes[axis][level])
                cells[name] = Cell(name, levels, s.preset, tuple(overrides))
        for cell in cells.values():
            try:
                load_config(cell.preset, list(cell.overrides))
            except ConfigError as e:
                raise ConfigError(f"{self.source}: cell {cell.name} (scale {scale}): {e}") from None
        return list(cells.values())

    def role_cell(self, role: str) -> str | None:
        return self.roles.get(role)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(str(v) for v in value)


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _check_keys(data: dict, allowed: set[str], where: str) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                          f"allowed: {', '.join(sorted(allowed))}")


def _evaluations(data: dict, where: str) -> Evaluations:
    _check_keys(data, {"mrr", "probe", "finetune", "multitask"}, where)
    mrr = _mapping(data.get("mrr", {}), f"{where}.mrr")
    _check_keys(mrr, {"images", "bank"}, f"{where}.mrr")
    multitask = _mapping(data.get("multitask", {}), f"{where}.multitask")
    _check_keys(multitask, {"tasks", "roles"}, f"{where}.multitask")
    return Evaluations(
        mrr_images=int(mrr.get("images", 128)), mrr_bank=int(mrr.get("bank", 64)),
        probe=_strings(data.get("probe", []), f"{where}.probe"),
        finetune=_strings(data.get("finetune", []), f"{where}.finetune"),
        multitask_tasks=_strings(multitask.get("tasks", []), f"{where}.multitask.tasks"),
        multitask_roles=_strings(multitask.get("roles", []), f"{where}.multitask.roles"))


def parse_study(data: dict, source: str = "<dict>") -> Study:
    """Validate a grid file's contents; every mistake is a :class:`ConfigError` naming it."""
    data = _mapping(data, source)
    _check_keys(data, {"seeds", "axes", "blocks", "roles", "scales"}, source)
    for key in ("axes", "blocks", "scales"):
        if key not in data:
            raise ConfigError(f"{source}: missing '{key}'")
    seeds = tuple(int(s) for s in _strings(data.get("seeds", [0]), f"{source}: seeds"))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{source}: seeds must be a non-empty list without repeats")
    axes: dict[str, dict[str, tuple[str, ...]]] = {}
    for axis, levels in _mapping(data["axes"], f"{source}: axes").items():
        levels = _mapping(levels, f"{source}: axes.{axis}")
        if not levels:
            raise ConfigError(f"{source}: axes.{axis} has no levels")
        axes[axis] = {str(lv): _strings(o, f"{source}: axes.{axis}.{lv}")
                      for lv, o in levels.items()}
    blocks: dict[str, dict[str, tuple[str, ...]]] = {}
    for block, choice in _mapping(data["blocks"], f"{source}: blocks").items():
        choice = _mapping(choice, f"{source}: blocks.{block}")
        _check_keys(choice, set(axes), f"{source}: blocks.{block}")
        picked = {}
        for axis, levels in axes.items():
            if axis not in choice:
                raise ConfigError(f"{source}: blocks.{block} picks no level of axis '{axis}' "
                                  "(list some, or write 'all')")
            want = tuple(levels) if choice[axis] == "all" else _strings(
                choice[axis], f"{source}: blocks.{block}.{axis}")
            for level in want:
                if level not in levels:
                    raise ConfigError(f"{source}: blocks.{block}.{axis}: unknown level "
                                      f"{level!r}; the axis has {', '.join(levels)}")
            picked[axis] = want
        blocks[block] = picked
    roles = {str(k): str(v) for k, v in _mapping(data.get("roles", {}),
                                                  f"{source}: roles").items()}
    scales = {}
    for name, s in _mapping(data["scales"], f"{source}: scales").items():
        where = f"{source}: scales.{name}"
        s = _mapping(s, where)
        _check_keys(s, {"preset", "overrides", "blocks", "evaluate", "workers", "threads",
                        "levels"}, where)
        if "preset" not in s:
            raise ConfigError(f"{where}: missing 'preset'")
        scale_blocks = _strings(s.get("blocks", list(blocks)), f"{where}.blocks")
        for b in scale_blocks:
            if b not in blocks:
                raise ConfigError(f"{where}.blocks: unknown block {b!r}; "
                                  f"defined: {', '.join(blocks)}")
        levels = {}
        for axis, replaced in _mapping(s.get("levels", {}), f"{where}.levels").items():
            if axis not in axes:
                raise ConfigError(f"{where}.levels: unknown axis {axis!r}")
            replaced = _mapping(replaced, f"{where}.levels.{axis}")
            for level in replaced:
                if level not in axes[axis]:
                    raise ConfigError(f"{where}.levels.{axis}: unknown level {level!r}")
            levels[axis] = {str(lv): _strings(o, f"{where}.levels.{axis}.{lv}")
                            for lv, o in replaced.items()}
        workers, threads = int(s.get("workers", 1)), int(s.get("threads", 0))
        if workers < 1 or threads < 0:
            raise ConfigError(f"{where}: workers must be >= 1 and threads >= 0")
        scales[name] = Scale(name, str(s["preset"]), _strings(s.get("overrides", []), where),
                             scale_blocks, _evaluations(_mapping(s.get("evaluate", {}), where),
                                                        f"{where}.evaluate"),
                             workers, threads, levels)
    study = Study(seeds, axes, blocks, roles, scales, source)
    for scale in scales:
        names = {c.name for c in study.cells(scale)}
        for role in study.scales[scale].evaluations.multitask_roles:
            if role not in roles:
                raise ConfigError(f"{source}: scales.{scale}.evaluate.multitask.roles: "
                                  f"unknown role {role!r}; roles: {', '.join(roles)}")
        for role, cell in roles.items():
            if cell not in names:
                raise ConfigError(f"{source}: roles.{role} = {cell!r} is not a cell of scale "
                                  f"{scale}; its cells: {', '.join(sorted(names))}")
    return study


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {path} does not exist (the paper's grid is "
                          "benchmarks/paper/grid.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_study(data, str(path))
