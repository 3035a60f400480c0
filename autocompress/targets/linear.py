"""Targets that store each compressible Linear on its own (`artifact`, `vllm`), and their weights backend.

`LinearTarget` counts a plan's bytes per Linear (`linear_bytes`) and per untouched tensor (`tensor_bytes`);
`LinearWeights` makes the resident model compute with a plan: each changed Linear gets its stored variant from the
layer-variant database (computed and stored first if missing), or is compressed again from its dense weight, and
a stitch is transactional (a failure midway leaves every Linear as `_applied` says).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from autocompress.compress import CompressedLinear, apply_plan, settings_needs, statistics_needed
from autocompress.models import CompressibleLinear, round_to_storage, unit_names
from autocompress.plan import CompressionPlan, LayerCompression
from autocompress.size import SizeReport, model_size
from autocompress.targets.base import Target, Weights
from autocompress.variants import BuildReport, VariantDatabase, methods_key, variant_settings

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from autocompress.config import Config
    from autocompress.session import CompressionSession


def uses_database(config: Config) -> bool:
    """Whether trials stitch stored variants: 'auto' means when a configured method needs the Hessian."""
    mode = config.search.database
    if mode != "auto":
        return mode == "on"
    settings = variant_settings(config.search.sparsity_levels(), config.search.precision_levels())
    return "hessian" in settings_needs(settings, CompressionPlan(**config.compression.plan_options()))


class LinearTarget(Target):
    """A target that stores each compressible Linear on its own and every other tensor alike."""

    @abstractmethod
    def linear_bytes(
        self,
        setting: LayerCompression,
        plan: CompressionPlan,
        out_features: int,
        in_features: int,
        bias: bool,
        dtype: torch.dtype,
    ) -> int:
        """Bytes one compressible Linear (weight and bias) of a model of `dtype` takes, compressed with `setting`."""

    @abstractmethod
    def tensor_bytes(self, numel: int, dtype: torch.dtype) -> int:
        """Bytes of an untouched tensor (embeddings, norms, lm_head) of `numel` values of `dtype`."""

    def overhead_bytes(self, model: nn.Module, plan: CompressionPlan) -> int:
        """Bytes the files take beyond their tensors (headers), when the target counts them."""
        return 0

    def weights(self, session: CompressionSession) -> LinearWeights:
        return LinearWeights(session, self)


class LinearWeights(Weights):
    """The compressible Linears of a session's resident model, stitched per plan (see the module docstring)."""

    def __init__(self, session: CompressionSession, target: LinearTarget) -> None:
        self.session = session
        self.target = target
        self.config = session.config
        self.model = session.model
        self.linears = session.linears
        self.dense_weights = session.dense_weights
        self._units = {granularity: unit_names(self.model, granularity) for granularity in ("block", "linear")}
        self._applied: dict[str, tuple] = {}  # compressed Linear name -> (setting, plan-wide options) it holds
        self.use_database = uses_database(self.config) and session.cache_dir is not None
        self._databases: dict[str, VariantDatabase] = {}

    @property
    def units(self) -> list[str]:
        return self._units[self.config.compression.granularity]

    def size(self, plan: CompressionPlan) -> SizeReport:
        return model_size(self.model, plan, self.target)

    @property
    def dense_bytes(self) -> int:
        """Every parameter in 16 bits."""
        return model_size(self.model, CompressionPlan()).dense_bytes

    def check_plan(self, plan: CompressionPlan) -> None:
        plan.check_units(self._units[plan.granularity])

    def prepare(self) -> None:
        if not self.use_database:  # a database is built by `build_database`, block by block
            plan = CompressionPlan(**self.config.compression.plan_options())
            search = self.config.search
            self.session.statistics(
                settings_needs(variant_settings(search.sparsity_levels(), search.precision_levels()), plan)
            )

    def database(self, plan: CompressionPlan | None = None) -> VariantDatabase:
        """The layer-variant database of `plan`'s plan-wide options (the config's by default)."""
        cache_dir = self.session.cache_dir
        if cache_dir is None:
            raise ValueError("a layer-variant database needs a session with a cache folder")
        if plan is None:
            plan = CompressionPlan(**self.config.compression.plan_options())
        key = methods_key(plan)
        if key not in self._databases:
            device = next(self.model.parameters()).device
            self._databases[key] = VariantDatabase(
                cache_dir / "variants", plan, self.dense_weights, self.session.linear_statistics, device
            )
        return self._databases[key]

    def build_database(self, progress: bool) -> BuildReport:
        """Compress every Linear at every level the config's search space may choose, once (resumable)."""
        search = self.config.search
        settings = variant_settings(search.sparsity_levels(), search.precision_levels())
        names = [linear.name for linear in self.linears]
        try:
            return self.database().build(names, settings, progress)
        finally:
            self.session.drop_held_hessians()

    def stitch(self, plan: CompressionPlan) -> SizeReport:
        """Make the resident model compute with `plan`, changing only the Linears whose setting changed.

        With the layer-variant database, a changed Linear gets its stored variant (computed and stored first
        if missing); without it, the Linear is compressed again from its dense weight.
        """
        session = self.session
        database = self.database(plan) if self.use_database else None
        # Without a database, first (as collecting statistics restores the dense weights) what the methods need for
        # every Linear. A variant the database lacks (usually none) is computed on the spot, and its statistics are
        # collected then: the stitch starts over after that.
        statistics = session.statistics(statistics_needed(plan)) if database is None else {}
        plan_wide = tuple(sorted(plan.model_dump(exclude={"default", "layers"}).items()))
        to_compress = {}
        for linear in self.linears:
            setting = plan.setting(linear.name, linear.block)
            wanted = None if setting.is_identity else (setting, plan_wide)
            if self._applied.get(linear.name) == wanted:
                continue
            session.block_inputs.block_changed(linear.block)  # before its weights change, whatever happens next
            if linear.name in self._applied:
                linear.module.weight.data.copy_(self.dense_weights[linear.name])
                del self._applied[linear.name]
            if wanted is not None:
                to_compress[linear.name] = (linear, setting)
        # Transactional: `_applied` records a Linear as soon as it holds its variant, and on any failure (an
        # error, Ctrl-C) the Linears not recorded are put back to dense, so the weights are always what
        # `_applied` says: later trials, restore_dense() and statistics collected later see exactly that.
        try:
            if database is None:
                apply_plan(self.model, plan, statistics, only=set(to_compress))
                for linear, setting in to_compress.values():
                    self._hold(linear, setting, plan_wide)
            else:
                restores = session.restores
                for linear, setting in to_compress.values():
                    linear.module.weight.data.copy_(database.load(linear.name, setting))
                    self._hold(linear, setting, plan_wide)
                if session.restores != restores:  # a variant computed on the spot needed statistics: start over
                    return self.stitch(plan)
        except BaseException:
            session.block_inputs.invalidate()
            for name, (linear, _setting) in to_compress.items():
                if name not in self._applied:
                    linear.module.weight.data.copy_(self.dense_weights[name])
            raise
        return model_size(self.model, plan, self.target)

    def _hold(self, linear: CompressibleLinear, setting: LayerCompression, plan_wide: tuple) -> None:
        """Record that `linear` now computes with `setting`; a pruned-only Linear first has its kept values
        rounded to the 16 bits an artifact stores them in (quantized ones compute with their stored codes)."""
        if setting.bits >= 16:
            round_to_storage(linear.module.weight.data, linear.name)
        self._applied[linear.name] = (setting, plan_wide)

    def restore_dense(self) -> None:
        for linear in self.linears:
            if linear.name in self._applied:
                linear.module.weight.data.copy_(self.dense_weights[linear.name])
        self._applied.clear()

    def compress_for_export(self, plan: CompressionPlan) -> dict[str, CompressedLinear]:
        """Compress the resident model with `plan` from its dense weights, returning each compressed Linear's
        stored form (`apply_plan(..., keep=True)`); the model then computes with exactly what those store.

        A plan whose methods need Hessians is compressed one Hessian group at a time, each group's Linears put
        back to dense once their stored forms are kept, so that the next group's calibration pass runs the
        dense model; the compressed weights are written at the end."""
        session = self.session
        needs = statistics_needed(plan)
        session.restore_dense()
        if "hessian" not in needs or session.has_collected("hessian"):
            compressed = apply_plan(self.model, plan, session.statistics(needs), keep=True)
        else:
            compressed = {}
            for group in session.hessian_groups:
                names = {linear.name for linear in group}
                statistics = {name: session.linear_statistics(needs, name) for name in names}
                compressed |= apply_plan(self.model, plan, statistics, keep=True, only=names)
                for linear in group:
                    linear.module.weight.data.copy_(self.dense_weights[linear.name])
            session.drop_held_hessians()
            for linear in self.linears:
                if linear.name in compressed:
                    linear.module.weight.data.copy_(compressed[linear.name].weight)
        plan_wide = tuple(sorted(plan.model_dump(exclude={"default", "layers"}).items()))
        for linear in self.linears:
            if linear.name in compressed:
                self._hold(linear, plan.setting(linear.name, linear.block), plan_wide)
        return compressed

    def for_export(self, plan: CompressionPlan) -> tuple[dict[str, CompressedLinear], Mapping[str, Any] | None]:
        return self.compress_for_export(plan), None

    def export_bytes(self, model: PreTrainedModel, plan: CompressionPlan, writer: Target | None) -> int:
        """As the writer stores the model where it counts per Linear too, else as the study's target does."""
        counting = writer if isinstance(writer, LinearTarget) else self.target
        return model_size(model, plan, counting).total_bytes
