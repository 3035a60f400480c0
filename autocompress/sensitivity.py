"""Per-unit sensitivity: how far the model moves when one unit alone takes a level and every other unit keeps the
base plan's. One measurement serves the sensitivity-based allocation (a profile per level, at a budget) and the
report's sensitivity plot (each unit alone at the space's most aggressive level)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from autocompress.files import write_text_atomically
from autocompress.record import record_sensitivity

if TYPE_CHECKING:
    import optuna

    from autocompress.config import Config
    from autocompress.record import StudyRecord
    from autocompress.search.space import Params, SearchSpace
    from autocompress.session import CompressionSession

Variant = Mapping[str, float | int | str]  # the fields a unit takes, e.g. {"sparsity": 0.5, "bits": 3}


def variant_label(variant: Variant) -> str:
    return ",".join(f"{field}={value!r}" for field, value in sorted(variant.items()))


def cached_profile(
    cache_dir: Path | str | None, kind: str, key_fields: Mapping[str, Any]
) -> tuple[dict, Callable[[dict], None]]:
    """A profile measured before, read from `profiles/<kind>-<digest of key_fields>.json` under `cache_dir` (a new,
    empty one otherwise), and the function that saves it there as it grows; without a cache nothing is kept."""
    digest = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    path = None if cache_dir is None else Path(cache_dir) / "profiles" / f"{kind}-{digest}.json"
    stored: dict = {"key": dict(key_fields), "base": None, "values": {}}
    if path is not None and path.is_file():
        stored = json.loads(path.read_text())

    def save(profile: dict) -> None:
        if path is not None:
            write_text_atomically(path, json.dumps(profile))

    return stored, save


def measure_sensitivity(
    session: CompressionSession,
    space: SearchSpace,
    base: Params,
    variants: Sequence[Variant] | Callable[[str], Sequence[Variant]],
    windows: int,
    stored: dict[str, Any],
    save: Callable[[dict[str, Any]], None],
    progress: bool = False,
    desc: str = "sensitivity",
    units: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Fill `stored` ({"base": loss of the base plan, "values": {unit: {variant label: loss increase}}}) for every
    unit of the space (or of `units`: any prefix of trial parameters, such as a decoder block's for its shape) and
    every variant (the same for every unit, or each unit's own from `variants(unit)`), on the first `windows` fitness
    windows; `save` is called after the base and after each unit, so an interrupted measurement resumes where it
    stopped."""
    loss_name = session.config.search.loss

    def loss_of(params: Params) -> float:
        metrics = session.measure(space.plan_from_params(params), stages=[windows]).metrics
        return metrics.kl if loss_name == "kl" else metrics.ce

    stored.setdefault("values", {})
    if stored.get("base") is None:
        stored["base"] = loss_of(base)
        save(stored)
    todo = [unit for unit in (space.units if units is None else units) if unit not in stored["values"]]
    for unit in tqdm(todo, desc=desc, disable=not progress, leave=False):
        row = {}
        for variant in variants(unit) if callable(variants) else variants:
            params = base | {f"{unit}.{field}": value for field, value in variant.items()}
            row[variant_label(variant)] = loss_of(params) - stored["base"]
        stored["values"][unit] = row
        save(stored)
    return stored


def most_aggressive_setting(config: Config) -> dict[str, float | int | str]:
    """The most aggressive level the search space offers: its highest sparsity and fewest bits together."""
    precision = "bits" if config.search.formats is None else "format"
    return {"sparsity": config.search.sparsity_levels()[-1], precision: config.search.precision_levels()[0]}


def study_sensitivity(
    study: optuna.Study,
    record: StudyRecord,
    open_session: Callable[[], tuple[CompressionSession, SearchSpace]] | None = None,
) -> dict[str, Any] | None:
    """The report's profile: per unit, the loss when only that unit takes the most aggressive level, the rest
    dense, on the whole fitness pool. Kept in the study's record and extended unit by unit, so an interrupted run
    loses nothing; without `open_session`, what is stored (None when nothing is)."""
    config = record.config
    setting = most_aggressive_setting(config)
    stored = record.sensitivity
    if not stored or stored.get("setting") != setting or stored.get("loss") != config.search.loss:
        stored = {"setting": setting, "loss": config.search.loss, "pool": "fitness", "units": record.units}
    if open_session is not None and any(unit not in stored.get("values", {}) for unit in record.units):
        session, space = open_session()
        windows = len(session.pools.fitness)
        save = lambda profile: record_sensitivity(study, profile)  # noqa: E731
        measure_sensitivity(session, space, space.dense_params(), [setting], windows, stored, save)
    if not stored.get("values"):
        return None
    label = variant_label(setting)
    return stored | {"values": {unit: stored["base"] + row[label] for unit, row in stored["values"].items()}}
