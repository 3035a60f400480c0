"""The Pareto frontier of a study: non-dominated feasible trials, α·Loss + β·Size ranking, held-out figures."""

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

    def score(self, alpha: float, beta: float) -> float:
        return alpha * self.loss + beta * self.size_ratio


def non_dominated(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both minimized); ties keep the first."""
    order = sorted(range(len(points)), key=lambda index: (points[index][0], points[index][1], index))
    kept: list[int] = []
    best_second = float("inf")
    for index in order:
        if points[index][1] < best_second:
            kept.append(index)
            best_second = points[index][1]
    return sorted(kept)


def frontier_of(records: Sequence[TrialRecord], max_bytes: int | None = None) -> list[TrialRecord]:
    """The non-dominated scored trials on (loss, size) among those within `max_bytes`; infeasible ones never sit
    on it."""
    feasible = [record for record in records if record.scored and (max_bytes is None or record.size_bytes <= max_bytes)]
    points = [(record.loss, record.size_bytes) for record in feasible]
    return [feasible[index] for index in non_dominated(points)]


def frontier_points(
    study: StudyRecord, records: Sequence[TrialRecord], max_bytes: int | None, alpha: float, beta: float
) -> list[FrontierPoint]:
    """The frontier with held-out figures where measured, best α·Loss + β·Size first."""
    points = []
    for record in frontier_of(records, max_bytes):
        heldout = study.heldout.get(record.number)
        points.append(
            FrontierPoint(
                trial=record.number,
                loss=record.loss,
                size_bytes=record.size_bytes,
                size_ratio=record.size_ratio,
                objective=alpha * record.loss + beta * record.size_ratio,
                is_seed=record.seed,
                heldout_ppl=None if heldout is None else heldout.ppl,
                heldout_kl=None if heldout is None else heldout.kl,
                architecture=record.architecture,
                is_student=record.student,
                baseline=record.baseline,
            )
        )
    return sorted(points, key=lambda point: (point.objective, point.trial))
