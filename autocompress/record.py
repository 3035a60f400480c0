"""One record of a study: what a study knows (`StudyRecord`) and what each trial measured (`TrialRecord`).

Optuna keeps both as user attributes, JSON values under string keys. This module alone knows those keys: every
other module reads the typed records and writes through the functions here, so a fact has one name, one type and
one place where it is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ConfigDict

from autocompress.config import Config, max_bytes_for, speed_floor
from autocompress.errors import UserError

_SPACE = "autocompress:space"
_CONFIG = "autocompress:config"
_UNITS = "autocompress:units"
_DENSE_BYTES = "autocompress:dense_bytes"
_UNIT_SIZES = "autocompress:unit_sizes"
_BASELINES = "autocompress:baselines"
_DATABASE = "autocompress:database"
_SENSITIVITY = "autocompress:sensitivity"
_SPEED = "autocompress:speed"
_HELDOUT = "heldout:{number}"
_DENSE_HELDOUT = "heldout:dense"

Params = dict[str, float | int | str]


@dataclass(frozen=True)
class StudyLocation:
    """Where a study lives: its name, its folder (outputs and caches) and its storage."""

    name: str
    out_dir: Path  # results/<study>
    storage_url: str

    @classmethod
    def resolve(cls, name: str, out: str | Path = "results", storage: str | None = None) -> StudyLocation:
        study_dir = Path(out) / name
        return cls(name, study_dir, storage or f"sqlite:///{study_dir / 'study.db'}")

    @property
    def cache_dir(self) -> Path:
        return self.out_dir / "cache"


class HeldoutFigures(BaseModel):
    """A plan judged on the held-out pool; the dense model has no KL to itself."""

    model_config = ConfigDict(frozen=True)

    ppl: float
    kl: float | None = None


class SpeedReference(BaseModel):
    """The predicted speeds a study's speed floors are multiples of: the dense model's, and the llama.cpp presets'
    its config names (decode tokens/s), on `threads` CPU threads."""

    model_config = ConfigDict(frozen=True)

    dense_decode_tps: float
    dense_prompt_tps: float
    threads: int
    presets: dict[str, float] = {}


class TrialRecord(BaseModel):
    """What one trial is and measured. Complete trials carry the figures of the whole fitness pool; a trial pruned
    by staged fitness or by a student pruner carries its partial figures; a failed one its reason."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    number: int
    state: TrialState
    params: Params
    duration_s: float | None = None
    # measured on the whole fitness pool
    loss: float | None = None
    kl: float | None = None
    ce: float | None = None
    ppl: float | None = None
    size_bytes: int | None = None
    size_ratio: float | None = None
    objective: float | None = None
    stitch_s: float | None = None
    eval_s: float | None = None
    forward_s: float | None = None  # the model's forward passes alone
    size_over_limit: float | None = None  # Optuna's constraint convention: feasible when <= 0
    # the target runtime's predicted speed (search.objectives with speed, or search.min_speed)
    predicted_decode_tps: float | None = None
    predicted_prompt_tps: float | None = None
    speed_ratio: float | None = None  # predicted decode tokens/s over the dense model's
    speed_under_floor: float | None = None  # min_speed minus the predicted decode tokens/s: feasible when <= 0
    # staged fitness: [windows, loss] after each stage; where and why a trial stopped early
    stage_losses: list[tuple[int, float]] = []
    partial_loss: float | None = None
    partial_windows: int | None = None
    pruned_by: int | None = None  # the frontier member that beat it, -1 for Optuna's pruner
    pruned_at_step: int | None = None  # a student's KD step
    # seeds: uniform plans and baseline allocations enqueued before any sampled plan
    seed: bool = False
    baseline: str | None = None
    baselines: list[str] = []
    budget: dict[str, float] | None = None
    # students
    architecture: dict[str, int] | None = None
    student: bool = False
    student_dense_bytes: int | None = None
    kd_curve: list[tuple[int, float]] = []  # [step, KL on the fitness pool]
    # generations (search.generations): the trial whose offspring this plan is, and the scores its generation made
    parent: int | None = None
    generation_evaluations: int | None = None
    worker: str | None = None  # host:pid of the process that recorded it
    fail_reason: str = ""

    @property
    def scored(self) -> bool:
        """Complete, with a loss and a size: the trials a frontier is made of."""
        return self.state == TrialState.COMPLETE and self.loss is not None and self.size_bytes is not None

    @property
    def stage_loss(self) -> dict[int, float]:
        return {int(windows): loss for windows, loss in self.stage_losses}

    @classmethod
    def of(cls, trial: FrozenTrial) -> TrialRecord:
        duration = None
        if trial.datetime_start and trial.datetime_complete:
            duration = (trial.datetime_complete - trial.datetime_start).total_seconds()
        known = {key: value for key, value in trial.user_attrs.items() if key in _MEASURED}
        return cls(number=trial.number, state=trial.state, params=dict(trial.params), duration_s=duration, **known)


_MEASURED = frozenset(TrialRecord.model_fields) - {"number", "state", "params", "duration_s"}


class TrialWriter:
    """Where a trial's record is written as it is measured: an Optuna trial's user attributes, or (in a Ray worker)
    a dict the driver writes into the study with `write_fields`."""

    def __init__(self, trial: optuna.Trial | None = None) -> None:
        self.trial = trial
        self.fields: dict[str, Any] = {}

    def write(self, **fields: Any) -> None:
        unknown = set(fields) - _MEASURED
        if unknown:
            raise KeyError(f"a trial record has no field {sorted(unknown)[0]!r}")
        self.fields |= fields
        if self.trial is not None:
            write_fields(self.trial, fields)


def write_fields(trial: optuna.Trial, fields: Mapping[str, Any]) -> None:
    """Store a trial's record fields (validated by `TrialWriter.write`) in its user attributes; the size over the
    limit is also the trial's Optuna constraint, which every sampler honours."""
    for key, value in fields.items():
        trial.set_user_attr(key, _stored(key, value))
        if key in CONSTRAINTS:
            trial.set_constraint(key, value)


CONSTRAINTS = ("size_over_limit", "speed_under_floor")  # record fields that are Optuna constraints too


def _stored(key: str, value: Any) -> Any:
    return [list(item) for item in value] if key in ("stage_losses", "kd_curve") else value


def add_scored_trial(
    study: optuna.Study,
    params: Params,
    distributions: Mapping[str, BaseDistribution],
    values: float | Sequence[float],
    fields: Mapping[str, Any],
) -> None:
    """Record a plan scored outside Optuna's trial loop as one complete trial, written in one storage call: its
    parameters, objective value(s) and record fields (with the size constraint, as `write_fields` keeps it)."""
    unknown = set(fields) - _MEASURED
    if unknown:
        raise KeyError(f"a trial record has no field {sorted(unknown)[0]!r}")
    trial = optuna.trial.create_trial(
        params=dict(params),
        distributions=dict(distributions),
        values=[values] if isinstance(values, float | int) else list(values),
        user_attrs={key: _stored(key, value) for key, value in fields.items()},
        constraints={key: float(fields[key]) for key in CONSTRAINTS if key in fields},
    )
    study.add_trial(trial)


def seed_of(trial: optuna.Trial | FrozenTrial) -> bool:
    """Whether a trial is an enqueued seed (a uniform plan or a baseline)."""
    return bool(trial.user_attrs.get("seed", False))


def planned_params(trial: FrozenTrial) -> Params:
    """A trial's parameters, or, for a seed enqueued and not yet run, those it was enqueued with (which Optuna keeps
    in a system attribute until the trial starts)."""
    return trial.params or trial.system_attrs.get("fixed_params", {})


def enqueued_params(trial: FrozenTrial) -> Params:
    """The parameters a trial was enqueued with (which Optuna keeps in a system attribute), else those it was given:
    a seed's plan even when it failed before suggesting them."""
    return trial.system_attrs.get("fixed_params", trial.params)


SEED_FIELDS = ("seed", "baseline", "baselines", "budget")


def seed_fields(trial: FrozenTrial) -> dict[str, Any]:
    """The user attributes that make `trial` a seed (see `seed_attrs`), to enqueue it again with."""
    return {key: trial.user_attrs[key] for key in SEED_FIELDS if key in trial.user_attrs}


def seed_attrs(baselines: Iterable[str] = (), budget: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The user attributes of an enqueued seed trial: a uniform plan, or the baseline allocations it stands for."""
    names = list(baselines)
    attrs: dict[str, Any] = {"seed": True}
    if names:
        attrs |= {"baseline": names[0], "baselines": names}
    if budget is not None:
        attrs["budget"] = dict(budget)
    return attrs


def trial_records(study: optuna.Study, states: Iterable[TrialState] | None = None) -> list[TrialRecord]:
    trials = study.get_trials(deepcopy=False, states=None if states is None else tuple(states))
    return [TrialRecord.of(trial) for trial in trials]


def scored_records(study: optuna.Study) -> list[TrialRecord]:
    return [record for record in trial_records(study, (TrialState.COMPLETE,)) if record.scored]


class StudyRecord(BaseModel):
    """What a study knows beside its trials: the config it was created with, the units of its model, the dense
    model's bytes, the held-out figures of its frontier, its baselines, variant database and sensitivity."""

    model_config = ConfigDict(frozen=True)

    name: str
    config: Config
    fingerprint: str
    units: list[str]
    unit_levels: dict[str, list[str]] | None = None  # where the target restricts a unit's levels by its shape
    dense_bytes: int | None
    unit_sizes: dict[str, int] | None = None
    baselines: list[str] = []
    database: dict[str, Any] | None = None
    sensitivity: dict[str, Any] | None = None
    dense_heldout: HeldoutFigures | None = None
    heldout: dict[int, HeldoutFigures] = {}
    speed: SpeedReference | None = None  # where trials predict their speed

    @classmethod
    def of(cls, study: optuna.Study) -> StudyRecord:
        attrs = study.user_attrs
        if _SPACE not in attrs:
            raise KeyError(f"study {study.study_name!r} was not created by autocompress")
        dense_bytes = attrs.get(_DENSE_BYTES)
        if dense_bytes is None:  # a study made before dense bytes were stored: every scored trial implies them
            scored = scored_records(study)
            dense_bytes = round(scored[0].size_bytes / scored[0].size_ratio) if scored else None
        heldout = {
            int(key.removeprefix("heldout:")): HeldoutFigures(**value)
            for key, value in attrs.items()
            if key.startswith("heldout:") and key != _DENSE_HELDOUT
        }
        return cls(
            name=study.study_name,
            config=Config.model_validate(attrs[_CONFIG]),
            fingerprint=attrs[_SPACE],
            units=attrs.get(_UNITS) or json.loads(attrs[_SPACE])["units"],
            unit_levels=json.loads(attrs[_SPACE]).get("unit_levels"),
            dense_bytes=dense_bytes,
            unit_sizes=attrs.get(_UNIT_SIZES),
            baselines=attrs.get(_BASELINES) or [],
            database=attrs.get(_DATABASE),
            sensitivity=attrs.get(_SENSITIVITY),
            dense_heldout=HeldoutFigures(**attrs[_DENSE_HELDOUT]) if _DENSE_HELDOUT in attrs else None,
            heldout=heldout,
            speed=SpeedReference(**attrs[_SPEED]) if _SPEED in attrs else None,
        )

    def max_bytes(self, given: str | None = None) -> int | None:
        """The size limit in bytes: the command line's `given` limit, else the config's; None without one (or
        before any dense bytes are known)."""
        return max_bytes_for(given, self.config, self.dense_bytes)

    def min_tps(self, given: str | None = None) -> float | None:
        """The speed floor in decode tokens/s: the command line's `given` floor, else the config's; None without
        one. A UserError for a floor of a study that predicts no speed, or a multiple of a preset it did not
        predict."""
        text = self.config.search.min_speed if given is None else given
        if text is None:
            return None
        where = "search.min_speed" if given is None else "--min-speed"
        if self.speed is None:
            raise UserError(
                f"{where}: study {self.name!r} predicts no speed; create it with search.objectives [loss, size, "
                "speed] or a search.min_speed"
            )
        try:
            floor = speed_floor(text)
        except ValueError as error:
            raise UserError(f"{where}: {error}") from error
        if floor.preset is not None and floor.preset not in self.speed.presets:
            known = f"only {', '.join(self.speed.presets)}'s" if self.speed.presets else "no preset's"
            raise UserError(f"{where}: study {self.name!r} predicted {known} speed, not {floor.preset}'s")
        return floor.tokens(self.speed.dense_decode_tps, self.speed.presets.get(floor.preset))


def is_autocompress_study(study: optuna.Study) -> bool:
    """Whether autocompress finished creating `study`: its search space is written last (`record_created`)."""
    return _SPACE in study.user_attrs


def creation_interrupted(study: optuna.Study) -> bool:
    """Whether autocompress began creating `study` and was stopped before it finished."""
    return _CONFIG in study.user_attrs and _SPACE not in study.user_attrs


def stored_fingerprint(study: optuna.Study) -> str | None:
    return study.user_attrs.get(_SPACE)


def record_creation(study: optuna.Study, config: Config, units: list[str]) -> None:
    """What a new study is: its config and units. The study counts as created only once `record_created` marks
    it, after its seeds: a creation stopped anywhere before is done again, whole, by the next run."""
    study.set_user_attr(_CONFIG, config.model_dump(mode="json"))
    study.set_user_attr(_UNITS, units)


def record_created(study: optuna.Study, fingerprint: str) -> None:
    """The mark of a study created whole: its search space, which a resume must match, written last."""
    study.set_user_attr(_SPACE, fingerprint)


def record_dense_bytes(study: optuna.Study, dense_bytes: int) -> None:
    if study.user_attrs.get(_DENSE_BYTES) != dense_bytes:
        study.set_user_attr(_DENSE_BYTES, dense_bytes)


def record_unit_sizes(study: optuna.Study, sizes: Mapping[str, int]) -> None:
    study.set_user_attr(_UNIT_SIZES, dict(sizes))


def record_baselines(study: optuna.Study, enqueued: list[str]) -> None:
    study.set_user_attr(_BASELINES, enqueued)


def record_database(study: optuna.Study, usage: Mapping[str, Any]) -> None:
    study.set_user_attr(_DATABASE, dict(usage))


def record_sensitivity(study: optuna.Study, profile: Mapping[str, Any]) -> None:
    study.set_user_attr(_SENSITIVITY, dict(profile))


def record_speed(study: optuna.Study, reference: SpeedReference) -> None:
    if study.user_attrs.get(_SPEED) != reference.model_dump():
        study.set_user_attr(_SPEED, reference.model_dump())


def record_heldout(study: optuna.Study, number: int | None, figures: HeldoutFigures) -> None:
    """A frontier member's held-out figures (`number` None: the dense model's)."""
    key = _DENSE_HELDOUT if number is None else _HELDOUT.format(number=number)
    study.set_user_attr(key, figures.model_dump(exclude_none=True))
