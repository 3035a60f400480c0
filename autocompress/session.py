"""A model with everything a study computes once: token pools, calibration statistics, dense references.

One session serves every plan a process scores. Statistics and the dense references are cached on disk
(beside the study's storage) so a resumed or parallel process reuses them instead of recomputing. Measuring a plan
against the references is `measurement.Measurer`'s; the session orchestrates: model, pools, statistics, stitching.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

from autocompress.block_reuse import BlockInputCache
from autocompress.calibration import collect_statistics
from autocompress.compress import CompressedLinear
from autocompress.config import Config
from autocompress.data import TokenPools, token_pools
from autocompress.errors import UserError
from autocompress.measurement import Measurement, Measurer, Reference, StageCallback
from autocompress.methods import LayerStatistics, Statistic
from autocompress.models import (
    CompressibleLinear,
    compressible_linears,
    load_model,
    model_fingerprint,
    round_model_to_storage,
)
from autocompress.plan import CompressionPlan
from autocompress.size import SizeReport
from autocompress.targets import target_named
from autocompress.variants import BuildReport, VariantDatabase, save_atomically

if TYPE_CHECKING:
    from autocompress.students import ReportCallback, StudentTrainer, TrainedModel

__all__ = ["CompressionSession", "save_atomically"]

log = logging.getLogger(__name__)


def inputs_fingerprint(config: Config, model_content: str, pools: TokenPools) -> str:
    """A short hash of what the cached statistics, references and variants depend on: the model and data
    configs, the model's content (`models.model_fingerprint`: its files' hashes, or its hub commit) and every
    token of the pools (`TokenPools.digest`), so an edited corpus or changed weights never reuse a cache."""
    inputs = {
        "model": config.model.model_dump(),
        "data": config.data.model_dump(),
        "model_content": model_content,
        "tokens": pools.digest(),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


ALIASES_KEY = "aliases"  # cache-file metadata: {name: the name whose tensor it is}


def save_cache(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a cache file atomically, a tensor that several names hold once (read_cache restores the names)."""
    first_name: dict[int, str] = {}
    aliases = {}
    for name, tensor in tensors.items():
        owner = first_name.setdefault(id(tensor), name)
        if owner != name:
            aliases[name] = owner
    unique = {name: tensor for name, tensor in tensors.items() if name not in aliases}
    save_atomically(unique, path, metadata={ALIASES_KEY: json.dumps(aliases)})


def read_cache(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache file, or None when it is missing or unreadable (corrupted, truncated): then it is
    computed again and rewritten whole."""
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as file:
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
            aliases = json.loads((file.metadata() or {}).get(ALIASES_KEY, "{}"))
        return tensors | {name: tensors[owner] for name, owner in aliases.items()}
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        log.warning("cache file %s is unreadable (%s); computing it again", path, error)
        return None


def hessian_groups(linears: list[CompressibleLinear], memory_bytes: int) -> list[list[CompressibleLinear]]:
    """The Linears by consecutive blocks whose float32 Hessians (in_features² × 4 bytes each, counted without
    the sharing of q/k/v and gate/up, so an upper bound) fit `memory_bytes`; every group holds one block at
    least."""
    groups: list[list[CompressibleLinear]] = []
    held = 0
    for block in dict.fromkeys(linear.block for linear in linears):
        members = [linear for linear in linears if linear.block == block]
        size = sum(linear.module.in_features**2 * 4 for linear in members)
        if groups and held + size <= memory_bytes:
            groups[-1].extend(members)
            held += size
        else:
            groups.append(members)
            held = size
    return groups


class CompressionSession:
    def __init__(self, config: Config, cache_dir: Path | None = None, progress: bool = False) -> None:
        self.config = config
        self.progress = progress
        self.target = target_named(config.compression.target).for_config(config)
        self.target.check_model(config)  # from the model's config alone, before its weights load
        self.model, self.tokenizer = load_model(**config.model.model_dump())
        round_model_to_storage(self.model, self.target.serve_dtype)  # the dense model is what is stored of it
        self.pools = token_pools(config.data, self.tokenizer)
        self.linears = compressible_linears(self.model)
        self.calibrated = list(self.linears)  # the Linears whose inputs calibration statistics describe
        self.dense_weights = {
            linear.name: linear.module.weight.detach().to("cpu", copy=True) for linear in self.linears
        }
        self.inputs_key = inputs_fingerprint(config, model_fingerprint(config.model.name, self.model), self.pools)
        self.cache_dir = None if cache_dir is None else cache_dir / self.inputs_key
        self.weights = self.target.weights(self)  # the target's backend: units, their bytes, stitch
        # A stitch that changes more than decoder blocks (the embeddings, the output) the cache cannot see: kept off.
        reuse_bytes = int(config.search.reuse_memory_mb * 10**6) if self.weights.reuses_block_inputs else 0
        self.block_inputs = BlockInputCache(self.model, *self.pools.fitness.shape, memory_bytes=reuse_bytes)
        self._statistics: dict[str, LayerStatistics] = {linear.name: LayerStatistics() for linear in self.calibrated}
        self._collected: set[Statistic] = set()
        self.hessian_groups = hessian_groups(self.linears, int(config.search.hessian_memory_mb * 10**6))
        self._held_hessians: dict[str, LayerStatistics] = {}  # of one group of blocks (linear_statistics)
        self.hessian_passes = 0  # calibration passes linear_statistics ran, one per group of blocks
        self.measurer = Measurer(self)  # the dense references, and plans scored against them
        self.restores = 0  # times the resident model went back to dense (collecting statistics does)
        self._trainer: StudentTrainer | None = None

    @property
    def units(self) -> list[str]:
        """The units a plan of this study names (blocks or Linears, and whatever else the target makes units)."""
        return self.weights.units

    def unit_levels(self) -> dict[str, list[str]] | None:
        """The levels each unit may take where the target restricts them by shape; None: every unit all."""
        return self.weights.unit_levels(self.config.search.precision_levels())

    def size(self, plan: CompressionPlan) -> SizeReport:
        """The plan's bytes as the study's target stores them."""
        return self.weights.size(plan)

    @property
    def trainer(self) -> StudentTrainer:
        """Builds, distils and compresses students of the resident (dense) teacher."""
        if self._trainer is None:
            from autocompress.config import DistillationConfig
            from autocompress.distillation import measure_importance
            from autocompress.students import StudentTrainer

            student = self.config.search.student
            settings = DistillationConfig() if student is None else student.distillation

            @functools.cache  # measured once per session, when the first student is cut
            def importance():
                self.restore_dense()
                windows = self.pools.calibration[: settings.importance_windows]
                return measure_importance(self.model, windows, self.batch_size)

            self._trainer = StudentTrainer(
                teacher=self.model,
                importance=importance,
                calibration=self.pools.calibration,
                fitness=self.pools.fitness,
                settings=settings,
                batch_size=self.batch_size,
                cache_dir=self.cache_dir,
                inputs_key=self.inputs_key,
            )
        return self._trainer

    def trains(self, plan: CompressionPlan) -> bool:
        """Whether scoring `plan` trains a model (a student, or a recovery) instead of stitching the teacher."""
        return plan.recovery_steps > 0 or (plan.student is not None and not self.trainer.is_teacher(plan))

    def realize(self, plan: CompressionPlan, on_report: ReportCallback | None = None) -> TrainedModel:
        """A plan that trains, applied: a new model beside the resident teacher (kept dense meanwhile)."""
        self.restore_dense()
        return self.trainer.realize(plan, on_report)

    @property
    def dense_bytes(self) -> int:
        """The uncompressed model's bytes as the target counts them (every parameter in 16 bits, an F16 file...)."""
        return self.weights.dense_bytes

    @property
    def batch_size(self) -> int:
        return self.config.data.batch_size

    def statistics(self, needs: set[Statistic]) -> dict[str, LayerStatistics]:
        """Calibration statistics for `needs`, from the disk cache or one pass of the dense model."""
        missing = needs - self._collected
        cached = set()
        for need in missing if self.cache_dir else ():
            tensors = read_cache(self.cache_dir / f"{need}.safetensors")
            if tensors is None or not {*self._statistics, "n_tokens"} <= set(tensors):
                continue
            for name, stats in self._statistics.items():
                setattr(stats, need, tensors[name])
                stats.n_tokens = int(tensors["n_tokens"])
            cached.add(need)
        to_collect = missing - cached
        if to_collect:
            self.restore_dense()
            fresh = collect_statistics(
                self.model, self.calibrated, self.pools.calibration, to_collect, self.batch_size, self.progress
            )
            for need in to_collect:
                on_cpu: dict[int, torch.Tensor] = {}  # Linears sharing an input share one tensor here too
                for stats in fresh.values():
                    value = getattr(stats, need)
                    if id(value) not in on_cpu:
                        on_cpu[id(value)] = value.cpu()
                tensors = {name: on_cpu[id(getattr(stats, need))] for name, stats in fresh.items()}
                for name, stats in self._statistics.items():
                    setattr(stats, need, tensors[name])
                    stats.n_tokens = fresh[name].n_tokens
                if self.cache_dir:
                    n_tokens = next(iter(fresh.values())).n_tokens
                    save_cache({**tensors, "n_tokens": torch.tensor(n_tokens)}, self.cache_dir / f"{need}.safetensors")
        self._collected |= missing
        return self._statistics

    def has_collected(self, need: Statistic) -> bool:
        return need in self._collected

    def drop_held_hessians(self) -> None:
        """Free the Hessians `linear_statistics` holds (once a group's variants or stored forms are kept)."""
        self._held_hessians = {}

    def linear_statistics(self, needs: set[Statistic], name: str) -> LayerStatistics:
        """One Linear's statistics for `needs`, as `statistics` gives them, but with Hessians collected and held
        for one group of consecutive blocks at a time (`hessian_groups`): asking for a Linear of the next group
        drops the held ones and runs the calibration pass up to that group's last block. The layer-variant
        database asks Linear by Linear in block order, so each group is collected once and dropped once its
        variants are stored."""
        cheap = self.statistics(needs - {"hessian"})[name]
        if "hessian" not in needs or "hessian" in self._collected:
            return self._statistics[name]
        if name not in self._held_hessians:
            group = next(group for group in self.hessian_groups if name in {linear.name for linear in group})
            self._held_hessians = {}  # freed before the next group's sums are allocated
            self.restore_dense()
            self._held_hessians = collect_statistics(
                self.model, group, self.pools.calibration, {"hessian"}, self.batch_size, self.progress
            )
            self.hessian_passes += 1
        held = self._held_hessians[name]
        return LayerStatistics(held.n_tokens, input_sq_norms=cheap.input_sq_norms, hessian=held.hessian)

    def reference(self, pool: str) -> Reference:
        """The dense model's log-probabilities on a pool, computed once (`Measurer.reference`)."""
        return self.measurer.reference(pool)

    @property
    def last_stitch_s(self) -> float:
        """The stitch time of the latest `measure`, for a trial that staged fitness stops."""
        return self.measurer.last_stitch_s

    def restore_dense(self) -> None:
        self.restores += 1
        self.block_inputs.invalidate()
        self.weights.restore_dense()

    @property
    def use_database(self) -> bool:
        """Whether trials stitch the layer-variant database's stored variants."""
        return self.weights.use_database

    def database(self, plan: CompressionPlan | None = None) -> VariantDatabase:
        """The layer-variant database of `plan`'s plan-wide options (the config's by default)."""
        return self.weights.database(plan)

    def build_database(self, progress: bool | None = None) -> BuildReport:
        """Compress every Linear at every level the config's search space may choose, once (resumable)."""
        return self.weights.build_database(self.progress if progress is None else progress)

    def stitch(self, plan: CompressionPlan) -> SizeReport:
        """Make the resident model compute with `plan`, changing only the units whose level changed (the target's
        backend, `weights.stitch`); a plan its units cannot take is a UserError."""
        self.check_plan(plan)
        return self.weights.stitch(plan)

    def check_plan(self, plan: CompressionPlan) -> None:
        try:
            self.weights.check_plan(plan)
        except ValueError as error:
            raise UserError(f"plan: {error}") from error

    def compress_for_export(self, plan: CompressionPlan) -> dict[str, CompressedLinear]:
        """The resident model compressed with `plan` from its dense weights, each compressed Linear's stored form."""
        return self.weights.compress_for_export(plan)

    def measure(
        self,
        plan: CompressionPlan,
        pool: str = "fitness",
        stages: Sequence[int] | None = None,
        on_stage: StageCallback | None = None,
        on_report: ReportCallback | None = None,
        start: int = 0,
    ) -> Measurement:
        """Size of `plan` and its distance to the dense model on a pool, with the time each part took.

        `stages` scores the pool in growing prefixes of that many windows (the last one is how far it goes,
        the whole pool by default); with `start`, the windows from `start` on only (a candidate of a generation
        scored stage by stage, its parts combined by `combine_metrics`); after every stage but the last, `on_stage`
        sees the metrics so far and may raise (optuna.TrialPruned) to stop there. A plan that trains (a student) is
        built, distilled and compressed instead of stitched; `on_report` sees its KD loss on the fitness pool every
        few steps and may raise to stop the training. Its size is a fraction of the dense teacher's, like every plan's.
        On the fitness pool, each batch runs from the last block whose kept input (`block_inputs`, within
        `search.reuse_memory_mb`) no weight change since reaches; the metrics are those of a full evaluation.
        """
        return self.measurer.measure(plan, pool, stages, on_stage, on_report, start)
