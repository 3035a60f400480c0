"""A study's life before its trials: created (or resumed, refusing a changed search space), its one-time work done
(layer-variant database, baseline allocations enqueued as seeds), and the session and search space every process
that scores its trials sets up alike."""

from __future__ import annotations

import json
from collections.abc import Mapping
from itertools import product
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock
from optuna.trial import FrozenTrial, TrialState

from autocompress.allocation import (
    BudgetGrid,
    SizeCeiling,
    allocation_plan_params,
    baseline_allocations,
    size_ceiling,
    unit_sizes,
)
from autocompress.config import Config, evenly_spaced, speed_floor
from autocompress.errors import UserError
from autocompress.models import check_consent
from autocompress.plan import StudentArchitecture
from autocompress.record import (
    SpeedReference,
    StudyLocation,
    StudyRecord,
    creation_interrupted,
    enqueued_params,
    is_autocompress_study,
    record_baselines,
    record_created,
    record_creation,
    record_database,
    record_dense_bytes,
    record_speed,
    record_unit_sizes,
    seed_attrs,
    seed_fields,
    seed_of,
    stored_fingerprint,
)
from autocompress.search.evolution import BudgetEvolutionSampler
from autocompress.search.objective import speed_floor_tps, study_speed_model
from autocompress.search.space import SearchSpace
from autocompress.search.storage import load_study, open_storage
from autocompress.session import CompressionSession
from autocompress.targets import target_named
from autocompress.targets.base import PresetSeed


def study_session(config: Config, cache_dir: Path, progress: bool = False) -> tuple[CompressionSession, SearchSpace]:
    """The resident model with its pools and the study's caches, and the search space over its units."""
    session = CompressionSession(config, cache_dir=cache_dir, progress=progress)
    return session, SearchSpace(config, session.units, session.unit_levels())


def sampler_for(config: Config, seed: int) -> optuna.samplers.BaseSampler:
    """The configured sampler; all of them honour the size constraint trials record with set_constraint."""
    search = config.search
    if search.budget is not None and search.budget.dimension == "size":
        return optuna.samplers.RandomSampler(seed=seed)  # its seeds are fixed and its generations sample themselves
    if search.sampler == "evolution":
        return BudgetEvolutionSampler(seed=seed, max_mutations=search.max_mutations)
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, min(50, search.n_trials // 4)))
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def study_pruner(config: Config) -> optuna.pruners.BasePruner:
    """The Optuna pruner of a single-objective study with students (`distillation.pruner`), judging their KD
    curves; otherwise none: staged fitness prunes by the frontier (Objective.stage_check), and a multi-objective
    study applies the same student rules itself (`search.student_pruning`), as Optuna refuses to there."""
    student = config.search.student
    if student is None or config.search.objective != "scalar" or student.distillation.pruner == "none":
        return optuna.pruners.NopPruner()
    settings = student.distillation
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=settings.startup_trials, n_warmup_steps=0)
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=settings.report_every,
            max_resource=settings.step_count(config.data.seq_len),
            reduction_factor=settings.reduction_factor,
        )
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=settings.report_every, reduction_factor=settings.reduction_factor
    )


CHANGED_SPACE = (
    "study {name!r} was created with a different search space (model, data, compression, levels or objective); "
    "resume it with the config it was created with, or use a new --study name"
)


def objectives_text(config: Config) -> str:
    search = config.search
    return f"{search.objective} over [{', '.join(search.objectives)}]"


def check_objectives(config: Config, study: optuna.Study) -> None:
    """Refuse to resume a study with other objectives than it was created with: its trials' values, directions and
    frontier are of those."""
    stored = StudyRecord.of(study).config
    if objectives_text(stored) != objectives_text(config):
        raise UserError(
            f"study {study.study_name!r} was created with objectives {objectives_text(stored)}, not this config's "
            f"{objectives_text(config)}; a study's objectives are fixed at creation: use a new --study name"
        )


def check_before_loading(config: Config, location: StudyLocation) -> None:
    """What a search can check before its model loads (which takes minutes for a large one): what its target can
    refuse from the model's config alone (before anything is stored: `Target.check_search`), that its storage
    opens, and that a study of its name, if there is one, was created with this search space (its units as
    stored: the model config that determines them is part of the space)."""
    target_named(config.compression.target).for_config(config).check_search(config)
    search = config.search
    storage = open_storage(location.storage_url, search.heartbeat_interval, search.grace_period)
    if location.name not in {summary.study_name for summary in optuna.get_all_study_summaries(storage)}:
        return
    study = optuna.load_study(study_name=location.name, storage=storage)
    stored = stored_fingerprint(study)
    if stored is None:
        return
    check_objectives(config, study)
    described = json.loads(stored)
    if SearchSpace(config, described["units"], described.get("unit_levels")).fingerprint() != stored:
        raise UserError(CHANGED_SPACE.format(name=location.name))


def check_budget(session: CompressionSession, space: SearchSpace) -> None:
    """Refuse a budget that no plan can meet before the study is created: created, its name would hold the
    impossible budget, and the corrected config would be refused as another search space."""
    budget = space.config.search.budget
    if budget is None:
        return
    if budget.dimension == "size":
        study_size_ceiling(session, space)
        return
    sizes = unit_sizes(session.linears, space.config.compression.granularity)
    try:
        BudgetGrid(space.units, space.config.search.levels(budget.dimension), budget.average, sizes)
    except ValueError as error:
        raise UserError(f"search.budget: {error}") from error


def open_study(config: Config, location: StudyLocation, space: SearchSpace, seed: int) -> tuple[optuna.Study, bool]:
    """Create the study (seeded with uniform plans) or resume it; refuse a changed search space.

    Returns the study and whether this process created it. A file lock beside the study makes
    creation and seeding happen once when several processes start together on one machine.
    """
    search = config.search
    storage = open_storage(location.storage_url, search.heartbeat_interval, search.grace_period)
    directions = search.directions()
    location.out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(location.out_dir / ".study.lock"):
        study = optuna.create_study(
            storage=storage,
            study_name=location.name,
            directions=directions,
            load_if_exists=True,
            sampler=sampler_for(config, seed),
            pruner=study_pruner(config),
        )
        stored = stored_fingerprint(study)
        if stored is None:  # new, or its creation was stopped part-way: done again, each step idempotent
            record_creation(study, config, space.units)
            for params in space.seeds():
                study.enqueue_trial(params, user_attrs=seed_attrs(), skip_if_exists=True)
            record_created(study, space.fingerprint())
            return study, True
    check_objectives(config, study)
    if stored != space.fingerprint():
        raise UserError(CHANGED_SPACE.format(name=location.name))
    if [direction.name.lower() for direction in study.directions] != directions:
        raise UserError(f"study {location.name!r} has other directions than this config's {objectives_text(config)}")
    return study, False


def enqueue_baselines(
    study: optuna.Study,
    session: CompressionSession,
    space: SearchSpace,
    location: StudyLocation,
    ceiling: SizeCeiling | None = None,
) -> None:
    """Enqueue the configured baseline allocations (uniform, OWL, sensitivity) as seed trials, once per study.

    With a budget, at the budget (a size budget's `ceiling`: the uniform plan under it); in a free search, at every
    level strictly inside each varying dimension's evenly spaced levels (the other dimension uncompressed as far as
    its levels allow).
    """
    search = space.config.search
    presets = session.target.seeds(session, space.unit_levels)
    if presets is not None:
        enqueue_presets(study, session, presets, space, location, ceiling)
        return
    names = search.baseline_names()
    if not names or StudyRecord.of(study).baselines:
        return
    if ceiling is not None:
        with FileLock(location.out_dir / ".study.lock"):
            if not StudyRecord.of(study).baselines:
                enqueued = [enqueue_uniform_at_ceiling(study, space, ceiling)] if "uniform" in names else []
                enqueued += [enqueue_additive(study, session, space, ceiling)] if "additive" in names else []
                record_baselines(study, enqueued)
        return
    with FileLock(location.out_dir / ".study.lock"):
        if StudyRecord.of(study).baselines:  # another process enqueued them while this one waited
            return
        averages: list[tuple[str, float, float | None]] = []  # (dimension, its average, the other's level)
        if search.budget is not None:
            averages.append((search.budget.dimension, search.budget.average, None))
        else:
            names = [name for name in names if name != "uniform"]  # the uniform seeds are enqueued already
            for dimension in ("sparsity", "bits"):
                levels = search.levels(dimension)
                if len(levels) < 3 or not evenly_spaced(levels):
                    continue
                other = space.bit_levels[-1] if dimension == "sparsity" else space.sparsity_levels[0]
                averages += [(dimension, level, other) for level in levels[1:-1]]
        enqueued = []
        for dimension, average, other in averages:
            allocations = baseline_allocations(
                session, space, dimension, average, names, other=other, progress=session.progress
            )
            distinct: dict[str, tuple[dict, list[str]]] = {}  # baselines that coincide are one trial
            for name, allocation in allocations.items():
                params = allocation_plan_params(space, dimension, allocation, other)
                key = json.dumps(params, sort_keys=True)
                distinct.setdefault(key, (params, []))[1].append(name)
                enqueued.append(f"{name}@{dimension}={average:g}")
            for params, same in distinct.values():
                attrs = seed_attrs(same, budget={dimension: average})
                study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=True)
        record_baselines(study, enqueued)


def enqueue_presets(
    study: optuna.Study,
    session: CompressionSession,
    presets: list[PresetSeed],
    space: SearchSpace,
    location: StudyLocation,
    ceiling: SizeCeiling | None = None,
) -> None:
    """Enqueue the target runtime's own presets (llama.cpp's k-quant presets for gguf: `Target.seeds`) as seed
    trials, once, whatever `search.seeds` says of the uniform ones; a preset the space cannot hold is left out,
    saying why.

    Under a size budget, seeds run in the order enqueued, before any generation, and only a plan under the ceiling
    can be a parent: first the plans at the ceiling (the smallest preset over it fitted under it, the uniform plan,
    the additive allocation), then the presets under it, largest first, then that smallest preset over it, the
    reference the fitted seed is measured against. The presets larger still are left out, saying why: scoring
    them would take the time of a generation and could never change the search."""
    if StudyRecord.of(study).baselines:
        return
    with FileLock(location.out_dir / ".study.lock"):
        if StudyRecord.of(study).baselines:
            return
        seeds = []
        for seed in presets:
            if seed.params is None:
                print(f"autocompress: {seed.baseline} is not a seed: {seed.reason}", flush=True)
                continue
            seeds.append((seed.baseline, space.teacher_structure_params() | seed.params))  # the teacher's shape
        enqueued = []
        if ceiling is not None:
            fitted = enqueue_fitted_under_ceiling(study, space, ceiling, seeds)
            enqueued += [fitted] if fitted else []
            enqueued.append(enqueue_uniform_at_ceiling(study, space, ceiling))
            if "additive" in space.config.search.baseline_names():
                enqueued.append(enqueue_additive(study, session, space, ceiling))
            seeds = seeds_by_use(space, ceiling, seeds)
        for baseline, params in seeds:
            study.enqueue_trial(params, user_attrs=seed_attrs([baseline]), skip_if_exists=True)
            enqueued.append(baseline)
        record_baselines(study, enqueued)


def seeds_by_use(space: SearchSpace, ceiling: SizeCeiling, seeds: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """The preset seeds worth scoring under a size budget, in the order they help the search: those under the
    ceiling (possible parents) largest first, then the smallest over it (the fitted seed's own preset); the others
    over it are left out, saying so."""
    sized = sorted(
        ((ceiling.total(seed_allocation(space, ceiling, params)), baseline, params) for baseline, params in seeds),
        key=lambda item: item[:2],
    )
    under = [item for item in sized if item[0] <= ceiling.ceiling]
    over = [item for item in sized if item[0] > ceiling.ceiling]
    for size, baseline, _ in over[1:]:
        print(
            f"autocompress: {baseline} is not a seed: its {size:,} bytes exceed the size budget's {ceiling.ceiling:,}, "
            "so it could never be a parent",
            flush=True,
        )
    return [(baseline, params) for _, baseline, params in [*reversed(under), *over[:1]]]


def enqueue_fitted_under_ceiling(
    study: optuna.Study, space: SearchSpace, ceiling: SizeCeiling, seeds: list[tuple[str, dict]]
) -> str | None:
    """The smallest seed over a size budget's ceiling, moved under it by the smallest steps down
    (`fitted_under_ceiling`), enqueued as one more seed; its name, or None when every seed fits. A budget set at a
    preset's file size leaves room for what an export adds, so the preset itself is just over the ceiling and
    could never become a parent."""
    over = [(ceiling.total(seed_allocation(space, ceiling, params)), baseline, params) for baseline, params in seeds]
    over = [item for item in over if item[0] > ceiling.ceiling]
    if not over:
        return None
    _, baseline, params = min(over, key=lambda item: item[:2])
    name = f"{baseline} fitted under the budget"
    study.enqueue_trial(
        fitted_under_ceiling(space, ceiling, params), user_attrs=seed_attrs([name]), skip_if_exists=True
    )
    return name


def seed_allocation(space: SearchSpace, ceiling: SizeCeiling, params: Mapping[str, Any]) -> dict[str, int]:
    """A seed's trial parameters as the index of each unit's level (a unit without its parameter has one level)."""
    key = space.precision_key
    return {
        unit: levels.index(params.get(ceiling.param(unit, key), levels[0])) for unit, levels in ceiling.levels.items()
    }


def fitted_under_ceiling(space: SearchSpace, ceiling: SizeCeiling, params: Mapping[str, Any]) -> dict[str, Any]:
    """A seed's trial parameters moved under the size budget's ceiling by the smallest steps down
    (`SizeCeiling.fitted`); parameters that fit come back with the same levels."""
    fitted = ceiling.fitted(seed_allocation(space, ceiling, params))
    return ceiling.params_of(fitted, space.precision_key)


def study_size_ceiling(session: CompressionSession, space: SearchSpace) -> SizeCeiling:
    """The size budget's levels and bytes per unit; a UserError when the ceiling is below the smallest plan."""
    budget = space.config.search.budget
    try:
        return size_ceiling(session, space, budget.max_bytes(session.dense_bytes, space.config))
    except ValueError as error:
        raise UserError(f"search.budget: {error}") from error


def enqueue_uniform_at_ceiling(study: optuna.Study, space: SearchSpace, ceiling: SizeCeiling) -> str:
    """Enqueue the uniform allocation at a size budget's ceiling (`SizeCeiling.initial`) as a seed; its name."""
    allocation = ceiling.initial()
    params = ceiling.params_of(allocation, space.precision_key)
    study.enqueue_trial(params, user_attrs=seed_attrs(["uniform"]), skip_if_exists=True)
    return "uniform@size"


def enqueue_additive(study: optuna.Study, session: CompressionSession, space: SearchSpace, ceiling: SizeCeiling) -> str:
    """Enqueue the additive allocation under a size budget's ceiling (`additive.additive_allocation`) as a seed;
    its name."""
    from autocompress.additive import additive_allocation

    allocation = additive_allocation(session, space, ceiling, progress=session.progress)
    params = ceiling.params_of(allocation, space.precision_key)
    study.enqueue_trial(params, user_attrs=seed_attrs(["additive"]), skip_if_exists=True)
    return "additive@size"


def check_student_space(space: SearchSpace, teacher_config) -> None:
    """Refuse, before any trial, student dimensions the teacher cannot give: larger than its own, or attention
    heads that do not group over key/value heads as the teacher's do."""
    choices = space.student_choices
    if not choices:
        return
    largest = {dimension: values[-1] for dimension, values in choices.items()}
    head_pairs = product(choices.get("num_attention_heads", [None]), choices.get("num_key_value_heads", [None]))
    for heads, kv_heads in head_pairs:  # None: the teacher's
        shape = largest | {"num_attention_heads": heads, "num_key_value_heads": kv_heads}
        try:
            StudentArchitecture(**shape).resolved(teacher_config)
        except ValueError as error:
            raise UserError(f"search.student: {error}") from error


def prepare_study(
    study: optuna.Study, session: CompressionSession, space: SearchSpace, location: StudyLocation
) -> None:
    """What a study computes once before its trials: the layer-variant database (built or completed, its
    disk use logged and kept in the study) or what the target's backend precomputes (GGUF blocks), then the
    baseline allocations enqueued as seed trials."""
    check_student_space(space, session.model.config)
    record_dense_bytes(study, session.dense_bytes)
    budget = space.config.search.budget
    ceiling = None
    if budget is not None and budget.dimension == "size":
        ceiling = study_size_ceiling(session, space)  # refuses a ceiling below the smallest plan before any trial
    elif budget is not None:
        sizes = unit_sizes(session.linears, space.config.compression.granularity)
        try:
            BudgetGrid(space.units, space.config.search.levels(budget.dimension), budget.average, sizes)
        except ValueError as error:
            raise UserError(f"search.budget: {error}") from error
        if StudyRecord.of(study).unit_sizes is None:  # the evolution sampler's groups of equal size
            record_unit_sizes(study, sizes)
    if session.use_database:
        report = session.build_database()
        database = session.database()
        usage = database.disk_usage()
        weights = sum(weight.numel() for weight in session.dense_weights.values())
        levels = usage.files / max(1, len(session.dense_weights))  # variants per Linear on disk, all configs
        per_weight = usage.bytes / max(1.0, weights * levels)
        print(
            f"autocompress: layer-variant database {database.root}: {usage.files} variants, "
            f"{usage.bytes / 2**20:,.1f} MiB ({per_weight:.2f} bytes per weight per level); "
            f"computed {report.computed} now in {report.seconds:.0f} s",
            flush=True,
        )
        record_database(
            study,
            {"path": str(database.root), "files": usage.files, "bytes": usage.bytes, "bytes_per_weight": per_weight},
        )
    precomputed = session.weights.precompute(session.unit_levels(), session.progress)  # GGUF blocks, in parallel
    if precomputed is not None:
        print(f"autocompress: {precomputed}", flush=True)
    record_study_speed(study, session)  # after the blocks: a table another process is measuring is waited for
    enqueue_baselines(study, session, space, location, ceiling)
    requeue_failed_seeds(study, location)


def record_study_speed(study: optuna.Study, session: CompressionSession) -> None:
    """Where the study predicts speed: the target runtime's speed model, measured now where this machine's cache
    lacks it, and the speeds a floor may be a multiple of (the dense model's, the preset the config names)."""
    speed = study_speed_model(session)
    if speed is None:
        return
    floor = session.config.search.min_speed
    preset = None if floor is None else speed_floor(floor).preset
    reference = SpeedReference(
        dense_decode_tps=speed.dense.decode_tps,
        dense_prompt_tps=speed.dense.prompt_tps,
        threads=speed.threads,
        presets={} if preset is None else {preset: speed.preset(preset).decode_tps},
    )
    record_speed(study, reference)
    print(
        f"autocompress: predicted speed on {speed.threads} thread(s): the dense model decodes "
        f"{speed.dense.decode_tps:,.1f} tokens/s"
        + ("" if floor is None else f"; the floor ({floor}) is {speed_floor_tps(session.config, speed):,.1f}"),
        flush=True,
    )


def requeue_failed_seeds(study: optuna.Study, location: StudyLocation) -> None:
    """Enqueue once more each seed whose trial failed (a full disk, an out-of-memory error) and that no other trial
    runs again: the seeds are a study's reference plans, which no sampler proposes again. A seed that fails for good
    costs one trial per run."""
    with FileLock(location.out_dir / ".study.lock"):
        trials = study.get_trials(deepcopy=False)
        planned = {plan_key(trial) for trial in trials if trial.state != TrialState.FAIL}
        for trial in trials:
            if trial.state != TrialState.FAIL or not seed_of(trial) or plan_key(trial) in planned:
                continue
            study.enqueue_trial(enqueued_params(trial), user_attrs=seed_fields(trial))
            planned.add(plan_key(trial))


def plan_key(trial: FrozenTrial) -> str:
    """A trial's plan as text: the parameters it was enqueued with, else those it was given."""
    return json.dumps(enqueued_params(trial), sort_keys=True)


def load_existing(location: StudyLocation) -> tuple[optuna.Study, StudyRecord]:
    """An existing study and its record, whose config every command that loads the study's model uses.

    The config comes from the study's storage, which anyone who handed you the study.db (or can write to a shared
    database) may have written: it is refused here, the one door a stored config comes through, when it would switch
    on remote code or unpickling that this command line did not (`check_consent`)."""
    if location.storage_url.startswith("sqlite:///") and not Path(location.storage_url[10:]).is_file():
        raise UserError(f"no study storage at {location.storage_url[10:]}; run `autocompress search` first")
    study = load_study(location.name, open_storage(location.storage_url))
    if creation_interrupted(study):
        raise UserError(
            f"study {location.name!r} was stopped while being created; run `autocompress search` with its config "
            "to finish creating it"
        )
    if not is_autocompress_study(study):
        raise UserError(f"study {location.name!r} was not created by autocompress")
    record = StudyRecord.of(study)
    check_consent(record.config.model, f"study {location.name!r}'s storage")
    return study, record
