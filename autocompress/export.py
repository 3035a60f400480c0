"""From a study to a shipped model and back: pick a trial, compress a fresh model with its plan, write it
(compressed artifact, plain Hugging Face folder or GGUF), then evaluate what was written against the dense model."""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from autocompress.compress import apply_plan, statistics_needed
from autocompress.config import Config, ModelConfig, parse_size
from autocompress.errors import UserError
from autocompress.frontier import DENSE_HELDOUT_KEY, HELDOUT_KEY, frontier_points
from autocompress.metrics import evaluate
from autocompress.models import EMBEDDED_MODEL, embedded_gguf
from autocompress.plan import CompressionPlan
from autocompress.size import model_size
from autocompress.targets.artifact import (
    artifact_bytes,
    export_compressed,
    package_versions,
    prepare_out_dir,
    staged_write,
    write_hf_folder,
)

FORMATS = ("compressed", "hf", "gguf")


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
    config: Config,
    trial: int | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    max_size: str | float | None = None,
    dense_bytes: int | None = None,
) -> tuple[FrozenTrial, str]:
    """Trial `trial`, or the frontier member with the lowest alpha·Loss + beta·Size; and how it was chosen."""
    if trial is not None:
        if not 0 <= trial < len(study.trials):
            raise UserError(f"study {study.study_name!r} has no trial {trial} (it has {len(study.trials)})")
        frozen = study.trials[trial]
        if frozen.state != TrialState.COMPLETE or "loss" not in frozen.user_attrs:
            raise UserError(f"trial {trial} is {frozen.state.name.lower()}, not a complete scored trial")
        return frozen, f"trial {trial}"
    alpha = config.search.alpha if alpha is None else alpha
    beta = config.search.beta if beta is None else beta
    limit = config.search.max_size if max_size is None else max_size
    try:
        max_bytes = None if limit is None or dense_bytes is None else parse_size(limit, dense_bytes)
    except ValueError as error:
        raise UserError(f"--max-size: {error}") from error
    points = frontier_points(study, max_bytes, alpha, beta)
    if not points:
        within = "" if max_bytes is None else f" within {max_bytes:,} bytes"
        raise UserError(f"study {study.study_name!r} has no complete trial on its frontier{within}")
    how = f"best on the frontier by {alpha:g}·Loss + {beta:g}·Size"
    return study.trials[points[0].trial], how + ("" if max_bytes is None else f" within {max_bytes:,} bytes")


def _tokenizer_gguf(model: ModelConfig) -> Path | None:
    """The GGUF file the base model came from, whose tokenizer llama.cpp reads as is."""
    if model.name == EMBEDDED_MODEL:
        return embedded_gguf()
    if model.name.endswith(".gguf"):
        return Path(model.name).expanduser()
    return None


def export_trial(
    study: optuna.Study,
    config: Config,
    location,
    frozen: FrozenTrial,
    out_dir: Path | str,
    format: str = "compressed",
    overwrite: bool = False,
    chosen_by: str = "",
) -> ExportResult:
    """Compress a fresh dense model with the trial's plan (the study's cached calibration statistics) and write it."""
    from autocompress.models import unit_names
    from autocompress.search.space import SearchSpace
    from autocompress.search.study import dense_bytes_of
    from autocompress.session import CompressionSession

    if format not in FORMATS:
        raise UserError(f"--format: unknown format {format!r}; choose {', '.join(FORMATS)}")
    out_dir = prepare_out_dir(out_dir, overwrite)  # fail before the model loads
    session = CompressionSession(config, cache_dir=location.cache_dir)
    model = session.model
    space = SearchSpace(config, unit_names(model, config.compression.granularity))
    plan = space.plan_from_params(frozen.params)
    reference = session.reference("fitness")  # before compressing: it may need the dense model
    if session.trains(plan):  # a student (or a recovered plan): built and distilled again, or from the cache
        trained = session.realize(plan)
        model, compressed = trained.model, trained.compressed
    else:
        if plan.student is not None:  # a "student" of the teacher's own shape is the teacher
            plan = plan.model_copy(update={"student": None})
        statistics = session.statistics(statistics_needed(plan))
        compressed = apply_plan(model, plan, statistics, keep=True)
    metrics = evaluate(model, session.pools.fitness, reference=reference, batch_size=config.data.batch_size)
    fitness_loss = metrics.kl if config.search.loss == "kl" else metrics.ce
    accounted = model_size(model, plan).total_bytes

    attrs = frozen.user_attrs
    recorded = ("loss", "kl", "ce", "ppl", "size_bytes", "size_ratio", "objective")
    provenance = {
        "base_model": config.model.model_dump(mode="json"),
        "study": location.name,
        "storage": _redacted(location.storage_url),
        "trial": frozen.number,
        "chosen_by": chosen_by or f"trial {frozen.number}",
        "data": config.data.model_dump(mode="json"),
        "compression": config.compression.model_dump(mode="json"),
        "scoring": {"loss": config.search.loss, "alpha": config.search.alpha, "beta": config.search.beta},
        "metrics": {key: attrs[key] for key in recorded if key in attrs},
        "heldout": study.user_attrs.get(HELDOUT_KEY.format(number=frozen.number)),
        "dense_heldout": study.user_attrs.get(DENSE_HELDOUT_KEY),
        "dense_bytes": dense_bytes_of(study),
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
    else:
        from autocompress.targets.gguf import GGUF_FILE, write_gguf

        provenance["versions"] = package_versions()
        reports = []

        def write(folder: Path) -> None:
            reports.append(
                write_gguf(
                    model,
                    session.tokenizer,
                    plan,
                    compressed,
                    folder / GGUF_FILE,
                    metadata=provenance,
                    tokenizer_source=_tokenizer_gguf(config.model),
                )
            )

        path = staged_write(out_dir, write)
        weights = (path / GGUF_FILE).stat().st_size
        notes += [f"GGUF tensor types: {reports[0].summary()}", *reports[0].notes]
    return ExportResult(
        path=path,
        format=format,
        trial=frozen.number,
        plan=plan,
        accounted_bytes=accounted,
        trial_size_bytes=attrs.get("size_bytes"),
        trial_loss=attrs.get("loss"),
        fitness_loss=fitness_loss,
        weights_bytes=weights,
        notes=notes,
    )
