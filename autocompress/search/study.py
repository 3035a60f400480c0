"""An Optuna study over compression plans: create or resume it, seed it, run trials, re-judge the frontier."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import optuna
from filelock import FileLock
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from autocompress.config import Config, parse_size
from autocompress.errors import UserError
from autocompress.frontier import DENSE_HELDOUT_KEY, HELDOUT_KEY, frontier_trials, scored_trials
from autocompress.models import unit_names
from autocompress.search.space import SearchSpace
from autocompress.search.storage import default_storage_url, open_storage
from autocompress.session import CompressionSession

SPACE_KEY = "autocompress:space"
CONFIG_KEY = "autocompress:config"


@dataclass(frozen=True)
class StudyLocation:
    name: str
    out_dir: Path  # results/<study>: outputs and caches
    storage_url: str

    @classmethod
    def resolve(cls, name: str, out: str | Path = "results", storage: str | None = None) -> StudyLocation:
        study_dir = Path(out) / name
        return cls(name, study_dir, storage or default_storage_url(study_dir))

    @property
    def cache_dir(self) -> Path:
        return self.out_dir / "cache"


def sampler_for(config: Config, seed: int) -> optuna.samplers.BaseSampler:
    """The configured sampler; all of them honour the size constraint trials record with set_constraint."""
    search = config.search
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, min(50, search.n_trials // 4)))
    if search.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def open_study(config: Config, location: StudyLocation, space: SearchSpace, seed: int) -> tuple[optuna.Study, bool]:
    """Create the study (seeded with uniform plans) or resume it; refuse a changed search space.

    Returns the study and whether this process created it. A file lock beside the study makes
    creation and seeding happen once when several processes start together on one machine.
    """
    search = config.search
    storage = open_storage(location.storage_url, search.heartbeat_interval, search.grace_period)
    directions = ["minimize", "minimize"] if search.objective == "pareto" else ["minimize"]
    location.out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(location.out_dir / ".study.lock"):
        study = optuna.create_study(
            storage=storage,
            study_name=location.name,
            directions=directions,
            load_if_exists=True,
            sampler=sampler_for(config, seed),
        )
        stored = study.user_attrs.get(SPACE_KEY)
        if stored is None:
            study.set_user_attr(SPACE_KEY, space.fingerprint())
            study.set_user_attr(CONFIG_KEY, config.model_dump(mode="json"))
            for params in space.seeds():
                study.enqueue_trial(params, user_attrs={"seed": True}, skip_if_exists=True)
            return study, True
    if stored != space.fingerprint():
        raise UserError(
            f"study {location.name!r} was created with a different search space (model, data, compression, "
            "levels or objective); resume it with the config it was created with, or use a new --study name"
        )
    if [direction.name.lower() for direction in study.directions] != directions:
        raise UserError(f"study {location.name!r} has other objectives than this config's {search.objective!r}")
    return study, False


class Objective:
    """Scores one trial: the plan it maps to, stitched into the resident model, measured on fitness tokens."""

    def __init__(self, config: Config, session: CompressionSession, space: SearchSpace) -> None:
        self.config = config
        self.session = session
        self.space = space
        max_size = config.search.max_size
        dense_bytes = session.dense_bytes
        self.max_bytes = None if max_size is None else parse_size(max_size, dense_bytes)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        search = self.config.search
        try:
            plan = self.space.plan_for(trial)
            measured = self.session.measure(plan)
            metrics = measured.metrics
            loss = metrics.kl if search.loss == "kl" else metrics.ce
            if not math.isfinite(loss):
                raise FloatingPointError(f"the {search.loss} loss is not finite ({loss})")
        except Exception as error:  # the trial is recorded as FAIL with its reason; the study goes on
            trial.set_user_attr("fail_reason", f"{type(error).__name__}: {error}".splitlines()[0][:500])
            raise
        size = measured.size
        objective = search.alpha * loss + search.beta * size.ratio
        for key, value in {
            "loss": loss,
            "kl": metrics.kl,
            "ce": metrics.ce,
            "ppl": metrics.ppl,
            "size_bytes": size.total_bytes,
            "size_ratio": size.ratio,
            "objective": objective,
            "stitch_s": measured.stitch_s,
            "eval_s": measured.eval_s,
        }.items():
            trial.set_user_attr(key, value)
        if self.max_bytes is not None:  # Optuna's convention: feasible when <= 0
            trial.set_user_attr("size_over_limit", float(size.total_bytes - self.max_bytes))
            trial.set_constraint("size_over_limit", float(size.total_bytes - self.max_bytes))
        return (loss, size.ratio) if search.objective == "pareto" else objective


def complete_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


class ProgressBar:
    """A bar over complete trials toward the target, showing the best objective and the frontier size."""

    def __init__(self, study: optuna.Study, target: int, enabled: bool) -> None:
        self.bar = tqdm(total=target, initial=min(complete_count(study), target), desc="trials", disable=not enabled)
        self.target = target

    def __call__(self, study: optuna.Study, _trial: FrozenTrial) -> None:
        trials = scored_trials(study)
        self.bar.n = min(len(trials), self.target)
        if trials:
            best = min(trial.user_attrs["objective"] for trial in trials)
            self.bar.set_postfix(best=f"{best:.4f}", frontier=len(frontier_trials(study)))
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class StopAfterFailures:
    """Stop this process's optimize loop when too many of its trials fail in a row."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_a_row = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.in_a_row = self.in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if self.in_a_row >= self.limit:
            print(f"autocompress: stopping after {self.limit} failed trials in a row", flush=True)
            study.stop()


def evaluate_frontier_heldout(
    study: optuna.Study, session: CompressionSession, space: SearchSpace, max_bytes: int | None = None
) -> None:
    """Re-judge every frontier member (and the dense model) on the held-out pool, once; kept in the study."""
    attrs = study.user_attrs
    if DENSE_HELDOUT_KEY not in attrs:
        dense = session.measure(space.plan_from_params(space.uniform_params(0.0, 16)), pool="heldout")
        study.set_user_attr(DENSE_HELDOUT_KEY, {"ppl": dense.metrics.ppl})
    for trial in frontier_trials(study, max_bytes):
        key = HELDOUT_KEY.format(number=trial.number)
        if key in attrs:
            continue
        measured = session.measure(space.plan_from_params(trial.params), pool="heldout")
        study.set_user_attr(key, {"ppl": measured.metrics.ppl, "kl": measured.metrics.kl})


def run_search(
    config: Config,
    location: StudyLocation,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: bool = True,
) -> optuna.Study:
    """Run (or continue) the study until it holds `n_trials` complete trials or `timeout` seconds pass."""
    from autocompress.report import write_outputs

    target = config.search.n_trials if n_trials is None else n_trials
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our bar reports trials; Optuna's lines would bury it
    session = CompressionSession(config, cache_dir=location.cache_dir, progress=progress)
    space = SearchSpace(config, unit_names(session.model, config.compression.granularity))
    study, created = open_study(config, location, space, config.search.seed)
    if not created:  # another process's sampler must not replay this one's suggestions
        study.sampler = sampler_for(config, config.search.seed + os.getpid())
    objective = Objective(config, session, space)
    bar = ProgressBar(study, target, progress)
    try:
        if complete_count(study) < target:
            study.optimize(
                objective,
                timeout=timeout,
                catch=(Exception,),
                callbacks=[
                    optuna.study.MaxTrialsCallback(target, states=(TrialState.COMPLETE,)),
                    StopAfterFailures(limit=max(5, target)),
                    bar,
                ],
            )
    finally:
        bar.close()
        evaluate_frontier_heldout(study, session, space, objective.max_bytes)
        write_outputs(study, location, config)
    return study


def load_existing(location: StudyLocation) -> tuple[optuna.Study, Config]:
    """An existing study and the config it was created with."""
    from autocompress.search.storage import load_study

    if location.storage_url.startswith("sqlite:///") and not Path(location.storage_url[10:]).is_file():
        raise UserError(f"no study storage at {location.storage_url[10:]}; run `autocompress search` first")
    study = load_study(location.name, open_storage(location.storage_url))
    stored = study.user_attrs.get(CONFIG_KEY)
    if stored is None:
        raise UserError(f"study {location.name!r} was not created by autocompress")
    return study, Config.model_validate(stored)


def judge_frontier(study: optuna.Study, config: Config, location: StudyLocation, max_bytes: int | None) -> None:
    """Held-out figures for frontier members that lack them; loads the model only when some are missing."""
    attrs = study.user_attrs
    missing = [
        trial for trial in frontier_trials(study, max_bytes) if HELDOUT_KEY.format(number=trial.number) not in attrs
    ]
    if not missing and DENSE_HELDOUT_KEY in attrs:
        return
    session = CompressionSession(config, cache_dir=location.cache_dir)
    space = SearchSpace(config, unit_names(session.model, config.compression.granularity))
    evaluate_frontier_heldout(study, session, space, max_bytes)


def dense_bytes_of(study: optuna.Study) -> int | None:
    trials = scored_trials(study)
    if not trials:
        return None
    return round(trials[0].user_attrs["size_bytes"] / trials[0].user_attrs["size_ratio"])
