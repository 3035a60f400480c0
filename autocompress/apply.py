"""Compress a model once with one plan and measure it against the dense model: what `apply` runs."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

from autocompress.calibration import collect_statistics
from autocompress.compress import apply_plan, statistics_needed
from autocompress.config import Config
from autocompress.data import token_pools
from autocompress.export import check_plan_ships
from autocompress.metrics import evaluate
from autocompress.models import compressible_linears, load_model
from autocompress.plan import CompressionPlan
from autocompress.size import model_size
from autocompress.targets import target_named


@dataclass(frozen=True)
class OneshotResult:
    dense_ppl: float
    heldout_ppl: float
    kl: float
    size_bytes: int
    dense_bytes: int
    size_ratio: float
    tokens_per_s: float
    dense_tokens_per_s: float
    per_layer_bytes: dict[str, int]

    def as_dict(self) -> dict:
        return asdict(self)


def oneshot(config: Config, plan: CompressionPlan, progress: bool = True) -> OneshotResult:
    check_plan_ships(config, plan)
    if plan.trains or plan.structure:
        return session_oneshot(config, plan, progress)
    target = target_named(config.compression.target).for_config(config)
    target.check_model(config)
    model, tokenizer = load_model(**config.model.model_dump())
    pools = token_pools(config.data, tokenizer)
    batch_size = config.data.batch_size
    dense = copy.deepcopy(model)
    statistics = collect_statistics(
        model, compressible_linears(model), pools.calibration, statistics_needed(plan), batch_size, progress
    )
    apply_plan(model, plan, statistics)
    dense_metrics = evaluate(dense, pools.heldout, batch_size=batch_size)
    metrics = evaluate(model, pools.heldout, reference=dense, batch_size=batch_size)
    size = model_size(model, plan, target)
    return OneshotResult(
        dense_ppl=dense_metrics.ppl,
        heldout_ppl=metrics.ppl,
        kl=metrics.kl,
        size_bytes=size.total_bytes,
        dense_bytes=size.dense_bytes,
        size_ratio=size.ratio,
        tokens_per_s=metrics.tokens_per_s,
        dense_tokens_per_s=dense_metrics.tokens_per_s,
        per_layer_bytes=size.per_layer,
    )


def session_oneshot(config: Config, plan: CompressionPlan, progress: bool = True) -> OneshotResult:
    """A plan that trains (a student, a recovery: built beside the dense teacher, distilled with the config's
    `search.student.distillation` settings, the defaults without one, then compressed) or that gives blocks their
    own shapes (stitched from the alternatives `search.structure` trains, as a trial's are), judged the same way."""
    from autocompress.session import CompressionSession

    session = CompressionSession(config, progress=progress)
    session.check_plan(plan)
    measured = session.measure(plan, pool="heldout")
    session.restore_dense()
    dense_metrics = evaluate(session.model, session.pools.heldout, batch_size=session.batch_size)
    return OneshotResult(
        dense_ppl=dense_metrics.ppl,
        heldout_ppl=measured.metrics.ppl,
        kl=measured.metrics.kl,
        size_bytes=measured.size.total_bytes,
        dense_bytes=measured.size.dense_bytes,
        size_ratio=measured.size.ratio,
        tokens_per_s=measured.metrics.tokens_per_s,
        dense_tokens_per_s=dense_metrics.tokens_per_s,
        per_layer_bytes=measured.size.per_layer,
    )
