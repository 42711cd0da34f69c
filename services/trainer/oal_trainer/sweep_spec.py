"""A sweep file: a grid of training runs (cells x seeds x overrides), validated before anything runs.

    # benchmarks/sweeps/example.toml
    preset = "demo"
    seeds = [0, 1, 2, 3, 4]
    set = { shards = "runs/demo/shards/JOB", teacher_run = "runs/demo/teacher" }

    [cells.ce]
    recipe = "ce"

    [cells.oal]
    recipe = "oal"
    init = "ce"                                # init_from = the `ce` run of the same seed
    vary = { w_club_emb = [0.03, 0.1, 0.3] }   # three cells: oal-w_club_emb0.03, ...

A run is one (cell, seed). Its seed is the cell's `seed` config field; which seed of a referenced
cell it starts from is the same seed unless the cell pins `init_seed` / `teacher_seed`, so a sweep
can hold the `ce` init fixed and vary only the fine-tuning seed (or the reverse) and tell the two
sources of noise apart (docs/TRAINER.md, Sweeps).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from oal_shared.errors import ConfigError
from oal_trainer.recipes import PRESET_OVERRIDES, PRESETS, RECIPE_OVERRIDES, RECIPES, TrainConfig

CELL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
#: Config keys a sweep sets itself; a cell may not set them through `set`.
SWEEP_OWNED_KEYS = frozenset({"seed", "init_from", "teacher_run", "recipe", "preset"})


class SweepCell(BaseModel):
    """One row of the grid: a recipe, its overrides, and which other cells it starts from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe: str = Field(description="Recipe name (ce, kd, oal, oal-energy, latent-energy, pixel-oe).")
    set: dict[str, Any] = Field(default_factory=dict, description="Config overrides of this cell.")
    vary: dict[str, list[Any]] = Field(
        default_factory=dict, description="Config key -> values; the cell expands to their product."
    )
    init: str | None = Field(None, description="Cell whose finished run starts the student (init_from).")
    teacher: str | None = Field(None, description="Cell whose finished run is the teacher (teacher_run).")
    init_seed: int | None = Field(None, ge=0, description="Seed of the init cell's run; this run's seed if null.")
    teacher_seed: int | None = Field(None, ge=0, description="Seed of the teacher cell's run; own seed if null.")
    seeds: list[int] | None = Field(None, description="Seeds of this cell; the sweep's seeds if null.")

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, value: str) -> str:
        if value not in RECIPES:
            raise ValueError(f"unknown recipe {value!r}; known recipes: {', '.join(RECIPES)}")
        return value

    @field_validator("vary")
    @classmethod
    def _non_empty_values(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in value.items():
            if not values:
                raise ValueError(f"vary.{key} must list at least one value")
        return value


class SweepSpec(BaseModel):
    """The whole sweep file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str | None = Field(None, description="Preset of every run (smoke, demo, full).")
    seeds: list[int] = Field(min_length=1, description="Seeds every cell runs with, unless it lists its own.")
    set: dict[str, Any] = Field(default_factory=dict, description="Config overrides of every cell.")
    cells: dict[str, SweepCell] = Field(min_length=1, description="Cells by name, run in dependency order.")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; known presets: {', '.join(PRESETS)}")
        return value

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or any(seed < 0 for seed in value):
            raise ValueError("seeds must be distinct non-negative integers")
        return value

    @model_validator(mode="after")
    def _names_and_references(self) -> SweepSpec:
        for name, cell in self.cells.items():
            if not CELL_NAME.match(name):
                raise ValueError(f"cells.{name}: a cell name is letters, digits, . _ - (a folder name)")
            for role in ("init", "teacher"):
                target = getattr(cell, role)
                if target is not None and target not in self.cells:
                    raise ValueError(f"cells.{name}.{role}: no cell named {target!r}")
                if target is not None and self.cells[target].vary:
                    raise ValueError(f"cells.{name}.{role}: cell {target!r} has `vary`; refer to one run, not a grid")
            for key in (*cell.set, *cell.vary):
                if key in SWEEP_OWNED_KEYS:
                    raise ValueError(f"cells.{name}: {key} is set by the sweep (use seeds/init/teacher)")
        for key in self.set:
            if key in SWEEP_OWNED_KEYS:
                raise ValueError(f"set.{key}: set by the sweep (use seeds/init/teacher)")
        return self


class SweepRun(BaseModel):
    """One resolved (cell, seed): its config, its folder and the runs it needs first."""

    model_config = ConfigDict(frozen=True)

    cell: str
    seed: int
    config: TrainConfig
    needs: tuple[tuple[str, int], ...]  # (cell, seed) of init and teacher runs

    @property
    def key(self) -> tuple[str, int]:
        return (self.cell, self.seed)

    def run_dir(self, out: Path) -> Path:
        return out / self.cell / f"seed-{self.seed}"


def read_sweep_file(path: Path) -> SweepSpec:
    """Parse a .toml or .json sweep file; errors name the file and the key at fault."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"sweep file {path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ConfigError(f"sweep file {path}: not valid {kind} ({exc})") from exc
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise ConfigError(f"sweep file {path}: {where}: {first['msg'].removeprefix('Value error, ')}") from exc


def _value_label(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))


def expand_cells(spec: SweepSpec) -> dict[str, tuple[str, SweepCell]]:
    """Cell name -> (name in the file, cell with `vary` folded into `set`), in file order."""
    expanded: dict[str, tuple[str, SweepCell]] = {}
    for name, cell in spec.cells.items():
        if not cell.vary:
            expanded[name] = (name, cell)
            continue
        keys = list(cell.vary)
        for values in itertools.product(*(cell.vary[key] for key in keys)):
            label = "-".join(f"{key}{_value_label(value)}" for key, value in zip(keys, values, strict=True))
            fixed = cell.model_copy(update={"set": {**cell.set, **dict(zip(keys, values, strict=True))}, "vary": {}})
            expanded[f"{name}-{label}"] = (name, fixed)
    return expanded


def resolve_runs(spec: SweepSpec, out: Path) -> list[SweepRun]:
    """Every run of the sweep with its full TrainConfig, in an order where each run follows its needs."""
    cells = expand_cells(spec)
    runs: dict[tuple[str, int], SweepRun] = {}
    for cell_name, (_, cell) in cells.items():
        for seed in cell.seeds or spec.seeds:
            needs: list[tuple[str, int]] = []
            values: dict[str, Any] = {**spec.set, **cell.set, "seed": seed}
            for role, pinned, key in (
                ("init", cell.init_seed, "init_from"),
                ("teacher", cell.teacher_seed, "teacher_run"),
            ):
                target = getattr(cell, role)
                if target is None:
                    continue
                target_seed = seed if pinned is None else pinned
                target_seeds = spec.cells[target].seeds or spec.seeds
                if target_seed not in target_seeds:
                    raise ConfigError(
                        f"cells.{cell_name}.{role}: cell {target!r} has no run with seed {target_seed} "
                        f"(its seeds: {target_seeds}); pin {role}_seed or add the seed"
                    )
                needs.append((target, target_seed))
                values[key] = str(out / target / f"seed-{target_seed}")
            runs[(cell_name, seed)] = SweepRun(
                cell=cell_name, seed=seed, config=_run_config(cell_name, cell, spec.preset, values), needs=tuple(needs)
            )
    return _dependency_order(runs)


def _run_config(cell_name: str, cell: SweepCell, preset: str | None, values: dict[str, Any]) -> TrainConfig:
    # The same layers as `oal-train fit` (recipes.resolve_config), validated once with everything in.
    layers: dict[str, Any] = {"recipe": cell.recipe, **RECIPE_OVERRIDES[cell.recipe]}
    if preset is not None:
        layers.update({"preset": preset, **PRESET_OVERRIDES[preset][cell.recipe]})
    unknown = [key for key in values if key not in TrainConfig.model_fields]
    if unknown:
        raise ConfigError(f"cells.{cell_name}: unknown config key {unknown[0]!r}")
    try:
        return TrainConfig.model_validate({**layers, **values})
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first["loc"])
        where = f"{loc}: " if loc else ""  # cross-field checks have no location
        raise ConfigError(f"cells.{cell_name}: {where}{first['msg'].removeprefix('Value error, ')}") from exc


def _dependency_order(runs: dict[tuple[str, int], SweepRun]) -> list[SweepRun]:
    ordered: list[SweepRun] = []
    state: dict[tuple[str, int], str] = {}

    def visit(key: tuple[str, int], path: tuple[tuple[str, int], ...]) -> None:
        if state.get(key) == "done":
            return
        if state.get(key) == "visiting":
            cycle = " -> ".join(f"{cell}/seed-{seed}" for cell, seed in (*path, key))
            raise ConfigError(f"cells: the runs depend on each other in a cycle: {cycle}")
        state[key] = "visiting"
        for need in runs[key].needs:
            visit(need, (*path, key))
        state[key] = "done"
        ordered.append(runs[key])

    for key in runs:
        visit(key, ())
    return ordered
