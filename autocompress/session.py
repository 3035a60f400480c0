"""A model with everything a study computes once: token pools, calibration statistics, dense references.

One session serves every plan a process scores. Statistics and the fitness reference are cached on disk
(beside the study's storage) so a resumed or parallel process reuses them instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from autocompress.calibration import collect_statistics
from autocompress.compress import apply_plan, statistics_needed
from autocompress.config import Config
from autocompress.data import token_pools
from autocompress.evaluate import Metrics, dense_reference, evaluate
from autocompress.methods import LayerStatistics, Statistic
from autocompress.models import compressible_linears, load_model
from autocompress.plan import CompressionPlan
from autocompress.size import SizeReport, model_size


def save_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file under a temporary name, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(descriptor)
    try:
        save_file({key: value.contiguous() for key, value in tensors.items()}, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def inputs_fingerprint(config: Config) -> str:
    """A short hash of what the cached statistics and references depend on: the model and the data."""
    inputs = {"model": config.model.model_dump(), "data": config.data.model_dump()}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Measurement:
    size: SizeReport
    metrics: Metrics
    stitch_s: float
    eval_s: float


class CompressionSession:
    def __init__(self, config: Config, cache_dir: Path | None = None, progress: bool = False) -> None:
        self.config = config
        self.progress = progress
        self.model, self.tokenizer = load_model(**config.model.model_dump())
        self.pools = token_pools(config.data, self.tokenizer)
        self.linears = compressible_linears(self.model)
        self.dense_weights = {
            linear.name: linear.module.weight.detach().to("cpu", copy=True) for linear in self.linears
        }
        self.cache_dir = None if cache_dir is None else cache_dir / inputs_fingerprint(config)
        self._statistics: dict[str, LayerStatistics] = {linear.name: LayerStatistics() for linear in self.linears}
        self._collected: set[Statistic] = set()
        self._references: dict[str, torch.Tensor] = {}
        self._applied: dict[str, tuple] = {}  # compressed Linear name -> (setting, plan-wide options) it holds

    @property
    def dense_bytes(self) -> int:
        return model_size(self.model, CompressionPlan()).dense_bytes

    @property
    def batch_size(self) -> int:
        return self.config.data.batch_size

    def statistics(self, needs: set[Statistic]) -> dict[str, LayerStatistics]:
        """Calibration statistics for `needs`, from the disk cache or one pass of the dense model."""
        missing = needs - self._collected
        cached = {need for need in missing if self.cache_dir and (self.cache_dir / f"{need}.safetensors").is_file()}
        for need in cached:
            tensors = load_file(self.cache_dir / f"{need}.safetensors")
            for name, stats in self._statistics.items():
                setattr(stats, need, tensors[name])
                stats.n_tokens = int(tensors["n_tokens"])
        to_collect = missing - cached
        if to_collect:
            self.restore_dense()
            fresh = collect_statistics(
                self.model, self.linears, self.pools.calibration, to_collect, self.batch_size, self.progress
            )
            for need in to_collect:
                tensors = {name: getattr(stats, need).cpu() for name, stats in fresh.items()}
                for name, stats in self._statistics.items():
                    setattr(stats, need, tensors[name])
                    stats.n_tokens = fresh[name].n_tokens
                if self.cache_dir:
                    n_tokens = next(iter(fresh.values())).n_tokens
                    save_atomically(
                        {**tensors, "n_tokens": torch.tensor(n_tokens)}, self.cache_dir / f"{need}.safetensors"
                    )
        self._collected |= missing
        return self._statistics

    def reference(self, pool: str) -> torch.Tensor:
        """The dense model's log-probabilities on a pool ('fitness' is cached on disk, 'heldout' in memory)."""
        if pool in self._references:
            return self._references[pool]
        path = self.cache_dir / "reference-fitness.safetensors" if self.cache_dir and pool == "fitness" else None
        if path is not None and path.is_file():
            reference = load_file(path)["log_probs"]
        else:
            self.restore_dense()
            reference = dense_reference(self.model, getattr(self.pools, pool), self.batch_size)
            if path is not None:
                save_atomically({"log_probs": reference}, path)
        self._references[pool] = reference
        return reference

    def restore_dense(self) -> None:
        for linear in self.linears:
            if linear.name in self._applied:
                linear.module.weight.data.copy_(self.dense_weights[linear.name])
        self._applied.clear()

    def stitch(self, plan: CompressionPlan) -> SizeReport:
        """Make the resident model compute with `plan`, recompressing only the Linears whose setting changed."""
        statistics = self.statistics(statistics_needed(plan))  # first: collecting restores the dense weights
        plan_wide = tuple(sorted(plan.model_dump(exclude={"default", "layers"}).items()))
        to_compress = set()
        for linear in self.linears:
            setting = plan.setting(linear.name, linear.block)
            wanted = None if setting.is_identity else (setting, plan_wide)
            if self._applied.get(linear.name) == wanted:
                continue
            if linear.name in self._applied:
                linear.module.weight.data.copy_(self.dense_weights[linear.name])
                del self._applied[linear.name]
            if wanted is not None:
                to_compress.add(linear.name)
                self._applied[linear.name] = wanted
        apply_plan(self.model, plan, statistics, only=to_compress)
        return model_size(self.model, plan)

    def measure(self, plan: CompressionPlan, pool: str = "fitness") -> Measurement:
        """Size of `plan` and its distance to the dense model on a pool, with the time each part took."""
        reference = self.reference(pool)  # first: computing it restores the dense weights
        began = time.perf_counter()
        size = self.stitch(plan)
        stitched = time.perf_counter()
        metrics = evaluate(self.model, getattr(self.pools, pool), reference=reference, batch_size=self.batch_size)
        return Measurement(size, metrics, stitch_s=stitched - began, eval_s=time.perf_counter() - stitched)
