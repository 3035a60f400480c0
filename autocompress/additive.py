"""The additive allocation under a size budget: what llama.cpp's `--target-size` (PR #15550) and AutoRound's
AutoScheme do without any search, as a baseline (`search.baselines: [additive]`) and a seed of size-budget studies.

Each unit's error at each of its levels is measured alone (`unit_errors`: the fitness loss with that unit at the
level and every other unit at its widest, less the loss of all at their widest; the sensitivity profile's
measurement, cached and resumable), the errors are taken to add up across units, and the allocation with the least
total error whose bytes fit under the ceiling is solved exactly as a knapsack over bytes (`knapsack`).

With block shapes in the space (`search.structure`, a `StructuredCeiling`), each decoder block is one more unit of
the knapsack, its levels the block's shapes: every combination of its FFN width and key/value groups, and its
removal where offered. A shape's error is measured alone too (that block alone at it, every other block at the
teacher's shape, every unit at its widest level), a combination's taken as the sum of its width's and its groups'.
Bytes no longer add up: a block's bytes are its shape times its units' types. They are linearized at the teacher's
shapes with every unit at its first level (`structured_bytes`): a unit's level counted at the teacher's shapes, a
shape's saving at the first levels. A narrower tensor at a wider type saves more than that, so the sum overstates a
plan's bytes, except where a narrower row makes llama.cpp fall back to a wider type (q4_k to q5_0). The knapsack's
plan is therefore moved under the ceiling by the exact size where it is over, and its units raised while it fits
(`StructuredCeiling.fitted_and_filled`): the seed is always a plan under the ceiling, and the knapsack's whenever the
linearization holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import product
from typing import TYPE_CHECKING

import numpy as np

from autocompress.sensitivity import cached_profile, measure_sensitivity, variant_label

if TYPE_CHECKING:
    from autocompress.allocation import SizeCeiling, StructuredCeiling
    from autocompress.search.space import SearchSpace
    from autocompress.session import CompressionSession

# The knapsack's capacity in cells: bytes are counted exactly while the room under the ceiling is at most this many
# bytes, else in cells of ceil(room / MAX_CELLS) bytes, each unit's bytes rounded up (so the result still fits).
MAX_CELLS = 200_000


def knapsack(
    errors: Mapping[str, Sequence[float]], unit_bytes: Mapping[str, Sequence[int]], room: int
) -> dict[str, int]:
    """The level index of each unit that minimizes the summed error with the summed bytes at most `room`, by dynamic
    programming over bytes; each unit's level 0 costs 0 bytes (bytes are counted above it, as `SizeCeiling` does).
    Exact over bytes when `room` <= MAX_CELLS, else over cells of bytes rounded up."""
    if room < 0:
        raise ValueError(f"no allocation fits: {-room:,} bytes over the ceiling with every unit at its smallest level")
    cell = max(1, math.ceil(room / MAX_CELLS))
    cells = room // cell
    best = np.zeros(cells + 1)  # least error within c cells, over the units so far
    choices = []
    for unit, unit_errors in errors.items():
        weights = [math.ceil(size / cell) for size in unit_bytes[unit]]
        if weights[0] != 0:
            raise ValueError(f"{unit}: bytes are counted above its first level, which must cost 0")
        new = np.full(cells + 1, np.inf)
        choice = np.zeros(cells + 1, dtype=np.int16)
        for index, (weight, error) in enumerate(zip(weights, unit_errors, strict=True)):
            if weight > cells:
                continue
            candidate = np.full(cells + 1, np.inf)
            candidate[weight:] = best[: cells + 1 - weight] + error
            better = candidate < new
            new[better], choice[better] = candidate[better], index
        best = new
        choices.append((unit, weights, choice))
    allocation, capacity = {}, int(np.argmin(best))
    for unit, weights, choice in reversed(choices):
        index = int(choice[capacity])
        allocation[unit] = index
        capacity -= weights[index]
    return {unit: allocation[unit] for unit in errors}


def unit_errors(
    session: CompressionSession, space: SearchSpace, windows: int, progress: bool = False
) -> dict[str, list[float]]:
    """Per unit, the fitness-loss increase at each of its levels (fewest bits first) when it alone takes the level
    and every other unit keeps its widest one, on the first `windows` fitness windows. Cached in the session's cache
    folder and extended unit by unit, so an interrupted measurement resumes."""
    key = space.precision_key
    base = {f"{unit}.{key}": space.levels_of(unit)[-1] for unit in space.units}
    key_fields = {
        "kind": "additive",
        "levels": {unit: list(space.levels_of(unit)) for unit in space.units},
        "windows": windows,
        "loss": session.config.search.loss,
        "compression": session.config.compression.model_dump(mode="json"),
    }
    stored, save = cached_profile(session.cache_dir, "additive", key_fields)

    def variants(unit: str) -> list[dict[str, str | int]]:
        return [{key: level} for level in space.levels_of(unit)[:-1]]  # the widest is the base: 0

    measure_sensitivity(session, space, base, variants, windows, stored, save, progress, "additive error profile")
    return {
        unit: [stored["values"][unit][variant_label({key: level})] for level in space.levels_of(unit)[:-1]] + [0.0]
        for unit in space.units
    }


def additive_allocation(
    session: CompressionSession, space: SearchSpace, ceiling: SizeCeiling, progress: bool = False
) -> dict[str, int]:
    """The additive allocation under a size budget's `ceiling`: each unit's level index (and, with block shapes,
    each structural parameter's)."""
    from autocompress.allocation import StructuredCeiling

    windows = session.config.search.profile_windows or max(1, len(session.pools.fitness) // 4)
    errors = unit_errors(session, space, windows, progress)
    if isinstance(ceiling, StructuredCeiling):
        return structured_allocation(session, space, ceiling, errors, windows, progress)
    units = ceiling.units
    return knapsack({unit: errors[unit] for unit in units}, ceiling.unit_bytes, ceiling.ceiling - ceiling.fixed)


Shape = dict[str, object]  # a block's structural parameters ({block}.ffn, .kv_groups, .removed) and their values
SHAPE_UNIT = "{block}.shape"  # a block's shape as a unit of the knapsack (a unit of granularity block is the block)


def block_shapes(space: SearchSpace) -> dict[str, list[Shape]]:
    """Per decoder block with a choice, its shapes as values of its structural parameters: every FFN width with
    every key/value group count (the teacher's for a dimension without a choice), and the block removed where that is
    offered (its width and groups then the teacher's: they mean nothing)."""
    teacher = space.teacher_structure_params()
    per_block: dict[str, dict[str, list]] = {}
    for param, values in space.structure_choices.items():
        block, _, field = param.rpartition(".")
        per_block.setdefault(block, {})[field] = values
    shapes = {}
    for block, choices in per_block.items():
        kept = {f"{block}.{field}": teacher[f"{block}.{field}"] for field in choices}
        sizing = [field for field in ("ffn", "kv_groups") if field in choices]
        resized = [
            kept | {f"{block}.{field}": value for field, value in zip(sizing, values, strict=True)}
            for values in product(*(choices[field] for field in sizing))
        ]
        shapes[block] = resized + ([kept | {f"{block}.removed": True}] if "removed" in choices else [])
    return shapes


def shape_errors(
    session: CompressionSession, space: SearchSpace, windows: int, progress: bool = False
) -> dict[str, dict[str, float]]:
    """Per decoder block with a choice, the fitness-loss increase of each value of its structural parameters other
    than the teacher's (by `variant_label({field: value})`) when that block alone takes it, every other block the
    teacher's shape and every unit its widest level, on the first `windows` fitness windows; cached and resumed as
    `unit_errors`."""
    key = space.precision_key
    teacher = space.teacher_structure_params()
    base = {f"{unit}.{key}": space.levels_of(unit)[-1] for unit in space.units} | teacher
    variants: dict[str, list[dict[str, object]]] = {}
    for param, values in space.structure_choices.items():
        block, _, field = param.rpartition(".")
        variants.setdefault(block, []).extend({field: value} for value in values if value != teacher[param])
    key_fields = {
        "kind": "additive-structure",
        "levels": {unit: list(space.levels_of(unit)) for unit in space.units},
        "choices": space.structure_choices,
        "structure": session.config.search.structure.model_dump(mode="json"),
        "windows": windows,
        "loss": session.config.search.loss,
        "compression": session.config.compression.model_dump(mode="json"),
    }
    stored, save = cached_profile(session.cache_dir, "additive-structure", key_fields)
    desc = "additive shape profile"
    measure_sensitivity(session, space, base, variants.get, windows, stored, save, progress, desc, list(variants))
    return {block: stored["values"][block] for block in variants}


def shape_error(errors: Mapping[str, float], shape: Shape, teacher: Mapping[str, object]) -> float:
    """A block shape's error (`errors`: the block's, from `shape_errors`): its removal's, else the sum of its width's
    and its groups' (the teacher's add nothing)."""
    if any(param.endswith(".removed") and value for param, value in shape.items()):
        return errors[variant_label({"removed": True})]
    return sum(
        errors[variant_label({param.rpartition(".")[2]: value})]
        for param, value in shape.items()
        if value != teacher[param]
    )


def structured_bytes(
    ceiling: StructuredCeiling, shapes: Mapping[str, Sequence[Shape]]
) -> tuple[int, dict[str, list[int]], dict[str, list[Shape]]]:
    """The bytes of a plan linearized at the teacher's shapes with every unit at its first level, as `knapsack` counts
    them: the fixed bytes, and each unit's and each block's (`SHAPE_UNIT`) bytes above its smallest level; and each
    block's shapes smallest first (the order of its levels there). A unit's level adds what it adds at the teacher's
    shapes, a block's shape what it adds with every unit at its first level."""
    base = {unit: 0 for unit in ceiling.units if unit not in ceiling.shapes}
    base |= {param: len(ceiling.levels[param]) - 1 for param in ceiling.shapes}  # the teacher's shapes
    base_total = ceiling.total(base)
    unit_bytes = {
        unit: [ceiling.total(base | {unit: index}) - base_total for index in range(len(ceiling.levels[unit]))]
        for unit in base
        if unit not in ceiling.shapes
    }
    fixed, ordered = base_total, {}
    for block, options in shapes.items():
        added = sorted(
            ((ceiling.total(base | shape_indices(ceiling, shape)) - base_total, shape) for shape in options),
            key=lambda item: item[0],
        )
        fixed += added[0][0]
        unit_bytes[SHAPE_UNIT.format(block=block)] = [size - added[0][0] for size, _ in added]
        ordered[block] = [shape for _, shape in added]
    return fixed, unit_bytes, ordered


def shape_indices(ceiling: StructuredCeiling, shape: Shape) -> dict[str, int]:
    """A block's shape as the index of each of its structural parameters' values in `ceiling`."""
    return {param: ceiling.levels[param].index(value) for param, value in shape.items()}


def structured_allocation(
    session: CompressionSession,
    space: SearchSpace,
    ceiling: StructuredCeiling,
    errors: Mapping[str, Sequence[float]],
    windows: int,
    progress: bool = False,
) -> dict[str, int]:
    """The additive allocation over units and block shapes (see the module's notes): the knapsack over the
    linearized bytes, then moved under the ceiling by the exact size and its units raised while it fits."""
    measured = shape_errors(session, space, windows, progress)
    fixed, unit_bytes, shapes = structured_bytes(ceiling, block_shapes(space))
    teacher = space.teacher_structure_params()
    all_errors = {unit: list(errors[unit]) for unit in space.units}
    for block, options in shapes.items():
        all_errors[SHAPE_UNIT.format(block=block)] = [shape_error(measured[block], shape, teacher) for shape in options]
    chosen = knapsack(all_errors, unit_bytes, max(0, ceiling.ceiling - fixed))
    allocation = {unit: chosen[unit] for unit in space.units}
    for block, options in shapes.items():
        allocation |= shape_indices(ceiling, options[chosen[SHAPE_UNIT.format(block=block)]])
    return ceiling.fitted_and_filled(allocation)
