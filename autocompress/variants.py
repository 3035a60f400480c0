"""The layer-variant database: every compressible Linear compressed once at every level a search may choose.

A trial then only swaps stored variants into the resident model (`CompressionSession.stitch`) instead of
running the compression methods again, which for SparseGPT and GPTQ costs far more than scoring the plan.

Layout, beside the study's other caches (`results/<study>/cache/<inputs fingerprint>/variants/`):

    <methods key>/                      e.g. sparsegpt-unstructured-gptq-g128-asym-v1
      <linear name>/                    e.g. model.layers.3.mlp.down_proj
        s0.6000_b16.safetensors         one file per (sparsity, bits) level
        s0.0000_nf4.safetensors         or per (sparsity, named precision level)
        .lock                           held by the process computing this Linear's variants

Each file holds the stored form of one compressed weight that its level's codec writes (`codecs.encode_linear`,
exactly what an artifact stores of it), never the dense matrix: the kept positions as a 1-bit mask when pruned, and
bit-packed codes with their scales (and zero-points) when quantized; a pruned-only weight keeps its values in the
model's dtype (the exact values the compressed model computes with). The codec's manifest entry is the file's
metadata, so the same `codecs.decode_linear` reads both.

Files are written under a temporary name and renamed, so a kill at any moment leaves either a whole file
or none (a stale temporary file is removed by the next process that takes the Linear's lock). Several
processes may build one database at once: each claims a Linear with a non-blocking file lock and skips
the Linears others are computing, then waits for them at the end.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from autocompress.codecs import decode_linear, encode_linear, resolve
from autocompress.compress import prune_weight, quantize_weight, settings_needs
from autocompress.files import write_atomically
from autocompress.methods import LayerStatistics, Statistic
from autocompress.plan import CompressionPlan, LayerCompression

STORE_VERSION = "2"  # 2: the codecs' stored form (bit-packed codes), the entry as metadata
log = logging.getLogger(__name__)

StatisticsProvider = Callable[[set[Statistic], str], LayerStatistics]  # (needs, Linear name) -> its statistics


def save_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file as `write_atomically` does: readers never see half a file, a full disk is ENOSPC."""
    contiguous = {key: value.contiguous() for key, value in tensors.items()}
    write_atomically(path, lambda temporary: save_file(contiguous, temporary, metadata=metadata))


def methods_key(plan: CompressionPlan) -> str:
    """The folder name of the variants one set of plan-wide options produces."""
    pattern = plan.pattern.replace(":", "of")
    symmetry = "sym" if plan.symmetric else "asym"
    group = "row" if plan.group_size == -1 else plan.group_size
    return f"{plan.pruning}-{pattern}-{plan.quantization}-g{group}-{symmetry}-v{STORE_VERSION}"


def setting_at(sparsity: float, precision: int | str) -> LayerCompression:
    """The setting of a sparsity level and a precision level (a bit-width, or a named level)."""
    if isinstance(precision, str):
        return LayerCompression(sparsity=sparsity, format=precision)
    return LayerCompression(sparsity=sparsity, bits=precision)


def variant_settings(sparsity_levels: Iterable[float], precision_levels: Iterable[int | str]) -> list[LayerCompression]:
    """Every combination of the levels except the identity (which is the dense weight itself)."""
    precisions = list(precision_levels)
    settings = [setting_at(sparsity, precision) for sparsity in sparsity_levels for precision in precisions]
    return [setting for setting in dict.fromkeys(settings) if not setting.is_identity]


def variant_filename(setting: LayerCompression) -> str:
    precision = f"b{setting.bits}" if setting.format is None else setting.format
    return f"s{setting.sparsity:.4f}_{precision}.safetensors"


@torch.no_grad()
def compress_variants(
    weight: torch.Tensor, settings: list[LayerCompression], plan: CompressionPlan, stats: LayerStatistics
) -> dict[LayerCompression, tuple[dict[str, torch.Tensor], dict[str, str]]]:
    """The stored form of `weight` compressed at each setting through `compress`'s prune and quantize stages,
    pruning once per sparsity level and quantizing that result at each precision level, so a stitched weight
    equals a directly compressed one exactly."""
    stored = {}
    for sparsity in sorted({setting.sparsity for setting in settings}):
        pruned, mask = prune_weight(weight, LayerCompression(sparsity=sparsity), plan, stats)
        for setting in [setting for setting in settings if setting.sparsity == sparsity]:
            codec = resolve(setting, plan)
            compressed = quantize_weight(pruned, mask, codec, stats, weight.dtype)
            tensors, entry = encode_linear(codec, compressed, weight.dtype)
            metadata = {
                "version": STORE_VERSION,
                "dtype": str(weight.dtype).removeprefix("torch."),
                "entry": json.dumps(entry),
            }
            stored[setting] = tensors, metadata
    return stored


def decode_variant(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The weight a stored variant's model computes with, in the dtype it was stored for."""
    tensors = {key: value.to(device) for key, value in tensors.items()}
    return decode_linear(tensors, json.loads(metadata["entry"])).to(getattr(torch, metadata["dtype"]))


@dataclass(frozen=True)
class BuildReport:
    variants: int  # variants the build was asked for
    computed: int  # of which this process computed now
    seconds: float


@dataclass(frozen=True)
class DiskUsage:
    files: int
    bytes: int


class VariantDatabase:
    """The variants of one model's Linears under one set of plan-wide options, on disk, loaded lazily.

    `dense_weights` maps each Linear's name to its dense weight (any device; variants are computed on
    `device`), `statistics(needs, name)` gives one Linear's calibration statistics, asked for only when something
    must be computed, so a complete database never needs them.
    """

    def __init__(
        self,
        root: Path,
        plan: CompressionPlan,
        dense_weights: Mapping[str, torch.Tensor],
        statistics: StatisticsProvider,
        device: torch.device | str = "cpu",
    ) -> None:
        self.plan = plan.model_copy(update={"layers": {}, "default": LayerCompression()})
        self.root = Path(root) / methods_key(plan)
        self.dense_weights = dense_weights
        self.statistics = statistics
        self.device = torch.device(device)
        self.computed = 0  # variants this process computed, over its lifetime

    def path(self, name: str, setting: LayerCompression) -> Path:
        return self.root / name / variant_filename(setting)

    def has(self, name: str, setting: LayerCompression) -> bool:
        return self.path(name, setting).is_file()

    def needs(self, settings: Iterable[LayerCompression]) -> set[Statistic]:
        return settings_needs(settings, self.plan)

    def _compute(self, name: str, settings: list[LayerCompression]) -> int:
        """Compute and store the missing ones of `settings` for one Linear; the caller holds its lock."""
        folder = self.root / name
        for stale in folder.glob(".*.safetensors.*"):  # left by a killed writer; nobody else writes here now
            stale.unlink(missing_ok=True)
        missing = [setting for setting in settings if not self.has(name, setting)]
        if not missing:
            return 0
        stats = self.statistics(self.needs(missing), name)
        weight = self.dense_weights[name].to(self.device)
        for setting, (tensors, metadata) in compress_variants(weight, missing, self.plan, stats).items():
            save_atomically(tensors, self.path(name, setting), metadata)
        self.computed += len(missing)
        return len(missing)

    def _lock(self, name: str, timeout: float) -> FileLock:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.root / name / ".lock", timeout=timeout)
        lock.acquire()
        return lock

    def build(self, names: Iterable[str], settings: list[LayerCompression], progress: bool = False) -> BuildReport:
        """Make sure every Linear of `names` has every setting on disk; compute only what is missing.

        Linears another process is computing are skipped at first and waited for at the end.
        """
        began = time.perf_counter()
        names = list(names)
        computed = 0
        pending = [name for name in names if not all(self.has(name, setting) for setting in settings)]
        bar = tqdm(total=len(names), initial=len(names) - len(pending), desc="layer variants", disable=not progress)
        try:
            for blocking in (False, True):
                deferred = []
                for name in pending:
                    try:
                        lock = self._lock(name, timeout=-1 if blocking else 0)
                    except Timeout:
                        deferred.append(name)
                        continue
                    try:
                        computed += self._compute(name, settings)
                    finally:
                        lock.release()
                    bar.update(1)
                    bar.set_postfix(computed=computed)
                pending = deferred
        finally:
            bar.close()
        return BuildReport(len(names) * len(settings), computed, time.perf_counter() - began)

    def load(self, name: str, setting: LayerCompression) -> torch.Tensor:
        """The weight of one variant, computed and stored first if it is missing (or unreadable)."""
        path = self.path(name, setting)
        for attempt in range(2):
            if not path.is_file():
                lock = self._lock(name, timeout=-1)
                try:
                    self._compute(name, [setting])
                finally:
                    lock.release()
            try:
                return self._read(path, name)
            except (SafetensorError, OSError, KeyError, ValueError) as error:
                if attempt:
                    raise
                log.warning("layer variant %s is unreadable (%s); computing it again", path, error)
                path.unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def _read(self, path: Path, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        if metadata.get("version") != STORE_VERSION:
            raise ValueError(f"stored with format version {metadata.get('version')}, expected {STORE_VERSION}")
        shape = json.loads(metadata["entry"])["shape"]
        if tuple(shape) != tuple(self.dense_weights[name].shape):
            raise ValueError(f"stored for shape {shape}, the layer is {list(self.dense_weights[name].shape)}")
        return decode_variant(tensors, metadata, self.device)

    def disk_usage(self) -> DiskUsage:
        files = [path for path in self.root.rglob("*.safetensors") if not path.name.startswith(".")]
        return DiskUsage(len(files), sum(path.stat().st_size for path in files))


def load_variant_file(path: Path) -> torch.Tensor:
    """One stored variant, decoded on the CPU (for inspection and tests)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    return decode_variant(load_file(path), metadata)
