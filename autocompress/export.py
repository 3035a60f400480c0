"""From a study to a shipped model and back: pick a trial, compress a fresh model with its plan, write it
(compressed artifact, plain Hugging Face folder, GGUF or compressed-tensors), then evaluate what was written against
the dense model."""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from transformers import PreTrainedModel

from autocompress.codecs import CompressedLinear
from autocompress.errors import UserError
from autocompress.frontier import frontier_points
from autocompress.metrics import evaluate
from autocompress.plan import CompressionPlan
from autocompress.record import StudyLocation, StudyRecord, TrialRecord, trial_records
from autocompress.search.space import SearchSpace
from autocompress.session import CompressionSession
from autocompress.size import model_size
from autocompress.targets import target_named
from autocompress.targets.artifact import (
    PROVENANCE_FILE,
    artifact_bytes,
    export_compressed,
    json_default,
    package_versions,
    prepare_out_dir,
    staged_write,
    write_hf_folder,
)

FORMATS = ("compressed", "hf", "gguf", "compressed-tensors")


@dataclass
class ExportResult:
    path: Path
    format: str
    trial: int
    plan: CompressionPlan
    accounted_bytes: int  # what size accounting says the plan takes
    trial_size_bytes: int | None  # what the trial recorded
    trial_loss: float | None
    fitness_loss: float  # the exported model's loss on the fitness pool, measured again
    weights_bytes: int  # the bytes of the weights file written
    notes: list[str] = field(default_factory=list)  # what the format could not express

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


def _redacted(url: str) -> str:
    """A storage URL without its password."""
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", url)


def choose_trial(
    study: optuna.Study,
    record: StudyRecord,
    trial: int | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    max_size: str | None = None,
) -> tuple[TrialRecord, str]:
    """Trial `trial`, or the frontier member with the lowest alpha·Loss + beta·Size; and how it was chosen."""
    records = trial_records(study)
    if trial is not None:
        if not 0 <= trial < len(records):
            raise UserError(f"study {record.name!r} has no trial {trial} (it has {len(records)})")
        chosen = records[trial]
        if not chosen.scored:
            raise UserError(f"trial {trial} is {chosen.state.name.lower()}, not a complete scored trial")
        return chosen, f"trial {trial}"
    alpha = record.config.search.alpha if alpha is None else alpha
    beta = record.config.search.beta if beta is None else beta
    max_bytes = record.max_bytes(max_size)
    points = frontier_points(record, records, max_bytes, alpha, beta)
    if not points:
        within = "" if max_bytes is None else f" within {max_bytes:,} bytes"
        raise UserError(f"study {record.name!r} has no complete trial on its frontier{within}")
    how = f"best on the frontier by {alpha:g}·Loss + {beta:g}·Size"
    return records[points[0].trial], how + ("" if max_bytes is None else f" within {max_bytes:,} bytes")


def export_trial(
    record: StudyRecord,
    location: StudyLocation,
    chosen: TrialRecord,
    out_dir: Path | str,
    format: str | None = None,
    overwrite: bool = False,
    chosen_by: str = "",
) -> ExportResult:
    """Compress a fresh dense model with the trial's plan (the study's cached calibration statistics) and write it,
    in `format` (the study's deployment target's own by default)."""
    config = record.config
    plan = SearchSpace.of_record(record).plan_from_params(chosen.params)  # the plan, before any model loads
    format = format or target_named(config.compression.target).export_format
    if format not in FORMATS:
        raise UserError(f"--format: unknown format {format!r}; choose {', '.join(FORMATS)}")
    if config.compression.target == "gguf" and format != "gguf":
        raise UserError(
            f"--format: a gguf study's levels are llama.cpp tensor types, which only gguf stores, not {format}"
        )
    out_dir = prepare_out_dir(out_dir, overwrite)  # fail before the model loads
    session = CompressionSession(config, cache_dir=location.cache_dir)
    model = session.model
    reference = session.reference("fitness")  # before compressing: it may need the dense model
    blocks = None  # a gguf study's tensors, as the file stores them
    if session.gguf is not None:
        session.stitch(plan)  # the model computes with what the blocks decode to, as in the search
        blocks, compressed = session.gguf.blocks_of(plan), {}
    elif session.trains(plan):  # a student (or a recovered plan): built and distilled again, or from the cache
        trained = session.realize(plan)
        model, compressed = trained.model, trained.compressed
    else:
        if plan.student is not None:  # a "student" of the teacher's own shape is the teacher
            plan = plan.model_copy(update={"student": None})
        compressed = session.compress_for_export(plan)
    metrics = evaluate(model, session.pools.fitness, reference=reference, batch_size=config.data.batch_size)
    fitness_loss = metrics.kl if config.search.loss == "kl" else metrics.ce
    if session.gguf is not None:
        accounted = session.size(plan).total_bytes
    else:  # the model written, a student's own where the plan trains one
        size_target = target_named("vllm").for_config(config) if format == "compressed-tensors" else session.target
        accounted = model_size(model, plan, size_target).total_bytes

    recorded = ("loss", "kl", "ce", "ppl", "size_bytes", "size_ratio", "objective")
    heldout = record.heldout.get(chosen.number)
    provenance = {
        "base_model": config.model.model_dump(mode="json"),
        "study": location.name,
        "storage": _redacted(location.storage_url),
        "trial": chosen.number,
        "chosen_by": chosen_by or f"trial {chosen.number}",
        "data": config.data.model_dump(mode="json"),
        "compression": config.compression.model_dump(mode="json"),
        "scoring": {"loss": config.search.loss, "alpha": config.search.alpha, "beta": config.search.beta},
        "metrics": {key: getattr(chosen, key) for key in recorded if getattr(chosen, key) is not None},
        "heldout": None if heldout is None else heldout.model_dump(exclude_none=True),
        "dense_heldout": None if record.dense_heldout is None else record.dense_heldout.model_dump(exclude_none=True),
        "dense_bytes": record.dense_bytes,
        "accounted_bytes": accounted,
        "export_fitness_loss": fitness_loss,
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    notes: list[str] = []
    if format == "compressed":
        path = export_compressed(model, session.tokenizer, plan, compressed, out_dir, provenance, overwrite=True)
        weights = artifact_bytes(path)
    elif format == "hf":
        provenance |= {"plan": json.loads(plan.to_json()), "versions": package_versions()}
        path = write_hf_folder(model, session.tokenizer, out_dir, model.dtype, overwrite=True, provenance=provenance)
        weights = sum(file.stat().st_size for file in path.glob("*.safetensors"))
        notes.append(f"a plain Hugging Face folder stores every weight densely in {str(model.dtype)[6:]}")
    elif format == "compressed-tensors":
        path = staged_write(
            out_dir,
            lambda folder: _write_compressed_tensors(
                model, session.tokenizer, compressed, folder, provenance, size_target.serve_dtype
            ),
        )
        weights = sum(file.stat().st_size for file in path.glob("*.safetensors"))
    else:
        from autocompress.targets.gguf.file import GGUF_FILE, tokenizer_gguf, write_gguf, write_gguf_tensors

        provenance["versions"] = package_versions()
        reports = []
        tokenizer_source = tokenizer_gguf(config.model)

        def write(folder: Path) -> None:
            path = folder / GGUF_FILE
            if blocks is not None:  # the types the search chose, as the blocks it evaluated
                report = write_gguf_tensors(
                    model, session.tokenizer, blocks, path, provenance, tokenizer_source=tokenizer_source, plan=plan
                )
            else:  # our artifact's levels mapped onto GGUF's 32-blocks where they can be
                report = write_gguf(
                    model,
                    session.tokenizer,
                    plan,
                    compressed,
                    path,
                    metadata=provenance,
                    tokenizer_source=tokenizer_source,
                )
            reports.append(report)

        path = staged_write(out_dir, write)
        weights = (path / GGUF_FILE).stat().st_size
        notes += [f"GGUF tensor types: {reports[0].summary()}", *reports[0].notes]
    return ExportResult(
        path=path,
        format=format,
        trial=chosen.number,
        plan=plan,
        accounted_bytes=accounted,
        trial_size_bytes=chosen.size_bytes,
        trial_loss=chosen.loss,
        fitness_loss=fitness_loss,
        weights_bytes=weights,
        notes=notes,
    )


def _write_compressed_tensors(
    model: PreTrainedModel,
    tokenizer,
    compressed: Mapping[str, CompressedLinear],
    folder: Path,
    provenance: dict[str, Any],
    serve_dtype: torch.dtype | None,
) -> None:
    """A compressed-tensors checkpoint of the compressed model: the codes and scales it computes with, written by
    compressed-tensors' own compressors (`targets.vllm`), the other tensors in `serve_dtype`, and our provenance
    beside it."""
    from autocompress.targets.vllm import write_compressed_tensors

    pruned = sorted(name for name, kept in compressed.items() if kept.mask is not None)
    if pruned:
        raise UserError(f"export: compressed-tensors for vLLM stores no sparse weights, but {pruned[0]} is pruned")
    quantized = {name: kept.quantized for name, kept in compressed.items() if kept.quantized is not None}
    try:
        write_compressed_tensors(model, tokenizer, quantized, folder, dtype=serve_dtype)
    except ValueError as error:
        raise UserError(f"export: {error}") from error
    text = json.dumps(
        {"format": "compressed-tensors", **provenance, "versions": package_versions()}, indent=2, default=json_default
    )
    (folder / PROVENANCE_FILE).write_text(text + "\n")
