"""The Pareto frontier of a study: non-dominated feasible trials, α·Loss + β·Size ranking, held-out figures."""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

HELDOUT_KEY = "heldout:{number}"
DENSE_HELDOUT_KEY = "heldout:dense"


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

    def score(self, alpha: float, beta: float) -> float:
        return alpha * self.loss + beta * self.size_ratio


def scored_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials that carry a loss and a size (what every autocompress trial records)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [trial for trial in trials if "loss" in trial.user_attrs and "size_bytes" in trial.user_attrs]


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


def frontier_trials(study: optuna.Study, max_bytes: int | None = None) -> list[FrozenTrial]:
    """The non-dominated trials on (loss, size) among those within `max_bytes`; infeasible ones never sit on it."""
    trials = [
        trial for trial in scored_trials(study) if max_bytes is None or trial.user_attrs["size_bytes"] <= max_bytes
    ]
    points = [(trial.user_attrs["loss"], trial.user_attrs["size_bytes"]) for trial in trials]
    return [trials[index] for index in non_dominated(points)]


def frontier_points(study: optuna.Study, max_bytes: int | None, alpha: float, beta: float) -> list[FrontierPoint]:
    """The frontier with held-out figures where measured, best α·Loss + β·Size first."""
    attrs = study.user_attrs
    points = []
    for trial in frontier_trials(study, max_bytes):
        heldout = attrs.get(HELDOUT_KEY.format(number=trial.number), {})
        points.append(
            FrontierPoint(
                trial=trial.number,
                loss=trial.user_attrs["loss"],
                size_bytes=trial.user_attrs["size_bytes"],
                size_ratio=trial.user_attrs["size_ratio"],
                objective=alpha * trial.user_attrs["loss"] + beta * trial.user_attrs["size_ratio"],
                is_seed=bool(trial.user_attrs.get("seed", False)),
                heldout_ppl=heldout.get("ppl"),
                heldout_kl=heldout.get("kl"),
                architecture=trial.user_attrs.get("architecture"),
                is_student=bool(trial.user_attrs.get("student", False)),
            )
        )
    return sorted(points, key=lambda point: (point.objective, point.trial))
