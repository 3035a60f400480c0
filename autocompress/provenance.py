"""Where a written model comes from: the provenance an export records beside it (base model, study, trial, data,
scoring, the trial's and the export's figures) and the package versions that wrote it, as JSON.

Every target's writer stores the same dictionary in its own place (manifest.json, autocompress.json, a GGUF
metadata key), so a file says the same of itself whatever its format.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from autocompress.version import __version__

if TYPE_CHECKING:
    from autocompress.record import StudyLocation, StudyRecord, TrialRecord


def package_versions() -> dict[str, str]:
    import safetensors
    import transformers

    return {
        "autocompress": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if hasattr(value, "item"):  # torch and numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def with_versions(provenance: dict[str, Any]) -> dict[str, Any]:
    """`provenance` and the versions of the packages writing it."""
    return provenance | {"versions": package_versions()}


def _redacted(url: str) -> str:
    """A storage URL without its password."""
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", url)


def trial_provenance(
    record: StudyRecord,
    location: StudyLocation,
    chosen: TrialRecord | None,
    chosen_by: str,
    accounted: int,
    fitness_loss: float,
) -> dict[str, Any]:
    """The provenance of an export of trial `chosen` of a study (None: a plan given as JSON, which no trial
    measured): what it was compressed from and how, what the trial measured, and what the export accounted and
    measured again."""
    config = record.config
    recorded = ("loss", "kl", "ce", "ppl", "size_bytes", "size_ratio", "objective")
    heldout = None if chosen is None else record.heldout.get(chosen.number)
    measured = [] if chosen is None else [(key, getattr(chosen, key)) for key in recorded]
    metrics = {key: value for key, value in measured if value is not None}
    provenance = {
        "base_model": config.model.model_dump(mode="json"),
        "study": location.name,
        "storage": _redacted(location.storage_url),
        "trial": None if chosen is None else chosen.number,
        "chosen_by": chosen_by or f"trial {chosen.number}",
        "data": config.data.model_dump(mode="json"),
        "compression": config.compression.model_dump(mode="json"),
        "scoring": {"loss": config.search.loss, "alpha": config.search.alpha, "beta": config.search.beta},
        "metrics": metrics,
        "heldout": None if heldout is None else heldout.model_dump(exclude_none=True),
        "dense_heldout": None if record.dense_heldout is None else record.dense_heldout.model_dump(exclude_none=True),
        "dense_bytes": record.dense_bytes,
        "accounted_bytes": accounted,
        "export_fitness_loss": fitness_loss,
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return provenance
