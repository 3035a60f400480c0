"""Plans that train: the whole pipeline of `compress.STAGES`, distil a student → prune → (recover) → quantize, into
a new model beside the teacher.

A student has other shapes than the teacher, so the teacher's layer-variant database and stitching do not
serve it: the student is built (cut from the teacher, `methods.distillation.build_student`), distilled on the
calibration pool, then compressed directly with its own calibration statistics. The distilled dense student
depends only on its architecture and the distillation settings, so it is kept on disk (beside the study's
other caches) and every later plan of the same architecture, whatever its sparsity and bits, reuses it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from autocompress.calibration import collect_statistics
from autocompress.compress import COMPRESSION_STAGES, CompressedLinear, apply_plan, settings_needs
from autocompress.config import STUDENT_DIMENSIONS, DistillationConfig
from autocompress.distillation import (
    DistillationOptions,
    Importance,
    build_student,
    distill,
)
from autocompress.errors import UserError
from autocompress.files import write_atomically
from autocompress.models import compressible_linears, student_config, unit_names
from autocompress.plan import CompressionPlan, StudentArchitecture

log = logging.getLogger(__name__)

# (training step, KL to the teacher on the fitness pool); may raise to stop the training (a pruner's verdict)
ReportCallback = Callable[[int, float], None]


def weights_digest(model: torch.nn.Module) -> str:
    """A SHA-256 of a model's parameters and buffers (names and bytes), to tell a cached model from a changed one."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def teacher_shape(config) -> dict[str, int]:
    """The teacher's own value of every student dimension."""
    return StudentArchitecture().resolved(config)


def distillation_options(settings: DistillationConfig, seq_len: int, steps: int | None = None) -> DistillationOptions:
    """The training options of the config's distillation section (`steps` overrides its budget: recovery)."""
    return DistillationOptions(
        steps=settings.step_count(seq_len) if steps is None else steps,
        optimizer=settings.optimizer,
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
        temperature=settings.temperature,
        hidden_weight=settings.hidden_weight,
        ce_weight=settings.ce_weight,
        weight_decay=settings.weight_decay,
        gradient_checkpointing=settings.gradient_checkpointing,
        eval_every=settings.report_every,
        bf16=None if settings.bf16 == "auto" else settings.bf16 == "on",
    )


def without_training(plan: CompressionPlan) -> CompressionPlan:
    """The plan's compression alone (no student, no recovery), as `apply_plan` applies it to the built model."""
    return plan.model_copy(update={"student": None, "recovery_steps": 0})


@dataclass
class TrainedModel:
    """A plan applied: the new model, each compressed Linear's stored form, and the KD curve of its training."""

    model: PreTrainedModel
    compressed: dict[str, CompressedLinear]
    curve: list[tuple[int, float]]  # (step, KL on the fitness pool) of the student's distillation
    shape: dict[str, int]


class StudentTrainer:
    """Builds, distils (once per architecture, cached on disk) and compresses the students of one teacher."""

    def __init__(
        self,
        teacher: PreTrainedModel,
        importance: Callable[[], Importance],
        calibration: torch.Tensor,
        fitness: torch.Tensor,
        settings: DistillationConfig,
        batch_size: int,
        cache_dir: Path | None,
        inputs_key: str,
    ) -> None:
        self.teacher = teacher
        self.importance = importance
        self.calibration = calibration
        self.fitness = fitness
        self.settings = settings
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.inputs_key = inputs_key
        self.seq_len = calibration.shape[1]

    def shape_of(self, plan: CompressionPlan) -> dict[str, int]:
        """Every dimension of the plan's model (the teacher's where the plan has no student)."""
        architecture = plan.student or StudentArchitecture()
        try:
            return architecture.resolved(self.teacher.config)
        except ValueError as error:
            raise UserError(f"plan: {error}") from error

    def is_teacher(self, plan: CompressionPlan) -> bool:
        return self.shape_of(plan) == teacher_shape(self.teacher.config)

    def _cache_path(self, shape: Mapping[str, int]) -> Path | None:
        if self.cache_dir is None:
            return None
        key = json.dumps(
            {"inputs": self.inputs_key, "shape": dict(shape), "distillation": self.settings.model_dump()},
            sort_keys=True,
        )
        return self.cache_dir / "students" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"

    def distilled(
        self, shape: dict[str, int], on_report: ReportCallback | None
    ) -> tuple[PreTrainedModel, list[tuple[int, float]]]:
        """The dense student of `shape`, distilled to the end (from the disk cache when it was before)."""
        path = self._cache_path(shape)
        cached = None if path is None else self._cached(path, shape)
        if cached is not None:
            return cached
        architecture = StudentArchitecture(**shape)
        student = build_student(self.teacher, architecture, self.importance())
        curve: list[tuple[int, float]] = []

        def report(step: int, kl: float) -> bool:
            curve.append((step, kl))
            if on_report is not None:
                on_report(step, kl)  # raises to stop a hopeless student
            return False

        options = distillation_options(self.settings, self.seq_len)
        distill(student, self.teacher, self.calibration, options, eval_tokens=self.fitness, on_eval=report)
        if path is not None:  # only a student trained to the end is kept: a stopped one is not this shape's best
            metadata = {"curve": json.dumps(curve), "sha256": weights_digest(student)}  # one file, written whole
            write_atomically(path, lambda temporary: save_model(student, temporary, metadata=metadata))
        return student, curve

    def _cached(self, path: Path, shape: dict[str, int]) -> tuple[PreTrainedModel, list[tuple[int, float]]] | None:
        """The student of `shape` distilled before and its KD curve, or None when none is stored, or the stored one
        is unreadable or changed since it was written (its weights' digest differs): then it is trained again."""
        if not path.is_file():
            return None
        dtype = next(self.teacher.parameters()).dtype
        student = AutoModelForCausalLM.from_config(student_config(self.teacher.config, shape), dtype=dtype)
        try:
            with safe_open(path, "pt") as stored:
                metadata = stored.metadata() or {}
            load_model(student, path, device=str(next(self.teacher.parameters()).device))
            curve = [tuple(point) for point in json.loads(metadata["curve"])]
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            log.warning("student cache %s is unreadable (%s); distilling it again", path, error)
            return None
        if metadata.get("sha256") != weights_digest(student):
            log.warning("student cache %s changed since it was written; distilling it again", path)
            return None
        return student.eval(), curve

    def realize(self, plan: CompressionPlan, on_report: ReportCallback | None = None) -> TrainedModel:
        """Apply a plan that trains: distil (or copy the teacher) → prune → recover → quantize."""
        shape = self.shape_of(plan)
        if self.is_teacher(plan):
            model, curve = copy.deepcopy(self.teacher).eval(), []
        else:
            model, curve = self.distilled(shape, on_report)
        compression = without_training(plan)
        try:
            compression.check_units(unit_names(model, plan.granularity))
        except ValueError as error:
            raise UserError(f"plan: {error}") from error
        linears = compressible_linears(model)
        settings = [compression.default, *compression.layers.values()]
        masks = None
        if plan.recovery_steps > 0 and any(setting.sparsity > 0 for setting in settings):
            masks = self._prune_and_recover(model, compression, plan.recovery_steps, linears)  # before the grid
        stages = ("quantize",) if masks is not None else COMPRESSION_STAGES  # a recovered model keeps its masks
        statistics = collect_statistics(
            model, linears, self.calibration, settings_needs(settings, compression, stages), self.batch_size
        )
        compressed = apply_plan(model, compression, statistics, keep=True, masks=masks)
        return TrainedModel(model.eval(), compressed, curve, shape)

    def _prune_and_recover(
        self, model: PreTrainedModel, plan: CompressionPlan, steps: int, linears
    ) -> dict[str, torch.Tensor]:
        """The prune stage, then the recover stage (KD with the masks frozen); return the masks kept after."""
        settings = [plan.default, *plan.layers.values()]
        needs = settings_needs(settings, plan, ("prune",))
        statistics = collect_statistics(model, linears, self.calibration, needs, self.batch_size)
        pruned = apply_plan(model, plan, statistics, keep=True, stages=("prune",))
        masks = {name: kept.mask for name, kept in pruned.items() if kept.mask is not None}
        options = distillation_options(self.settings, self.seq_len, steps=steps)
        frozen = {f"{name}.weight": mask.to(model.dtype) for name, mask in masks.items()}
        distill(model, self.teacher, self.calibration, options, frozen_masks=frozen)
        return masks


def architecture_columns(shape: Mapping[str, int]) -> dict[str, int]:
    """The architecture as trials.csv and frontier.csv name it."""
    names = dict(zip(STUDENT_DIMENSIONS, ARCHITECTURE_COLUMNS, strict=True))
    return {names[dimension]: value for dimension, value in shape.items()}


ARCHITECTURE_COLUMNS = ("num_layers", "intermediate_size", "heads", "kv_heads", "hidden_size")
