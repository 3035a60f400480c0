"""GGUF's own tensor types as the levels of a plan (`compression.target: gguf`): what each unit may take, how it is
quantized and decoded, how many bytes it takes, and llama.cpp's presets as plans.

Under this target a level is a llama.cpp tensor type (`q4_k`, `iq4_nl`, `f16`...), and a unit's weight is quantized
by `quantize.quantize_rows` (llama.cpp's own quantizer where llama-cpp-python is installed, else the numpy port
`blocks.quantize_rows`), which writes the bytes `llama-quantize` writes, with the calibration's importance
matrix (the mean x_j² per input column, what llama.cpp's imatrix holds). What the search evaluates is the float32
weight the `gguf` package decodes from those very bytes (`dequantize_rows`), so the scored model is the shipped one,
bit for bit, on the weights.

The token embedding and the output matrix are units too: in small models with large vocabularies they hold most of
the bytes. The output matrix's importance is its input's (a hook on lm_head); the embedding has none, as llama.cpp
quantizes token_embd without one. Tied embeddings are one tensor in GGUF (`token_embd.weight`, no `output.weight`),
so they form one unit, named as the embedding and quantized with the output's importance (it is the output matmul
that the tied weight takes part in); llama.cpp's presets give it the output tensor's type.

A level must split every row of the unit's tensors into whole blocks: K-types (and IQ4_XS) need rows of a multiple of
256 weights, the others of 32. The search offers each unit only the configured levels its rows take, and a level
that no unit can take, or a plan that gives a unit one its rows cannot, is refused in one line. Sparsity is refused
under this target: GGUF stores zeros densely, so pruning would cost loss and save nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import nn
from tqdm.auto import tqdm

from autocompress.errors import UserError
from autocompress.files import write_atomically, write_text_atomically
from autocompress.methods import LayerStatistics
from autocompress.models import compressible_linears, meta_model, module_name
from autocompress.plan import GGUF_LEVELS
from autocompress.size import SizeReport
from autocompress.targets.base import PresetSeed, Weights
from autocompress.targets.gguf.blocks import BLOCK_TYPES, GgufBlocks, fits, tensor_bytes
from autocompress.targets.gguf.file import FAMILIES
from autocompress.targets.gguf.presets import preset_types
from autocompress.targets.gguf.quantize import quantize_rows

if TYPE_CHECKING:
    from autocompress.plan import CompressionPlan
    from autocompress.targets.gguf.file import GgufLayout

log = logging.getLogger(__name__)

# llama.cpp's k-quant presets, seeded into every gguf study whose units can take their types.
SEED_PRESETS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
PRESET_BASELINE = "llama.cpp {preset}"  # the `baseline` a preset's seed trial is marked with


def check_level(name: str) -> None:
    """ValueError (one line) for a level name the GGUF target cannot store."""
    if name not in GGUF_LEVELS or name not in BLOCK_TYPES:
        raise ValueError(f"the gguf target stores the levels {', '.join(GGUF_LEVELS)}; {name!r} is none of them")


def importance(stats: LayerStatistics) -> torch.Tensor | None:
    """llama.cpp's importance of each input column: the mean x_j² over calibration tokens, divided as
    `llama-quantize` divides its imatrix file's float32 sums by the token count; None without statistics."""
    if stats.input_sq_norms is None or stats.n_tokens <= 0:
        return None
    return (stats.input_sq_norms.double().cpu() / float(np.float32(stats.n_tokens))).float()


def quantize(weight: torch.Tensor, type_name: str, stats: LayerStatistics | None) -> GgufBlocks:
    """A weight [out, in] in `type_name`'s blocks, importance-weighted by the calibration statistics if given."""
    check_level(type_name)
    weights = importance(stats) if stats is not None else None
    return GgufBlocks(type_name, quantize_rows(weight.float(), type_name, weights))


@dataclass(frozen=True)
class UnitTensor:
    """One tensor of the GGUF file that a plan's unit decides the type of."""

    unit: str  # the plan unit it belongs to (a Linear or a block; the embedding or the output)
    module: str  # the PyTorch module holding it (model.layers.0.self_attn.q_proj, model.embed_tokens, lm_head)
    gguf_name: str  # its name in the GGUF file (blk.0.attn_q.weight, token_embd.weight, output.weight)
    shape: tuple[int, int]  # [out, in]: blocks split the `in` rows
    statistics_of: str | None  # the module whose input statistics are its importance; None: it has none


def gguf_tensors(model: nn.Module, granularity: str) -> list[UnitTensor]:
    """The tensors of `model` that a gguf plan sets the types of: every decoder-block Linear (its unit the Linear
    or its block), then the token embedding and, unless tied to it, the output matrix, each a unit of its own.

    The model may live on the meta device: only names and shapes are read, so the space can be checked before
    any weight is loaded."""
    config = model.config
    family = FAMILIES.get(type(model).__name__)
    if family is None:
        known = ", ".join(sorted(FAMILIES))
        raise UserError(f"target gguf: llama.cpp's converter writes {known}, not {type(model).__name__}")
    names = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    found = []
    for linear in compressible_linears(model):
        gguf_name = names.get_name(f"{linear.name}.weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise ValueError(f"GGUF has no name for the Linear {linear.name!r}")
        unit = linear.name if granularity == "linear" else linear.block
        found.append(UnitTensor(unit, linear.name, gguf_name, tuple(linear.module.weight.shape), linear.name))
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    embedding_name, output_name = module_name(model, embedding), module_name(model, output)
    tied = output.weight is embedding.weight
    shape = tuple(embedding.weight.shape)
    found.append(UnitTensor(embedding_name, embedding_name, "token_embd.weight", shape, output_name if tied else None))
    if not tied:
        found.append(UnitTensor(output_name, output_name, "output.weight", tuple(output.weight.shape), output_name))
    return found


def unit_levels(tensors: Iterable[UnitTensor], levels: Sequence[str]) -> dict[str, list[str]]:
    """The levels each unit may take: those of `levels` whose blocks split the rows of every tensor of the unit."""
    allowed: dict[str, list[str]] = {}
    for tensor in tensors:
        fitting = [level for level in levels if fits(level, tensor.shape[1])]
        allowed[tensor.unit] = [level for level in allowed.get(tensor.unit, fitting) if level in fitting]
    return allowed


def check_levels(tensors: Sequence[UnitTensor], levels: Sequence[str]) -> dict[str, list[str]]:
    """`unit_levels`, refusing (ValueError, one line) a level no unit can take and a unit left with none."""
    allowed = unit_levels(tensors, levels)
    for unit, choices in allowed.items():
        if not choices:
            rows = sorted({tensor.shape[1] for tensor in tensors if tensor.unit == unit})
            raise ValueError(f"{unit} (rows of {', '.join(map(str, rows))}) can take none of the levels {list(levels)}")
    for level in levels:
        if not any(level in choices for choices in allowed.values()):
            block = BLOCK_TYPES[level].block_size
            raise ValueError(
                f"no unit of this model can take {level}: its blocks hold {block} weights, and every unit has rows "
                f"that are not a multiple of {block}"
            )
    return allowed


def check_plan_levels(tensors: Iterable[UnitTensor], unit_level: Mapping[str, str]) -> None:
    """ValueError (one line) when a plan gives a tensor a level its rows do not split into."""
    for tensor in tensors:
        level = unit_level.get(tensor.unit)
        if level is None:
            continue
        check_level(level)
        if not fits(level, tensor.shape[1]):
            block = BLOCK_TYPES[level].block_size
            raise ValueError(
                f"{tensor.module} cannot take {level}: its rows of {tensor.shape[1]} weights are not a whole number "
                f"of {block}-weight blocks"
            )


def data_bytes(tensors: Iterable[UnitTensor], unit_level: Mapping[str, str]) -> dict[str, int]:
    """Exact bytes of each tensor's data (by module name) in the type its unit takes, from shapes alone."""
    return {tensor.module: tensor_bytes(unit_level[tensor.unit], *tensor.shape) for tensor in tensors}


def model_preset_types(preset: str, tensors: Sequence[UnitTensor], config) -> dict[str, str]:
    """The type of every tensor (by GGUF name) that `llama-quantize --imatrix` gives it under `preset` in a model of
    `config` (`presets.preset_types`, with llama.cpp's fallbacks)."""
    heads = config.num_attention_heads
    return preset_types(
        preset,
        [(tensor.gguf_name, tensor.shape) for tensor in tensors],
        config.num_hidden_layers,
        n_head=heads,
        n_head_kv=getattr(config, "num_key_value_heads", None) or heads,
        imatrix=True,
    )


def preset_levels(
    preset: str, tensors: Sequence[UnitTensor], config, allowed: Mapping[str, Sequence[str]]
) -> tuple[dict[str, str] | None, str | None]:
    """The level of every unit under llama.cpp's `preset` (`presets.preset_types`: by tensor role and layer,
    with llama.cpp's fallbacks for rows its blocks do not split), or None and the reason the space cannot hold it:
    a unit that holds tensors of different types (block granularity), or a type the unit's levels do not offer."""
    types = model_preset_types(preset, tensors, config)
    levels: dict[str, str] = {}
    for tensor in tensors:
        level = types[tensor.gguf_name]
        if levels.setdefault(tensor.unit, level) != level:
            return None, f"{tensor.unit} holds tensors of {levels[tensor.unit]} and {level} (use granularity: linear)"
        if level not in allowed[tensor.unit]:
            return None, f"it gives {tensor.module} {level}, which is not among its levels {list(allowed[tensor.unit])}"
    return levels, None


def digest_path(path: Path) -> Path:
    """Where the content digest of the block file `path` is kept: beside it (q4_k.npy.blake2b)."""
    return path.with_name(f"{path.name}.blake2b")


def content_digest(data: np.ndarray) -> str:
    """A digest of the blocks' bytes, which a block file must match to be used: its length alone would let
    corruption that keeps the size through."""
    return hashlib.blake2b(np.ascontiguousarray(data).data, digest_size=16).hexdigest()


@dataclass(frozen=True)
class BlocksBuilt:
    blocks: int  # (tensor, level) pairs the build was asked for
    computed: int  # of which this process quantized now
    seconds: float


class GgufWeights(Weights):
    """The GGUF units of a resident model: each tensor quantized once per level into its GGUF blocks (kept on disk
    under `cache`, as the file stores them), and the decoded weights swapped into the model per plan.

    A trial then costs a decode (a few milliseconds per tensor) for each tensor whose level changed. `statistics`
    gives the calibration statistics by module name (the decoder-block Linears and lm_head), asked for only when
    blocks must be computed; it may run the dense model, so it is called before any weight is swapped. `layout` is
    the file `export` writes of the model (`file.gguf_layout`), which sizes a plan exactly.
    """

    def __init__(
        self,
        model: nn.Module,
        granularity: str,
        statistics: Callable[[], Mapping[str, LayerStatistics]],
        cache: Path | None,
        layout: GgufLayout,
    ) -> None:
        self.tensors = gguf_tensors(model, granularity)
        self.units = list(dict.fromkeys(tensor.unit for tensor in self.tensors))
        self.layout = layout
        modules = dict(model.named_modules())
        self.modules = {tensor.module: modules[tensor.module] for tensor in self.tensors}
        self.dense = {name: module.weight.detach().to("cpu", copy=True) for name, module in self.modules.items()}
        self.statistics = statistics
        self.cache = cache
        self.applied: dict[str, str] = {}  # module name -> the level its weight holds now (absent: dense)
        self._memory: dict[tuple[str, str], GgufBlocks] = {}  # without a cache folder

    reuses_block_inputs = False  # a stitch changes the embedding and the output too

    def unit_levels(self, levels: Sequence[int | str]) -> dict[str, list[str]]:
        return check_levels(self.tensors, levels)

    def check_plan(self, plan: CompressionPlan) -> None:
        plan.check_units(self.units)
        self.levels(plan)

    def prepare(self) -> None:
        self.statistics()  # the importance matrix of llama.cpp's quantizers

    def precompute(self, unit_levels: Mapping[str, Sequence[str]] | None, progress: bool) -> str | None:
        if self.cache is None or unit_levels is None:  # without a cache folder, blocks are computed as trials ask
            return None
        built = self.build(unit_levels, progress)
        return (
            f"GGUF blocks {self.cache}: {built.blocks} tensor levels, quantized {built.computed} now in "
            f"{built.seconds:.0f} s"
        )

    def for_export(self, plan: CompressionPlan) -> tuple[dict, dict[str, GgufBlocks]]:
        """The model computing with what the blocks decode to, as in the search, and the blocks themselves."""
        self.stitch(plan)
        return {}, self.blocks_of(plan)

    def levels(self, plan: CompressionPlan) -> dict[str, str]:
        """The level of every unit under `plan` (`f16` where the plan keeps 16 bits), checked against the rows."""
        levels = {}
        for tensor in self.tensors:
            setting = plan.layers.get(tensor.unit, plan.default)
            if setting.sparsity > 0:
                raise ValueError(f"{tensor.unit}: the gguf target stores no sparsity (GGUF stores zeros densely)")
            levels[tensor.unit] = setting.format or ("f16" if setting.bits == 16 else f"int{setting.bits}")
        check_plan_levels(self.tensors, levels)
        return levels

    def stored_tensors(self, plan: CompressionPlan) -> list[tuple[UnitTensor, str]]:
        """Every tensor of the plan's file that a unit sets the type of, with the type it stores."""
        levels = self.levels(plan)
        return [(tensor, levels[tensor.unit]) for tensor in self.tensors]

    def stored_shapes(self, plan: CompressionPlan) -> list[tuple[str, str, tuple[int, int]]]:
        """Every tensor of the plan's file that a unit sets the type of: its GGUF name, the type it stores and its
        [out, in], from shapes alone."""
        return [(tensor.gguf_name, level, tensor.shape) for tensor, level in self.stored_tensors(plan)]

    def _path(self, module: str, level: str) -> Path:
        return self.cache / module / f"{level}.npy"

    def _lock(self, tensor: UnitTensor, level: str, timeout: float = -1) -> FileLock:
        """The lock held while a tensor's blocks in `level` are quantized, shared by every process on the cache
        (Optuna and Ray workers alike), acquired: Timeout after `timeout` seconds (0: at once; -1: never)."""
        path = self._path(tensor.module, level)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path.with_name(f".{level}.lock"), timeout=timeout)
        lock.acquire()
        return lock

    def blocks(self, tensor: UnitTensor, level: str) -> GgufBlocks:
        """The tensor's blocks in `level`: from the cache, else quantized now (and stored), or waited for while
        another process quantizes them."""
        if self.cache is None:
            key = (tensor.module, level)
            if key not in self._memory:
                self._memory[key] = self._quantize(tensor, level)
            return self._memory[key]
        with self._lock(tensor, level):
            stored = self._read(self._path(tensor.module, level), tensor, level)
            return stored if stored is not None else self._store(tensor, level)

    def _store(self, tensor: UnitTensor, level: str) -> GgufBlocks:
        """Quantize and write the tensor's blocks in `level`; the caller holds their lock."""
        path = self._path(tensor.module, level)
        for stale in path.parent.glob(f".{path.name}.*"):  # left by a killed writer; nobody else writes it now
            stale.unlink(missing_ok=True)
        blocks = self._quantize(tensor, level)
        # The digest is written last: blocks without their digest (a kill between the two writes) are not whole.
        write_atomically(path, lambda temporary: np.save(temporary, blocks.data))
        write_text_atomically(digest_path(path), content_digest(blocks.data))
        return blocks

    def _complete(self, tensor: UnitTensor, level: str) -> bool:
        """Whether the tensor's blocks in `level` are stored whole: the shape and the content digest check."""
        return self._read(self._path(tensor.module, level), tensor, level, quiet=True) is not None

    def stored_forms(self, unit_levels: Mapping[str, Sequence[str]]) -> list[tuple[UnitTensor, str]]:
        """Every (tensor, level) a trial may stitch at `unit_levels`."""
        return [(tensor, level) for tensor in self.tensors for level in unit_levels[tensor.unit]]

    def build(self, unit_levels: Mapping[str, Sequence[str]], progress: bool = False) -> BlocksBuilt:
        """Quantize and store every tensor in every level its unit may take (`unit_levels`), before any trial
        needs them. Resumable: blocks stored whole are kept, missing or truncated ones quantized. A tensor another
        process is quantizing is skipped at first and waited for at the end, so workers that start together share
        the work and none quantizes a block twice."""
        if self.cache is None:
            raise ValueError("GGUF blocks are built up front only into a cache folder")
        began = time.perf_counter()
        wanted = self.stored_forms(unit_levels)
        pending = [(tensor, level) for tensor, level in wanted if not self._complete(tensor, level)]
        if any(tensor.statistics_of and BLOCK_TYPES[level].uses_importance for tensor, level in pending):
            self.statistics()  # collecting them may run the dense model: before anything is quantized

        def weights(pairs: list[tuple[UnitTensor, str]]) -> int:
            return sum(tensor.shape[0] * tensor.shape[1] for tensor, _ in pairs)

        total = weights(wanted)
        bar = tqdm(
            total=total,
            initial=total - weights(pending),
            desc="gguf blocks",
            unit="weight",
            unit_scale=True,
            disable=not progress,
        )
        computed = 0
        try:
            for blocking in (False, True):
                deferred = []
                for tensor, level in pending:
                    try:
                        lock = self._lock(tensor, level, timeout=-1 if blocking else 0)
                    except Timeout:
                        deferred.append((tensor, level))
                        continue
                    try:
                        if not self._complete(tensor, level):
                            self._store(tensor, level)
                            computed += 1
                    finally:
                        lock.release()
                    bar.update(weights([(tensor, level)]))
                    bar.set_postfix(computed=computed)
                pending = deferred
        finally:
            bar.close()
        return BlocksBuilt(len(wanted), computed, time.perf_counter() - began)

    @staticmethod
    def _read(path: Path, tensor: UnitTensor, level: str, quiet: bool = False) -> GgufBlocks | None:
        """The stored blocks, or None when missing, unreadable, of another shape or not what their digest says
        (truncated, corrupted in place, or written without it by a killed process): then quantized again."""
        if not path.is_file():
            return None
        warn = (lambda *args: None) if quiet else log.warning
        try:
            data = np.load(path)
            recorded = digest_path(path).read_text(encoding="utf-8").strip()
        except (OSError, ValueError, EOFError, UnicodeDecodeError) as error:
            warn("cache file %s or its digest is unreadable (%s); quantizing it again", path, error)
            return None
        if data.shape != (tensor.shape[0], tensor_bytes(level, *tensor.shape) // tensor.shape[0]):
            warn("cache file %s holds blocks of shape %s, not %s's; quantizing it again", path, data.shape, level)
            return None
        if content_digest(data) != recorded:
            warn("cache file %s does not match its digest; quantizing it again", path)
            return None
        return GgufBlocks(level, data)

    def _stored(self, tensor: UnitTensor, level: str) -> bool:
        if self.cache is None:
            return (tensor.module, level) in self._memory
        path = self._path(tensor.module, level)
        return path.is_file() and digest_path(path).is_file()

    def _quantize(self, tensor: UnitTensor, level: str) -> GgufBlocks:
        stats = None
        if tensor.statistics_of is not None and BLOCK_TYPES[level].uses_importance:
            stats = self.statistics().get(tensor.statistics_of)
            if stats is None or stats.input_sq_norms is None:
                raise ValueError(f"{tensor.module}: no calibration statistics for its importance matrix")
        return quantize(self.dense[tensor.module], level, stats)

    def restore_dense(self) -> None:
        for name in self.applied:
            self.modules[name].weight.data.copy_(self.dense[name])
        self.applied.clear()

    def size(self, plan: CompressionPlan) -> SizeReport:
        """The exact bytes of the GGUF file of `plan` (header, metadata and every tensor, from shapes alone) beside
        the F16 file's (`dense_bytes`), and each tensor's data bytes by module name."""
        levels = self.levels(plan)
        types = {f"{tensor.module}.weight": levels[tensor.unit] for tensor in self.tensors}
        return SizeReport(self.layout.file_bytes(types), self.dense_bytes, data_bytes(self.tensors, levels))

    @property
    def dense_bytes(self) -> int:
        """The F16 GGUF file's bytes, as llama.cpp's converter writes it: what sizes are fractions of."""
        return self.layout.file_bytes()

    def blocks_of(self, plan: CompressionPlan) -> dict[str, GgufBlocks]:
        """The blocks `plan` stores, by state-dict key, for `file.write_gguf_tensors`."""
        levels = self.levels(plan)
        return {f"{tensor.module}.weight": self.blocks(tensor, levels[tensor.unit]) for tensor in self.tensors}

    @torch.no_grad()
    def stitch(self, plan: CompressionPlan) -> SizeReport:
        """Make the model compute with `plan`'s levels, decoding only the tensors whose level changed; returns the
        plan's size (`size`). Each tensor is recorded as it is swapped, so after a failure midway `applied` says
        what every weight holds."""
        levels = self.levels(plan)
        missing = [tensor for tensor in self.tensors if not self._stored(tensor, levels[tensor.unit])]
        if any(tensor.statistics_of and BLOCK_TYPES[levels[tensor.unit]].uses_importance for tensor in missing):
            self.statistics()  # collecting them may run the dense model: before any weight is swapped
        for tensor in self.tensors:
            level = levels[tensor.unit]
            if self.applied.get(tensor.module) == level:
                continue
            weight = self.modules[tensor.module].weight
            weight.data.copy_(self.blocks(tensor, level).decode(weight.dtype).to(weight.device))
            self.applied[tensor.module] = level
        return self.size(plan)


def check_config(config) -> None:
    """The gguf target's refusals of a study config (ValueError, one line), from the config alone.

    GGUF stores zeros densely, so sparsity (and an N:M pattern) is refused; its levels are its own tensor types,
    each quantized by llama.cpp's importance-weighted rounding (`compression.quantization: rtn`; GPTQ onto the
    block grids is not implemented); students and budget searches (which allocate bits, not types) are refused."""
    search, compression = config.search, config.compression
    where = "compression.target gguf"
    if not search.formats:
        raise ValueError(f"{where}: list the GGUF types to search in search.formats, e.g. [q4_k, q6_k, q8_0]")
    for level in search.formats:
        try:
            check_level(level)
        except ValueError as error:
            raise ValueError(f"search.formats: {error}") from error
    if search.sparsity_levels() != [0.0] or compression.pattern != "unstructured":
        raise ValueError(f"{where}: GGUF stores zeros densely, so pruning saves nothing; set search.sparsity: [0.0]")
    if compression.quantization != "rtn":
        raise ValueError(
            f"{where}: its types quantize with llama.cpp's importance-weighted rounding; GPTQ onto GGUF blocks is "
            f"not implemented, so compression.quantization must be rtn, not {compression.quantization!r}"
        )
    if search.student is not None or (search.budget is not None and search.budget.dimension != "size"):
        raise ValueError(
            f"{where}: students and average budgets are not offered (a size budget is); drop search.student or "
            "give search.budget as {size: ...}"
        )
    if search.database == "on":
        raise ValueError(f"{where}: its blocks are cached per tensor already; the layer-variant database is not used")


def space_levels(config) -> dict[str, list[str]]:
    """The levels each unit of the config's model may take, from its config.json or GGUF metadata alone (on the
    meta device, before any weight is loaded); a UserError (one line) for a level no unit can take."""
    tensors = gguf_tensors(meta_model(config.model), config.compression.granularity)
    try:
        return check_levels(tensors, config.search.precision_levels())
    except ValueError as error:
        raise UserError(f"search.formats: {error}") from error


def preset_seeds(tensors: Sequence[UnitTensor], config, allowed: Mapping[str, Sequence[str]]) -> list[PresetSeed]:
    """llama.cpp's k-quant presets (`SEED_PRESETS`) as seed plans of a gguf study: each unit's level as
    `{unit}.format` trial parameters (for the units with a choice), or the reason a preset is left out."""
    seeds = []
    for preset in SEED_PRESETS:
        levels, reason = preset_levels(preset, tensors, config, allowed)
        params = None
        if levels is not None:
            params = {f"{unit}.format": level for unit, level in levels.items() if len(allowed[unit]) > 1}
        seeds.append(PresetSeed(PRESET_BASELINE.format(preset=preset), params, reason))
    return seeds
