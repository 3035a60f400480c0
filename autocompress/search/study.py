"""An Optuna study over compression plans: create or resume it, seed it, run trials, re-judge the frontier."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import optuna
import torch
from filelock import FileLock
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from autocompress.config import Config, DistillationConfig, evenly_spaced, parse_size
from autocompress.errors import UserError
from autocompress.frontier import DENSE_HELDOUT_KEY, HELDOUT_KEY, frontier_trials, scored_trials
from autocompress.metrics import Metrics
from autocompress.models import unit_names
from autocompress.plan import CompressionPlan
from autocompress.search.space import SearchSpace
from autocompress.search.storage import default_storage_url, open_storage
from autocompress.session import CompressionSession, StageCallback
from autocompress.size import HALF_BYTES, SizeReport
from autocompress.students import ReportCallback

SPACE_KEY = "autocompress:space"
CONFIG_KEY = "autocompress:config"
BASELINES_KEY = "autocompress:baselines"
DATABASE_KEY = "autocompress:database"


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
    if search.sampler == "evolution":
        from autocompress.search.evolution import BudgetEvolutionSampler

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
            pruner=study_pruner(config),
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
    """Scores one trial: the plan it maps to, stitched into the resident model, measured on fitness tokens.

    Staged fitness (`search.stages`): the fitness pool is scored in growing prefixes. After each stage but
    the last, a trial is pruned (optuna.TrialPruned) when its partial loss exceeds, by more than
    `search.stage_margin`, the loss on the same windows of a frontier member no larger than it (within
    `SIZE_SLACK`): such a plan cannot be expected to reach the frontier. Seed trials (baselines) always run
    to the end. A single-objective study also gets the partial objective through trial.report, and its
    pruner is consulted; Optuna supports neither for multi-objective studies, so there the decision is this
    rule alone, with the partial loss kept in the trial's user attributes. Only complete trials carry a
    `loss` (always on the whole fitness pool), and only complete trials are ever on the frontier.
    """

    SIZE_SLACK = 1e-3  # plans within 0.1% of a size count as no larger (rounding of per-row pruned counts)

    def __init__(self, config: Config, session: CompressionSession, space: SearchSpace) -> None:
        self.config = config
        self.session = session
        self.space = space
        max_size = config.search.max_size
        dense_bytes = session.dense_bytes
        self.max_bytes = None if max_size is None else parse_size(max_size, dense_bytes)
        self.stages = stage_windows(len(session.pools.fitness), config.search.stage_fractions())

    def loss_of(self, metrics: Metrics) -> float:
        return metrics.kl if self.config.search.loss == "kl" else metrics.ce

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        search = self.config.search
        try:
            plan = self.space.plan_for(trial)
            staged = len(self.stages) > 1
            if self.session.trains(plan):
                measured = self.session.measure(plan, on_report=self.student_check(trial, plan))
            elif staged:
                measured = self.session.measure(plan, stages=self.stages, on_stage=self.stage_check(trial))
            else:
                measured = self.session.measure(plan)
            metrics = measured.metrics
            loss = self.loss_of(metrics)
            if not math.isfinite(loss):
                raise FloatingPointError(f"the {search.loss} loss is not finite ({loss})")
        except optuna.TrialPruned:
            raise
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
            "forward_s": metrics.n_tokens / metrics.tokens_per_s,  # the model's forward passes alone
        }.items():
            trial.set_user_attr(key, value)
        if len(measured.stages) > 1:
            trial.set_user_attr("stage_losses", [[count, self.loss_of(part)] for count, part in measured.stages])
        if self.config.search.student is not None:
            trial.set_user_attr("architecture", measured.shape or self.session.trainer.shape_of(plan))
            trial.set_user_attr("student", bool(measured.shape) and measured.shape != self.teacher_shape)
        if measured.curve:
            trial.set_user_attr(KD_CURVE_KEY, [list(point) for point in measured.curve])
        if self.max_bytes is not None:  # Optuna's convention: feasible when <= 0
            trial.set_user_attr("size_over_limit", float(size.total_bytes - self.max_bytes))
            trial.set_constraint("size_over_limit", float(size.total_bytes - self.max_bytes))
        return (loss, size.ratio) if search.objective == "pareto" else objective

    @property
    def teacher_shape(self) -> dict[str, int]:
        from autocompress.students import teacher_shape

        return teacher_shape(self.session.model.config)

    def student_check(self, trial: optuna.Trial, plan: CompressionPlan) -> ReportCallback:
        """The callback a student's distillation runs every `report_every` steps: record its KD loss on the
        fitness pool, and stop the trial (optuna.TrialPruned) when the configured pruner judges it weak.

        A single-objective study reports α·KD + β·(the dense student's size) to Optuna and asks its pruner (the
        scalar objective's own terms, so a small student is not judged by loss alone). Optuna refuses
        report/should_prune in multi-objective studies, so there `student_pruning` applies the same rule itself
        to the curves trials keep in their user attributes, comparing a student only with students no larger
        than it: on a Pareto frontier a smaller student may well have a higher loss.
        """
        search = self.config.search
        settings = search.student.distillation
        shape = self.session.trainer.shape_of(plan)
        size_bytes = student_dense_bytes(self.session.model.config, shape)
        size_ratio = size_bytes / self.session.dense_bytes
        trial.set_user_attr("student_dense_bytes", size_bytes)
        curve: list[list[float]] = []

        def check(step: int, kl: float) -> None:
            curve.append([step, kl])
            trial.set_user_attr(KD_CURVE_KEY, curve)
            if settings.pruner == "none" or trial.user_attrs.get("seed"):
                return
            if search.objective == "scalar":
                trial.report(search.alpha * kl + search.beta * size_ratio, step=step)
                prune = trial.should_prune()
            else:
                prune = student_pruning(trial.study, trial.number, step, kl, size_bytes, settings)
            if prune:
                trial.set_user_attr("partial_loss", kl)
                trial.set_user_attr("pruned_at_step", step)
                raise optuna.TrialPruned(f"KD loss {kl:.4g} at step {step}")

        return check

    def stage_check(self, trial: optuna.Trial) -> StageCallback:
        """The callback `measure` runs after each stage: record, report, and prune if hopeless."""
        search = self.config.search
        began = time.perf_counter()
        partial: list[list[float]] = []

        def check(index: int, windows: int, metrics: Metrics, size: SizeReport) -> None:
            loss = self.loss_of(metrics)
            partial.append([windows, loss])
            trial.set_user_attr("stage_losses", partial)
            beaten_by = self.beaten_by(trial.study, windows, loss, size.total_bytes)
            optuna_prunes = False
            if search.objective == "scalar":
                trial.report(search.alpha * loss + search.beta * size.ratio, step=windows)
                optuna_prunes = trial.should_prune()
            if trial.user_attrs.get("seed") or (beaten_by is None and not optuna_prunes):
                return
            for key, value in {
                "partial_loss": loss,
                "partial_windows": windows,
                "pruned_by": -1 if beaten_by is None else beaten_by,
                "size_bytes": size.total_bytes,
                "size_ratio": size.ratio,
                "stitch_s": self.session.last_stitch_s,
                "eval_s": time.perf_counter() - began - self.session.last_stitch_s,
            }.items():
                trial.set_user_attr(key, value)
            raise optuna.TrialPruned(f"partial {search.loss} {loss:.4g} on {windows} windows")

        return check

    def beaten_by(self, study: optuna.Study, windows: int, loss: float, size_bytes: int) -> int | None:
        """A frontier member no larger than `size_bytes` whose loss on the same windows beats `loss` by
        more than the margin; None when there is none."""
        for member in frontier_trials(study, self.max_bytes):
            if member.user_attrs["size_bytes"] > size_bytes * (1 + self.SIZE_SLACK):
                continue
            stages = {int(count): value for count, value in member.user_attrs.get("stage_losses", [])}
            reference = stages.get(windows, member.user_attrs["loss"])
            if loss > reference * (1 + self.config.search.margin()) and loss > reference:
                return member.number
        return None


KD_CURVE_KEY = "kd_curve"  # a student's [[step, KL on the fitness pool], ...]


def student_dense_bytes(config, shape: dict[str, int]) -> int:
    """Bytes of a student of `shape` with every parameter in 16 bits (tied embeddings once), before compression."""
    from autocompress.models import student_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(student_config(config, shape))
    return sum(parameter.numel() for parameter in model.parameters()) * HALF_BYTES


def student_pruning(
    study: optuna.Study, number: int, step: int, kl: float, size_bytes: int, settings: DistillationConfig
) -> bool:
    """Whether a student's KD loss at `step` marks it as weak, among the students no larger than it that reached
    that step (complete, pruned or running), once `startup_trials` of them have.

    median: its loss is above their median (Optuna's MedianPruner rule). halving and hyperband: at each rung
    (report_every · reduction_factor^k steps) it is not among the best 1/reduction_factor of them and itself
    (the rule of Optuna's SuccessiveHalvingPruner; Hyperband's brackets would split a handful of students
    into groups too small to compare, so a multi-objective study runs the one bracket).
    """
    peers = []
    for other in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)):
        if other.number == number or other.user_attrs.get("student_dense_bytes", math.inf) > size_bytes * 1.001:
            continue
        at_step = {int(point[0]): point[1] for point in other.user_attrs.get(KD_CURVE_KEY, [])}
        if step in at_step:
            peers.append(at_step[step])
    if len(peers) < max(1, settings.startup_trials):
        return False
    if settings.pruner == "median":
        return kl > statistics.median(peers)
    rung = settings.report_every
    while rung < step:
        rung *= settings.reduction_factor
    if rung != step:
        return False
    competitors = sorted([*peers, kl])
    kept = max(1, len(competitors) // settings.reduction_factor)
    return kl > competitors[kept - 1]


def stage_windows(pool: int, fractions: Sequence[float]) -> list[int]:
    """Growing window counts for the stage fractions of a pool of `pool` windows (at least one each)."""
    counts = []
    for fraction in fractions:
        count = min(pool, max(1, round(fraction * pool)))
        if not counts or count > counts[-1]:
            counts.append(count)
    if counts[-1] != pool:
        counts.append(pool)
    return counts


def enqueue_baselines(
    study: optuna.Study, session: CompressionSession, space: SearchSpace, location: StudyLocation
) -> None:
    """Enqueue the configured baseline allocations (uniform, OWL, sensitivity) as seed trials, once per study.

    With a budget, at the budget; in a free search, at every level strictly inside each varying dimension's
    evenly spaced levels (the other dimension uncompressed as far as its levels allow).
    """
    from autocompress.allocation import allocation_plan_params, baseline_allocations

    search = space.config.search
    names = search.baseline_names()
    if not names or study.user_attrs.get(BASELINES_KEY):
        return
    with FileLock(location.out_dir / ".study.lock"):
        if study.user_attrs.get(BASELINES_KEY):  # another process enqueued them while this one waited
            return
        targets: list[tuple[str, float, float | None]] = []
        if search.budget is not None:
            targets.append((search.budget.dimension, search.budget.target, None))
        else:
            names = [name for name in names if name != "uniform"]  # the uniform seeds are enqueued already
            for dimension in ("sparsity", "bits"):
                levels = search.levels(dimension)
                if len(levels) < 3 or not evenly_spaced(levels):
                    continue
                other = space.bit_levels[-1] if dimension == "sparsity" else space.sparsity_levels[0]
                targets += [(dimension, level, other) for level in levels[1:-1]]
        enqueued = []
        for dimension, target, other in targets:
            allocations = baseline_allocations(
                session, space, dimension, target, names, other=other, progress=session.progress
            )
            distinct: dict[str, tuple[dict, list[str]]] = {}  # baselines that coincide are one trial
            for name, allocation in allocations.items():
                params = allocation_plan_params(space, dimension, allocation, other)
                key = json.dumps(params, sort_keys=True)
                distinct.setdefault(key, (params, []))[1].append(name)
                enqueued.append(f"{name}@{dimension}={target:g}")
            for params, same in distinct.values():
                attrs = {"seed": True, "baseline": same[0], "baselines": same, "budget": {dimension: target}}
                study.enqueue_trial(params, user_attrs=attrs, skip_if_exists=True)
        study.set_user_attr(BASELINES_KEY, enqueued)


def check_student_space(space: SearchSpace, teacher_config) -> None:
    """Refuse, before any trial, student dimensions the teacher cannot give: larger than its own, or attention
    heads that do not group over key/value heads as the teacher's do."""
    from autocompress.plan import StudentArchitecture

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
    disk use logged and kept in the study), then the baseline allocations enqueued as seed trials."""
    check_student_space(space, session.model.config)
    budget = space.config.search.budget
    if budget is not None:
        from autocompress.allocation import BudgetGrid, unit_sizes
        from autocompress.search.evolution import UNIT_SIZES_KEY

        sizes = unit_sizes(session.linears, space.config.compression.granularity)
        try:
            BudgetGrid(space.units, space.config.search.levels(budget.dimension), budget.target, sizes)
        except ValueError as error:
            raise UserError(f"search.budget: {error}") from error
        if study.user_attrs.get(UNIT_SIZES_KEY) is None:  # the evolution sampler's groups of equal size
            study.set_user_attr(UNIT_SIZES_KEY, sizes)
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
        study.set_user_attr(
            DATABASE_KEY,
            {"path": str(database.root), "files": usage.files, "bytes": usage.bytes, "bytes_per_weight": per_weight},
        )
    enqueue_baselines(study, session, space, location)


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what counts toward n_trials: pruned ones too (staged fitness)


def complete_count(study: optuna.Study) -> int:
    """Trials finished: complete, or pruned by staged fitness (failed ones are re-run, so they do not count)."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


class ProgressBar:
    """A bar over complete trials toward the target, showing the best objective and the frontier size."""

    def __init__(self, study: optuna.Study, target: int, enabled: bool) -> None:
        self.bar = tqdm(total=target, initial=min(complete_count(study), target), desc="trials", disable=not enabled)
        self.target = target

    def __call__(self, study: optuna.Study, _trial: FrozenTrial) -> None:
        trials = scored_trials(study)
        self.bar.n = min(complete_count(study), self.target)
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
    pending = heldout_pending(study, space, max_bytes)
    for key, params in tqdm(
        pending.items(), desc="held-out judging of the frontier", disable=not session.progress, leave=False
    ):
        study.set_user_attr(key, heldout_figures(session, space, key, params))


def heldout_pending(
    study: optuna.Study, space: SearchSpace, max_bytes: int | None = None
) -> dict[str, dict[str, float | int]]:
    """The held-out figures the study lacks: user-attr key -> params of the plan to measure (dense first)."""
    attrs = study.user_attrs
    pending = {} if DENSE_HELDOUT_KEY in attrs else {DENSE_HELDOUT_KEY: space.dense_params()}
    for trial in frontier_trials(study, max_bytes):
        key = HELDOUT_KEY.format(number=trial.number)
        if key not in attrs:
            pending[key] = dict(trial.params)
    return pending


def heldout_figures(
    session: CompressionSession, space: SearchSpace, key: str, params: dict[str, float | int]
) -> dict[str, float]:
    """One plan's held-out figures as the study keeps them under `key` (the dense model's: perplexity only)."""
    plan = space.teacher_plan() if key == DENSE_HELDOUT_KEY else space.plan_from_params(params)
    metrics = session.measure(plan, pool="heldout").metrics
    return {"ppl": metrics.ppl} if key == DENSE_HELDOUT_KEY else {"ppl": metrics.ppl, "kl": metrics.kl}


def run_search(
    config: Config,
    location: StudyLocation,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: bool = True,
    callbacks: Sequence[Callable[[optuna.Study, FrozenTrial], None]] = (),
) -> optuna.Study:
    """Run (or continue) the study until it holds `n_trials` finished (complete or pruned) trials or `timeout`
    seconds pass.

    `callbacks` run after each of this process's trials, beside the ones that stop and report the search.
    """
    from autocompress.report import write_outputs

    target = config.search.n_trials if n_trials is None else n_trials
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our bar reports trials; Optuna's lines would bury it
    session = CompressionSession(config, cache_dir=location.cache_dir, progress=progress)
    space = SearchSpace(config, unit_names(session.model, config.compression.granularity))
    study, created = open_study(config, location, space, config.search.seed)
    if not created:  # another process's sampler must not replay this one's suggestions
        study.sampler = sampler_for(config, config.search.seed + os.getpid())
    prepare_study(study, session, space, location)
    objective = Objective(config, session, space)
    bar = ProgressBar(study, target, progress)
    try:
        if complete_count(study) < target:
            study.optimize(
                objective,
                timeout=timeout,
                catch=(Exception,),
                callbacks=[
                    optuna.study.MaxTrialsCallback(target, states=FINISHED),
                    StopAfterFailures(limit=max(5, target)),
                    bar,
                    *callbacks,
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
