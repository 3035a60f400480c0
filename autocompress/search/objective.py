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

from autocompress.config import Config, DistillationConfig, speed_floor
from autocompress.errors import UserError
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
from autocompress.targets.base import Speed, SpeedModel

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


def study_speed_model(session: CompressionSession) -> SpeedModel | None:
    """The target runtime's speed model of the session's plans where the study predicts speed (an objective, or a
    floor), holding the preset its floor names; measured now where the machine's cache lacks it. None otherwise."""
    search = session.config.search
    if not search.uses_speed:
        return None
    preset = None if search.min_speed is None else speed_floor(search.min_speed).preset
    try:
        return session.target.speed_model(session, [preset] if preset else [])
    except ValueError as error:
        raise UserError(f"speed: {error}") from error


def speed_floor_tps(config: Config, speed: SpeedModel | None) -> float | None:
    """`search.min_speed` in decode tokens/s, resolved with the speed model's dense and preset speeds."""
    if config.search.min_speed is None or speed is None:
        return None
    floor = speed_floor(config.search.min_speed)
    preset = None if floor.preset is None else speed.preset(floor.preset).decode_tps
    return floor.tokens(speed.dense.decode_tps, preset)


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
        self.speed = study_speed_model(session)
        self.min_tps = speed_floor_tps(config, self.speed)

    def predicted_speed(self, plan: CompressionPlan) -> Speed | None:
        """The plan's predicted speed where the study predicts speed (arithmetic on a table: no model runs)."""
        return None if self.speed is None else self.speed.predict(plan)

    def raise_if_disk_full(self) -> None:
        """Raise the full disk a trial met, once the search loop has stopped and recorded that trial's failure."""
        if self.disk_full is not None:
            raise self.disk_full

    def loss_of(self, metrics: Metrics) -> float:
        return metrics.kl if self.config.search.loss == "kl" else metrics.ce

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        """The local backend's objective: the trial's plan, scored and recorded in its own user attributes."""
        plan = self.space.plan_for(trial)
        return self.score(plan, OptunaTrialContext(trial))

    def score(self, plan: CompressionPlan, context: TrialContext) -> float | tuple[float, ...]:
        """Measure `plan`, record the outcome through `context.writer`, return the study's objective value(s).

        Raises optuna.TrialPruned for a plan stopped early; any other exception fails the trial, with its reason
        recorded; the study goes on.
        """
        search = self.config.search
        try:
            speed = self.predicted_speed(plan)
            staged = len(self.stages) > 1
            if self.session.trains(plan):
                measured = self.session.measure(plan, on_report=self.student_check(context, plan))
            elif staged:
                measured = self.session.measure(plan, stages=self.stages, on_stage=self.stage_check(context, speed))
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
        outcome = self.outcome(metrics, measured.size, measured.stitch_s, measured.eval_s, speed)
        if len(measured.stages) > 1:
            outcome["stage_losses"] = [(count, self.loss_of(part)) for count, part in measured.stages]
        if search.student is not None:
            shape = measured.shape or self.session.trainer.shape_of(plan)
            outcome |= {"architecture": shape, "student": bool(measured.shape) and measured.shape != self.teacher}
        if measured.curve:
            outcome["kd_curve"] = list(measured.curve)
        context.writer.write(**outcome)
        return self.values(outcome)

    def outcome(
        self, metrics: Metrics, size: SizeReport, stitch_s: float, eval_s: float, speed: Speed | None = None
    ) -> dict[str, float]:
        """The record fields of a plan scored on the whole fitness pool (with its predicted `speed` where the study
        predicts speed)."""
        loss = self.loss_of(metrics)
        outcome = {
            "loss": loss,
            "kl": metrics.kl,
            "ce": metrics.ce,
            "ppl": metrics.ppl,
            "size_bytes": size.total_bytes,
            "size_ratio": size.ratio,
            "stitch_s": stitch_s,
            "eval_s": eval_s,
            "forward_s": metrics.n_tokens / metrics.tokens_per_s,
        }
        if self.max_bytes is not None:
            outcome["size_over_limit"] = float(size.total_bytes - self.max_bytes)
        if speed is not None:
            outcome |= self.speed_fields(speed)
        outcome["objective"] = self.scalar(loss, size.ratio, outcome.get("speed_ratio"))
        return outcome

    def speed_fields(self, speed: Speed) -> dict[str, float]:
        """The record fields of a plan's predicted speed: tokens/s, the decode speed as a multiple of the dense
        model's, and how far under the floor it falls (the Optuna constraint; feasible when <= 0)."""
        fields = {
            "predicted_decode_tps": speed.decode_tps,
            "predicted_prompt_tps": speed.prompt_tps,
            "speed_ratio": speed.decode_tps / self.speed.dense.decode_tps,
        }
        if self.min_tps is not None:
            fields["speed_under_floor"] = self.min_tps - speed.decode_tps
        return fields

    def scalar(self, loss: float, size_ratio: float, speed_ratio: float | None) -> float:
        """α·Loss + β·Size, − γ·Speed (the predicted decode tokens/s as a multiple of the dense model's) where
        speed is an objective."""
        search = self.config.search
        value = search.alpha * loss + search.beta * size_ratio
        if search.speed_objective and speed_ratio is not None:
            value -= search.gamma * speed_ratio
        return value

    def values(self, outcome: dict[str, float]) -> float | tuple[float, ...]:
        """The study's objective value(s) of a scored plan's record fields, in the order of `search.objectives`."""
        search = self.config.search
        if search.objective == "scalar":
            return outcome["objective"]
        named = {"loss": "loss", "size": "size_ratio", "speed": "predicted_decode_tps"}
        return tuple(outcome[named[name]] for name in search.objectives)

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

    def stage_check(self, context: TrialContext, speed: Speed | None = None) -> StageCallback:
        """The callback `measure` runs after each stage: record, report, and prune if hopeless."""
        search = self.config.search
        began = time.perf_counter()
        partial: list[tuple[int, float]] = []
        speed_fields = {} if speed is None else self.speed_fields(speed)
        tps = None if speed is None or not search.speed_objective else speed.decode_tps

        def check(index: int, windows: int, metrics: Metrics, size: SizeReport) -> None:
            loss = self.loss_of(metrics)
            partial.append((windows, loss))
            context.writer.write(stage_losses=partial)
            beaten_by = self.beaten_by(context.peers(), windows, loss, size.total_bytes, tps)
            optuna_prunes = False
            if search.objective == "scalar":
                optuna_prunes = context.report(self.scalar(loss, size.ratio, speed_fields.get("speed_ratio")), windows)
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
                **speed_fields,
            )
            raise optuna.TrialPruned(f"partial {search.loss} {loss:.4g} on {windows} windows")

        return check

    def beaten_by(
        self, peers: Sequence[TrialRecord], windows: int, loss: float, size_bytes: int, tps: float | None = None
    ) -> int | None:
        """A frontier member no larger than `size_bytes` (and, with speed an objective, no slower than `tps`)
        whose loss on the same windows beats `loss` by more than the margin; None when there is none."""
        for member in frontier_of(peers, self.max_bytes, self.min_tps, speed=tps is not None):
            if member.size_bytes > size_bytes * (1 + SIZE_SLACK):
                continue
            if tps is not None and member.predicted_decode_tps < tps * (1 - SIZE_SLACK):
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
