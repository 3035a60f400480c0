"""From a study to a shipped model and back: pick a trial, compress a fresh model with its plan, write it
in the format of the study's deployment target (or of another target, or a plain dense Hugging Face folder), then
evaluate what was written against the dense model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from transformers import PreTrainedModel

from autocompress.config import Config
from autocompress.errors import UserError
from autocompress.frontier import frontier_points
from autocompress.metrics import evaluate
from autocompress.plan import CompressionPlan
from autocompress.provenance import trial_provenance, with_versions
from autocompress.record import StudyLocation, StudyRecord, TrialRecord, trial_records
from autocompress.search.space import SearchSpace
from autocompress.session import CompressionSession
from autocompress.targets import target_named, target_writing
from autocompress.targets.artifact import prepare_out_dir, write_hf_folder
from autocompress.targets.base import ExportInput, Written


@dataclass
class ExportResult:
    path: Path
    format: str
    trial: int | None  # None: a plan given as JSON (`export --plan`)
    plan: CompressionPlan
    accounted_bytes: int  # what size accounting says the plan takes
    trial_size_bytes: int | None  # what the trial recorded
    trial_loss: float | None
    fitness_loss: float  # the exported model's loss on the fitness pool, measured again
    weights_bytes: int  # the bytes of the weights file written
    notes: list[str] = field(default_factory=list)  # what the format could not express
    warning: str | None = None  # what the file cannot store of the plan as searched, for stderr

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "trial": self.trial,
            "accounted_bytes": self.accounted_bytes,
            "trial_size_bytes": self.trial_size_bytes,
            "weights_bytes": self.weights_bytes,
            "trial_loss": self.trial_loss,
            "fitness_loss": self.fitness_loss,
            "notes": self.notes,
        }


def choose_trial(
    study: optuna.Study,
    record: StudyRecord,
    trial: int | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    max_size: str | None = None,
    pick: str = "best",
    gamma: float | None = None,
    min_speed: str | None = None,
) -> tuple[TrialRecord, str]:
    """Trial `trial`; or, among the frontier within `max_size` and no slower than `min_speed`, the member with the
    lowest α·Loss + β·Size (− γ·Speed where speed is an objective) (`pick` best) or the highest predicted decode
    tokens/s (`pick` fastest); and how it was chosen."""
    records = trial_records(study)
    if trial is not None:
        if not 0 <= trial < len(records):
            raise UserError(f"study {record.name!r} has no trial {trial} (it has {len(records)})")
        chosen = records[trial]
        if not chosen.scored:
            raise UserError(f"trial {trial} is {chosen.state.name.lower()}, not a complete scored trial")
        return chosen, f"trial {trial}"
    search = record.config.search
    if gamma is not None and not search.speed_objective:
        raise UserError(f"--gamma weighs speed, which is not among study {record.name!r}'s objectives")
    if pick == "fastest" and record.speed is None:
        raise UserError(f"--pick fastest: study {record.name!r} predicts no speed (its objectives are loss and size)")
    alpha = search.alpha if alpha is None else alpha
    beta = search.beta if beta is None else beta
    gamma = search.gamma if gamma is None else gamma
    max_bytes = record.max_bytes(max_size)
    min_tps = record.min_tps(min_speed)
    points = frontier_points(record, records, max_bytes, alpha, beta, gamma, min_tps)
    within = "" if max_bytes is None else f" within {max_bytes:,} bytes"
    within += "" if min_tps is None else f" at {min_tps:,.1f} tokens/s or more"
    if not points:
        raise UserError(f"study {record.name!r} has no complete trial on its frontier{within}")
    if pick == "fastest":
        fastest = min(points, key=lambda point: (-point.predicted_decode_tps, point.objective, point.trial))
        how = f"fastest on the frontier: {fastest.predicted_decode_tps:,.1f} predicted decode tokens/s"
        return records[fastest.trial], how + within
    how = f"best on the frontier by {alpha:g}·Loss + {beta:g}·Size"
    how += f" − {gamma:g}·Speed" if search.speed_objective else ""
    return records[points[0].trial], how + within


def export_trial(
    record: StudyRecord,
    location: StudyLocation,
    chosen: TrialRecord,
    out_dir: Path | str,
    format: str | None = None,
    overwrite: bool = False,
    chosen_by: str = "",
    session: CompressionSession | None = None,
) -> ExportResult:
    """Compress a fresh dense model with the trial's plan (the study's cached calibration statistics) and write it
    (`export_plan`)."""
    plan = SearchSpace.of_record(record).plan_from_params(chosen.params)  # the plan, before any model loads
    return export_plan(record, location, plan, out_dir, format, overwrite, chosen_by, session, chosen)


def export_plan(
    record: StudyRecord,
    location: StudyLocation,
    plan: CompressionPlan,
    out_dir: Path | str,
    format: str | None = None,
    overwrite: bool = False,
    chosen_by: str = "",
    session: CompressionSession | None = None,
    chosen: TrialRecord | None = None,
) -> ExportResult:
    """Compress a fresh dense model with `plan` (a trial's, `chosen`, or one given as JSON) with the study's cached
    calibration statistics and write it, in `format`: the study's deployment target's own by default, another
    target's, or `hf` (a dense folder).

    `session`, a session of the study's config, compresses instead of a fresh one: its resident model takes the
    plan as a trial's would, so that several plans export with one model load (the gguf verdict's files)."""
    config = record.config
    check_plan_ships(config, plan)
    target = target_named(config.compression.target)
    format = format or target.export_format
    try:
        writer = target_writing(format)  # None: the dense escape hatch
    except ValueError as error:
        raise UserError(f"--format: {error}") from error
    if writer is not None:
        writer = writer.for_config(config)  # vLLM's serving dtype
    refusal = target.export_refusal(format)
    if refusal is not None:
        raise UserError(f"--format: {refusal}")
    out_dir = prepare_out_dir(out_dir, overwrite)  # fail before the model loads
    session = session or CompressionSession(config, cache_dir=location.cache_dir)
    model = session.model
    reference = session.reference("fitness")  # before compressing: it may need the dense model
    if session.trains(plan):  # a student (or a recovered plan): built and distilled again, or from the cache
        trained = session.realize(plan)
        model, compressed, stored = trained.model, trained.compressed, None
    else:
        if plan.student is not None:  # a "student" of the teacher's own shape is the teacher
            plan = plan.model_copy(update={"student": None})
        session.check_plan(plan)
        compressed, stored = session.weights.for_export(plan)
    metrics = evaluate(model, session.pools.fitness, reference=reference, batch_size=config.data.batch_size)
    fitness_loss = metrics.kl if config.search.loss == "kl" else metrics.ce
    accounted = session.weights.export_bytes(model, plan, writer)  # the model written, a student's own if trained

    provenance = trial_provenance(record, location, chosen, chosen_by, accounted, fitness_loss)
    if writer is None:
        written = _write_dense(model, session.tokenizer, plan, out_dir, provenance)
    else:
        given = ExportInput(model, session.tokenizer, plan, config, compressed, stored, provenance)
        written = writer.export(given, out_dir)
    return ExportResult(
        path=written.path,
        format=format,
        trial=None if chosen is None else chosen.number,
        plan=plan,
        accounted_bytes=accounted,
        trial_size_bytes=None if chosen is None else chosen.size_bytes,
        trial_loss=None if chosen is None else chosen.loss,
        fitness_loss=fitness_loss,
        weights_bytes=written.weights_bytes,
        notes=written.notes,
        warning=written.warning,
    )


def check_plan_ships(config: Config, plan: CompressionPlan) -> None:
    """A UserError (one line), from the config alone, for a plan whose per-block shapes the config's study cannot
    build: its target's runtime runs none, or the config offers none (`search.structure`, whose alternatives a
    plan's shapes are stitched from; a shape it does not offer is refused once the model loads: `check_plan`)."""
    if not plan.structure:
        return
    target = config.compression.target
    if not target_named(target).runs_structure:
        raise UserError(
            "plan: per-block shapes (structure) ship as llama.cpp's deci architecture, under compression.target gguf "
            f"only, not {target}"
        )
    if config.search.structure is None:
        raise UserError(
            "plan: per-block shapes (structure) are built from the alternatives search.structure trains, and the "
            "config has none; give it a search.structure offering the plan's shapes"
        )


def _write_dense(
    model: PreTrainedModel, tokenizer, plan: CompressionPlan, out_dir: Path, provenance: dict[str, Any]
) -> Written:
    """The escape hatch (`--format hf`): a plain Hugging Face folder of the model computing with the plan, every
    weight dense, with the plan and provenance in autocompress.json."""
    provenance = with_versions(provenance | {"plan": json.loads(plan.to_json())})
    path = write_hf_folder(model, tokenizer, out_dir, model.dtype, overwrite=True, provenance=provenance)
    note = f"a plain Hugging Face folder stores every weight densely in {str(model.dtype)[6:]}"
    weights = sum(file.stat().st_size for file in path.glob("*.safetensors"))
    return Written(path, weights, [note], f"a plain Hugging Face folder cannot store this plan as searched: {note}")
