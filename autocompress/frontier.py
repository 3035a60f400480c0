"""The Pareto frontier of a study: non-dominated feasible trials, α·Loss + β·Size (− γ·Speed) ranking, held-out
figures."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from autocompress.record import StudyRecord, TrialRecord


@dataclass(frozen=True)
class FrontierPoint:
    trial: int
    loss: float
    size_bytes: int
    size_ratio: float
    objective: float
    is_seed: bool
    heldout_ppl: float | None
    heldout_kl: float | None
    architecture: dict[str, int] | None = None  # in a study with students: the shape of the model measured
    is_student: bool = False
    baseline: str | None = None  # the baseline allocation or preset a seed stands for
    predicted_decode_tps: float | None = None  # where the study predicts speed
    speed_ratio: float | None = None  # the predicted decode tokens/s over the dense model's


def non_dominated(points: Sequence[tuple[float, ...]]) -> list[int]:
    """Indices of the points no other point matches or beats on every coordinate (all minimized); of equal points
    the first is kept."""
    order = sorted(range(len(points)), key=lambda index: (*points[index], index))
    if points and len(points[0]) == 2:  # one sweep: the best second coordinate so far
        kept: list[int] = []
        best_second = float("inf")
        for index in order:
            if points[index][1] < best_second:
                kept.append(index)
                best_second = points[index][1]
        return sorted(kept)
    kept = []
    for index in order:  # every kept point is no worse on the first coordinate
        point = points[index]
        if not any(all(other <= mine for other, mine in zip(points[k][1:], point[1:], strict=True)) for k in kept):
            kept.append(index)
    return sorted(kept)


def frontier_of(
    records: Sequence[TrialRecord], max_bytes: int | None = None, min_tps: float | None = None, speed: bool = False
) -> list[TrialRecord]:
    """The non-dominated scored trials on (loss, size), and predicted decode speed with `speed`, among those within
    `max_bytes` and no slower than `min_tps`; infeasible ones never sit on it."""
    feasible = [
        record
        for record in records
        if record.scored
        and (max_bytes is None or record.size_bytes <= max_bytes)
        and (min_tps is None or (record.predicted_decode_tps or 0.0) >= min_tps)
        and (not speed or record.predicted_decode_tps is not None)
    ]
    if speed:
        points = [(record.loss, record.size_bytes, -record.predicted_decode_tps) for record in feasible]
    else:
        points = [(record.loss, record.size_bytes) for record in feasible]
    return [feasible[index] for index in non_dominated(points)]


def frontier_points(
    study: StudyRecord,
    records: Sequence[TrialRecord],
    max_bytes: int | None,
    alpha: float,
    beta: float,
    gamma: float | None = None,
    min_tps: float | None = None,
) -> list[FrontierPoint]:
    """The frontier with held-out figures where measured, best α·Loss + β·Size first; where speed is one of the
    study's objectives, the frontier is over speed too and the ranking subtracts γ·(the predicted decode tokens/s
    as a multiple of the dense model's), γ the study's unless given."""
    search = study.config.search
    speed = search.speed_objective
    gamma = search.gamma if gamma is None else gamma
    points = []
    for record in frontier_of(records, max_bytes, min_tps, speed):
        heldout = study.heldout.get(record.number)
        objective = alpha * record.loss + beta * record.size_ratio
        if speed:
            objective -= gamma * record.speed_ratio
        points.append(
            FrontierPoint(
                trial=record.number,
                loss=record.loss,
                size_bytes=record.size_bytes,
                size_ratio=record.size_ratio,
                objective=objective,
                is_seed=record.seed,
                heldout_ppl=None if heldout is None else heldout.ppl,
                heldout_kl=None if heldout is None else heldout.kl,
                architecture=record.architecture,
                is_student=record.student,
                baseline=record.baseline,
                predicted_decode_tps=record.predicted_decode_tps,
                speed_ratio=record.speed_ratio,
            )
        )
    return sorted(points, key=lambda point: (point.objective, point.trial))
