"""Scoring one trial: its plan stitched into the resident model and measured on fitness tokens, its outcome
recorded in the trial's record; staged fitness and student pruners stop hopeless plans early."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import Protocol

import optuna
import torch
from optuna.trial import TrialState
from transformers import AutoModelForCausalLM

from autocompress.config import Config, DistillationConfig
from autocompress.files import is_disk_full
from autocompress.frontier import frontier_of
from autocompress.measurement import StageCallback
from autocompress.metrics import Metrics
from autocompress.models import student_config
from autocompress.plan import CompressionPlan
from autocompress.record import TrialRecord, TrialWriter, seed_of, trial_records
from autocompress.search.space import SearchSpace
from autocompress.session import CompressionSession
from autocompress.size import HALF_BYTES, SizeReport
from autocompress.students import ReportCallback, teacher_shape

SIZE_SLACK = 1e-3  # plans within 0.1% of a size count as no larger (rounding of per-row pruned counts)


class TrialContext(Protocol):
    """What scoring sees of the trial it scores and of the study around it, whichever backend runs it."""

    number: int
    is_seed: bool
    writer: TrialWriter

    def peers(self) -> list[TrialRecord]:
        """The study's other complete, pruned and running trials, as this trial may know them."""
        ...

    def report(self, value: float, step: int) -> bool:
        """Report a single-objective study's partial value; whether its Optuna pruner stops the trial."""
        ...


class OptunaTrialContext:
    """A trial of the local backend (or of an Optuna worker): the live study is its peers, Optuna its pruner."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.number = trial.number
        self.is_seed = seed_of(trial)
        self.writer = TrialWriter(trial)

    def peers(self) -> list[TrialRecord]:
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
        return [record for record in trial_records(self.trial.study, states) if record.number != self.number]

    def report(self, value: float, step: int) -> bool:
        self.trial.report(value, step=step)
        return self.trial.should_prune()


def stage_window(pool: int, fraction: float) -> int:
    """The windows a stage of `fraction` of a pool of `pool` windows scores (at least one)."""
    return min(pool, max(1, round(fraction * pool)))


def stage_windows(pool: int, fractions: Sequence[float]) -> list[int]:
    """Growing window counts for the stage fractions of a pool of `pool` windows (at least one each)."""
    counts = []
    for fraction in fractions:
        count = stage_window(pool, fraction)
        if not counts or count > counts[-1]:
            counts.append(count)
    if counts[-1] != pool:
        counts.append(pool)
    return counts


class Objective:
    """Scores one trial: the plan it maps to, stitched into the resident model, measured on fitness tokens.

    Staged fitness (`search.stages`): the fitness pool is scored in growing prefixes. After each stage but
    the last, a trial is pruned (optuna.TrialPruned) when its partial loss exceeds, by more than
    `search.stage_margin`, the loss on the same windows of a frontier member no larger than it (within
    `SIZE_SLACK`): such a plan cannot be expected to reach the frontier. Seed trials (baselines) always run
    to the end. A single-objective study also gets the partial objective through trial.report, and its
    pruner is consulted; Optuna supports neither for multi-objective studies, so there the decision is this
    rule alone, with the partial loss kept in the trial's record. Only complete trials carry a
    `loss` (always on the whole fitness pool), and only complete trials are ever on the frontier.
    """

    def __init__(self, config: Config, session: CompressionSession, space: SearchSpace, max_bytes: int | None) -> None:
        self.config = config
        self.session = session
        self.space = space
        self.max_bytes = max_bytes
        self.stages = stage_windows(len(session.pools.fitness), config.search.stage_fractions())
        self.disk_full: OSError | None = None  # what failed a trial for want of space: the search stops on it

    def raise_if_disk_full(self) -> None:
        """Raise the full disk a trial met, once the search loop has stopped and recorded that trial's failure."""
        if self.disk_full is not None:
            raise self.disk_full

    def loss_of(self, metrics: Metrics) -> float:
        return metrics.kl if self.config.search.loss == "kl" else metrics.ce

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        """The local backend's objective: the trial's plan, scored and recorded in its own user attributes."""
        plan = self.space.plan_for(trial)
        return self.score(plan, OptunaTrialContext(trial))

    def score(self, plan: CompressionPlan, context: TrialContext) -> float | tuple[float, float]:
        """Measure `plan`, record the outcome through `context.writer`, return the study's objective value(s).

        Raises optuna.TrialPruned for a plan stopped early; any other exception fails the trial, with its reason
        recorded; the study goes on.
        """
        search = self.config.search
        try:
            staged = len(self.stages) > 1
            if self.session.trains(plan):
                measured = self.session.measure(plan, on_report=self.student_check(context, plan))
            elif staged:
                measured = self.session.measure(plan, stages=self.stages, on_stage=self.stage_check(context))
            else:
                measured = self.session.measure(plan)
            metrics = measured.metrics
            loss = self.loss_of(metrics)
            if not math.isfinite(loss):
                raise FloatingPointError(f"the {search.loss} loss is not finite ({loss})")
        except optuna.TrialPruned:
            raise
        except Exception as error:
            context.writer.write(fail_reason=failure_reason(error))
            if is_disk_full(error):
                self.disk_full = error
            raise
        outcome = self.outcome(metrics, measured.size, measured.stitch_s, measured.eval_s)
        if len(measured.stages) > 1:
            outcome["stage_losses"] = [(count, self.loss_of(part)) for count, part in measured.stages]
        if search.student is not None:
            shape = measured.shape or self.session.trainer.shape_of(plan)
            outcome |= {"architecture": shape, "student": bool(measured.shape) and measured.shape != self.teacher}
        if measured.curve:
            outcome["kd_curve"] = list(measured.curve)
        context.writer.write(**outcome)
        return self.values(outcome)

    def outcome(self, metrics: Metrics, size: SizeReport, stitch_s: float, eval_s: float) -> dict[str, float]:
        """The record fields of a plan scored on the whole fitness pool."""
        search = self.config.search
        loss = self.loss_of(metrics)
        outcome = {
            "loss": loss,
            "kl": metrics.kl,
            "ce": metrics.ce,
            "ppl": metrics.ppl,
            "size_bytes": size.total_bytes,
            "size_ratio": size.ratio,
            "objective": search.alpha * loss + search.beta * size.ratio,
            "stitch_s": stitch_s,
            "eval_s": eval_s,
            "forward_s": metrics.n_tokens / metrics.tokens_per_s,
        }
        if self.max_bytes is not None:
            outcome["size_over_limit"] = float(size.total_bytes - self.max_bytes)
        return outcome

    def values(self, outcome: dict[str, float]) -> float | tuple[float, float]:
        """The study's objective value(s) of a scored plan's record fields."""
        if self.config.search.objective == "pareto":
            return outcome["loss"], outcome["size_ratio"]
        return outcome["objective"]

    @property
    def teacher(self) -> dict[str, int]:
        return teacher_shape(self.session.model.config)

    def student_check(self, context: TrialContext, plan: CompressionPlan) -> ReportCallback:
        """The callback a student's distillation runs every `report_every` steps: record its KD loss on the
        fitness pool, and stop the trial (optuna.TrialPruned) when the configured pruner judges it weak.

        A single-objective study reports α·KD + β·(the dense student's size) to Optuna and asks its pruner (the
        scalar objective's own terms, so a small student is not judged by loss alone). Optuna refuses
        report/should_prune in multi-objective studies, so there `student_pruning` applies the same rule itself
        to the curves of the study's other trials, comparing a student only with students no larger than it: on
        a Pareto frontier a smaller student may well have a higher loss.
        """
        search = self.config.search
        settings = search.student.distillation
        size_bytes = student_dense_bytes(self.session.model.config, self.session.trainer.shape_of(plan))
        size_ratio = size_bytes / self.session.dense_bytes
        context.writer.write(student_dense_bytes=size_bytes)
        curve: list[tuple[int, float]] = []

        def check(step: int, kl: float) -> None:
            curve.append((step, kl))
            context.writer.write(kd_curve=curve)
            if settings.pruner == "none" or context.is_seed:
                return
            if search.objective == "scalar":
                prune = context.report(search.alpha * kl + search.beta * size_ratio, step)
            else:
                prune = student_pruning(context.peers(), step, kl, size_bytes, settings)
            if prune:
                context.writer.write(partial_loss=kl, pruned_at_step=step)
                raise optuna.TrialPruned(f"KD loss {kl:.4g} at step {step}")

        return check

    def stage_check(self, context: TrialContext) -> StageCallback:
        """The callback `measure` runs after each stage: record, report, and prune if hopeless."""
        search = self.config.search
        began = time.perf_counter()
        partial: list[tuple[int, float]] = []

        def check(index: int, windows: int, metrics: Metrics, size: SizeReport) -> None:
            loss = self.loss_of(metrics)
            partial.append((windows, loss))
            context.writer.write(stage_losses=partial)
            beaten_by = self.beaten_by(context.peers(), windows, loss, size.total_bytes)
            optuna_prunes = False
            if search.objective == "scalar":
                optuna_prunes = context.report(search.alpha * loss + search.beta * size.ratio, windows)
            if context.is_seed or (beaten_by is None and not optuna_prunes):
                return
            context.writer.write(
                partial_loss=loss,
                partial_windows=windows,
                pruned_by=-1 if beaten_by is None else beaten_by,
                size_bytes=size.total_bytes,
                size_ratio=size.ratio,
                stitch_s=self.session.last_stitch_s,
                eval_s=time.perf_counter() - began - self.session.last_stitch_s,
            )
            raise optuna.TrialPruned(f"partial {search.loss} {loss:.4g} on {windows} windows")

        return check

    def beaten_by(self, peers: Sequence[TrialRecord], windows: int, loss: float, size_bytes: int) -> int | None:
        """A frontier member no larger than `size_bytes` whose loss on the same windows beats `loss` by
        more than the margin; None when there is none."""
        for member in frontier_of(peers, self.max_bytes):
            if member.size_bytes > size_bytes * (1 + SIZE_SLACK):
                continue
            reference = member.stage_loss.get(windows, member.loss)
            if loss > reference * (1 + self.config.search.margin()) and loss > reference:
                return member.number
        return None


def failure_reason(error: BaseException) -> str:
    """The one line a failed trial keeps of its exception."""
    return f"{type(error).__name__}: {error}".splitlines()[0][:500]


def student_dense_bytes(config, shape: dict[str, int]) -> int:
    """Bytes of a student of `shape` with every parameter in 16 bits (tied embeddings once), before compression."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(student_config(config, shape))
    return sum(parameter.numel() for parameter in model.parameters()) * HALF_BYTES


def student_pruning(
    peers: Sequence[TrialRecord], step: int, kl: float, size_bytes: int, settings: DistillationConfig
) -> bool:
    """Whether a student's KD loss at `step` marks it as weak, among the students no larger than it that reached
    that step (complete, pruned or running), once `startup_trials` of them have.

    median: its loss is above their median (Optuna's MedianPruner rule). halving and hyperband: at each rung
    (report_every · reduction_factor^k steps) it is not among the best 1/reduction_factor of them and itself
    (the rule of Optuna's SuccessiveHalvingPruner; Hyperband's brackets would split a handful of students
    into groups too small to compare, so a multi-objective study runs the one bracket).
    """
    at_step = []
    for other in peers:
        if other.student_dense_bytes is None or other.student_dense_bytes > size_bytes * 1.001:
            continue
        curve = {int(point[0]): point[1] for point in other.kd_curve}
        if step in curve:
            at_step.append(curve[step])
    if len(at_step) < max(1, settings.startup_trials):
        return False
    if settings.pruner == "median":
        return kl > statistics.median(at_step)
    rung = settings.report_every
    while rung < step:
        rung *= settings.reduction_factor
    if rung != step:
        return False
    competitors = sorted([*at_step, kl])
    kept = max(1, len(competitors) // settings.reduction_factor)
    return kl > competitors[kept - 1]
