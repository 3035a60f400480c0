"""The additive allocation under a size budget: what llama.cpp's `--target-size` (PR #15550) and AutoRound's
AutoScheme do without any search, as a baseline (`search.baselines: [additive]`) and a seed of size-budget studies.

Each unit's error at each of its levels is measured alone (`unit_errors`: the fitness loss with that unit at the
level and every other unit at its widest, less the loss of all at their widest; the sensitivity profile's
measurement, cached and resumable), the errors are taken to add up across units, and the allocation with the least
total error whose bytes fit under the ceiling is solved exactly as a knapsack over bytes (`knapsack`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from autocompress.sensitivity import cached_profile, measure_sensitivity, variant_label

if TYPE_CHECKING:
    from autocompress.allocation import SizeCeiling
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
    """The additive allocation under a size budget's `ceiling`: each unit's level index."""
    windows = session.config.search.profile_windows or max(1, len(session.pools.fitness) // 4)
    errors = unit_errors(session, space, windows, progress)
    units = ceiling.units
    return knapsack({unit: errors[unit] for unit in units}, ceiling.unit_bytes, ceiling.ceiling - ceiling.fixed)
