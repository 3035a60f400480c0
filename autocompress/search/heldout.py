"""Held-out judging: every frontier member (and the dense model) measured once on tokens the search never saw."""

from __future__ import annotations

import optuna
from tqdm.auto import tqdm

from autocompress.frontier import frontier_of
from autocompress.plan import CompressionPlan
from autocompress.record import HeldoutFigures, StudyLocation, StudyRecord, record_heldout, scored_records
from autocompress.search.space import Params, SearchSpace
from autocompress.session import CompressionSession

Pending = dict[int | None, Params]  # trial number (None: the dense model) -> the parameters of its plan


def heldout_pending(
    study: optuna.Study, space: SearchSpace, max_bytes: int | None = None, min_tps: float | None = None
) -> Pending:
    """The plans whose held-out figures the study lacks, the dense model first."""
    known = StudyRecord.of(study)
    pending: Pending = {} if known.dense_heldout is not None else {None: space.dense_params()}
    speed = space.config.search.speed_objective
    for member in frontier_of(scored_records(study), max_bytes, min_tps, speed):
        if member.number not in known.heldout:
            pending[member.number] = member.params
    return pending


def heldout_figures(session: CompressionSession, space: SearchSpace, params: Params | None) -> HeldoutFigures:
    """One plan's held-out figures (`params` None: the dense model's, perplexity only)."""
    plan: CompressionPlan = space.teacher_plan() if params is None else space.plan_from_params(params)
    metrics = session.measure(plan, pool="heldout").metrics
    return HeldoutFigures(ppl=metrics.ppl) if params is None else HeldoutFigures(ppl=metrics.ppl, kl=metrics.kl)


def judge_pending(study: optuna.Study, session: CompressionSession, space: SearchSpace, pending: Pending) -> None:
    for number, params in tqdm(
        pending.items(), desc="held-out judging of the frontier", disable=not session.progress, leave=False
    ):
        record_heldout(study, number, heldout_figures(session, space, None if number is None else params))


def judge_frontier(
    study: optuna.Study, location: StudyLocation, max_bytes: int | None, min_tps: float | None = None
) -> None:
    """Held-out figures for frontier members that lack them; loads the model only when some are missing."""
    record = StudyRecord.of(study)
    space = SearchSpace.of_record(record)
    pending = heldout_pending(study, space, max_bytes, min_tps)
    if pending:
        judge_pending(study, CompressionSession(record.config, cache_dir=location.cache_dir), space, pending)
