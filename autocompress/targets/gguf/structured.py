"""Structural levels under the gguf target: per-block shapes (`search.structure`) searched with GGUF tensor types.

A trial's plan gives each decoder block a shape (`plan.structure`) and each unit a GGUF type. `StructuredGgufWeights`
makes the resident model compute with both:
- the shapes: each block's attention and FFN alternatives (`structure.StructureStitcher`), cut from the teacher by
  importance and trained by block-local distillation (`block_distillation.distill_alternatives`), once per study,
  before the first trial (`precompute`), kept on disk beside the GGUF blocks (`AlternativeStore`, in a folder keyed by
  the distillation options and the levels) and read back by every later process; workers on one cache train
  different blocks, each under its own lock;
- the types: the Linears of an alternative take their unit's type as the teacher's Linears do, quantized into GGUF
  blocks from the alternative's own trained weights (cached per alternative, under a name holding a digest of its
  weights, so a retrained alternative never reuses stale blocks). Their importance matrix is the teacher Linear's,
  sliced to the input columns the cut kept (`ffn_down`: the kept channels; `attn_output`: the kept heads' columns).

A shape changes a tensor's input width, and GGUF's K-types (and IQ4_XS) need rows of a multiple of 256 weights: in
SmolLM2 (FFN 1536), ½ of the FFN (768) still takes K-types on ffn_down, ¾ (1152) and ¼ (384) do not. A unit's level
is chosen once for all its tensors, whatever shape the trial gives them, so a tensor whose rows the level does not
split stores the level llama.cpp's own `llama-quantize` falls back to (`storable_level`: q4_k → q5_0, q6_k → q8_0...,
as `tensor_type_fallback` does), and that type is what is quantized, scored, counted and written. The choice is
deterministic, so a plan's size and its file agree, and it is the runtime's own rule.

A plan's size is the deci file's (`layout_for`: the file of a weightless copy of the model with the plan's shapes,
every tensor at the type it stores). A plan of the teacher's shapes keeps the base architecture and the base file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from autocompress.block_distillation import (
    Alternative,
    AlternativeStore,
    alternative_levels,
    distill_alternatives,
    options_of,
)
from autocompress.distillation import Importance, _kept_heads, _rows_of_heads, _top, measure_importance
from autocompress.files import write_atomically
from autocompress.methods import LayerStatistics
from autocompress.models import decoder_blocks, head_dim
from autocompress.size import SizeReport
from autocompress.structure import (
    StructureStitcher,
    SubBlockLevel,
    block_index,
    check_structure,
    sub_block_levels,
    swap_modules,
    teacher_shape,
    variant_modules,
)
from autocompress.targets.gguf.blocks import BLOCK_TYPES, GgufBlocks, fits, tensor_bytes
from autocompress.targets.gguf.file import layout_kv_bytes, reshaped_layout
from autocompress.targets.gguf.presets import _FALLBACK
from autocompress.targets.gguf.weights import GgufWeights, UnitTensor, quantize
from autocompress.variants import save_atomically

if TYPE_CHECKING:
    from autocompress.config import StructureConfig
    from autocompress.plan import CompressionPlan
    from autocompress.targets.gguf.file import GgufLayout, TensorSlot

# llama.cpp's tensor_type_fallback, with IQ4_XS going to its 32-block sibling IQ4_NL.
FALLBACK = {**_FALLBACK, "iq4_xs": "iq4_nl"}
SUB_BLOCK_OF = {"self_attn": "attention", "mlp": "ffn"}  # a decoder block's attribute -> its sub-block kind
ATTRIBUTE_OF = {kind: attribute for attribute, kind in SUB_BLOCK_OF.items()}
IMPORTANCE_WINDOWS = 32  # calibration windows the cut's importance is measured on (as students measure it)


def storable_level(level: str, row: int) -> str:
    """The type a tensor with rows of `row` weights stores `level` in: the level itself where its blocks split the
    rows, else llama.cpp's fallback for it where that splits them, else F16."""
    if fits(level, row):
        return level
    fallback = FALLBACK.get(level)
    return fallback if fallback is not None and fits(fallback, row) else "f16"


@dataclass(frozen=True)
class AlternativeTensor(UnitTensor):
    """A Linear of a structural alternative: its `module` is the name it is stored under (the teacher Linear's, the
    alternative and a digest of its weights), `name` the teacher Linear's it takes the place of."""

    name: str = ""
    alternative: SubBlockLevel = (0, "ffn", 0)
    columns: tuple[int, ...] | None = None  # the teacher's input columns it keeps (None: all)


def zero_importance(config) -> Importance:
    """An importance that ranks nothing: for cuts whose shapes alone matter (a weightless copy's)."""
    layers = config.num_hidden_layers
    return Importance(
        blocks=torch.zeros(layers),
        mlp_channels=torch.zeros(layers, config.intermediate_size),
        heads=torch.zeros(layers, config.num_attention_heads),
        hidden=torch.zeros(config.hidden_size),
    )


def store_bytes(folder: Path) -> int:
    """The bytes of the trained alternatives kept in `folder`."""
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def weights_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


class StructuredGgufWeights(GgufWeights):
    """`GgufWeights` whose plans also give each decoder block a shape (see the module's notes)."""

    def __init__(
        self,
        model: nn.Module,
        granularity: str,
        statistics: Callable[[], Mapping[str, LayerStatistics]],
        cache: Path | None,
        layout: GgufLayout,
        structure: StructureConfig,
        calibration: torch.Tensor,
        batch_size: int,
        layout_of: Callable[[nn.Module], GgufLayout],
    ) -> None:
        super().__init__(model, granularity, statistics, cache, layout)
        self.model = model
        self.calibration = calibration
        self.batch_size = batch_size
        self.layout_of = layout_of
        self.options = options_of(structure.distillation)
        self.blocks_name, _ = decoder_blocks(model)
        config = model.config
        self.levels_per_block = alternative_levels(config, structure.ffn, structure.kv_groups, structure.drop_blocks)
        self.by_module = {tensor.module: tensor for tensor in self.tensors}
        self.part_of = {tensor.module: self._part(tensor.module) for tensor in self.tensors}
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config)
        self.stitcher: StructureStitcher | None = None
        self.alternative_tensors: dict[SubBlockLevel, list[AlternativeTensor]] = {}
        self.distilled: dict[SubBlockLevel, Alternative] = {}
        self.built_now: dict[SubBlockLevel, Alternative] = {}  # of `distilled`, those this process trained
        self._layouts: dict[str, GgufLayout] = {}
        self._deci: GgufLayout | None = None
        self._deci_kv_bytes = 0

    def _part(self, module: str) -> tuple[int, str] | None:
        """(block index, sub-block kind) of a teacher Linear; None outside the blocks' attention and FFN."""
        prefix = f"{self.blocks_name}."
        if not module.startswith(prefix):
            return None
        index, attribute, *_ = module.removeprefix(prefix).split(".")
        kind = SUB_BLOCK_OF.get(attribute)
        return None if kind is None else (int(index), kind)

    # ------------------------------------------------------------ alternatives

    @property
    def store_folder(self) -> Path | None:
        """Where the trained alternatives are kept: keyed by the distillation options and the levels (the cache
        folder above is keyed by the model and the token pools)."""
        if self.cache is None:
            return None
        key = json.dumps({"options": asdict(self.options), "levels": self.levels_per_block}, sort_keys=True)
        return self.cache.parent / "structure" / hashlib.sha256(key.encode()).hexdigest()[:12]

    def importance(self) -> Importance:
        """The teacher's importance of blocks, heads and channels on the calibration pool (cached on disk)."""
        path = None if self.store_folder is None else self.store_folder.parent / "importance.safetensors"
        if path is not None and path.is_file():
            return Importance(**load_file(path))
        self.restore_dense()
        measured = measure_importance(self.model, self.calibration[:IMPORTANCE_WINDOWS], self.batch_size)
        if path is not None:
            save_atomically({field: getattr(measured, field) for field in measured.__dataclass_fields__}, path)
        return measured

    def build_alternatives(self, progress: bool = False) -> StructureStitcher:
        """Every structural alternative, trained now or read back from the store, and the stitcher holding them.
        Processes sharing the cache (workers) share the work block by block: each trains the blocks no other holds
        the lock of, then waits for the others' and reads them back."""
        if self.stitcher is not None:
            return self.stitcher
        self.restore_dense()  # cut and captured from the teacher's dense weights
        importance = self.importance()
        folder = self.store_folder
        if folder is None:
            alternatives = self._distill(self.levels_per_block, importance, None, progress)
            self.built_now = dict(alternatives)
        else:
            store = AlternativeStore(folder)
            self.built_now = self._distill_shared(importance, store, progress)
            alternatives = self._distill(self.levels_per_block, importance, store, False)  # every one stored now
            self._write_summary(folder, alternatives)
        self.distilled = alternatives
        modules = {key: alternative.modules for key, alternative in alternatives.items()}
        self.stitcher = StructureStitcher(self.model, importance, modules)
        for key, alternative in alternatives.items():
            self._register(key, alternative.modules, importance)
        return self.stitcher

    def _distill(
        self, levels: Mapping[int, Mapping[str, list[int]]], importance: Importance, store, progress: bool
    ) -> dict[SubBlockLevel, Alternative]:
        model, calibration = self.model, self.calibration
        with torch.enable_grad():  # it trains, also when a stitch (no_grad) asks before `precompute` ran (`apply`)
            return distill_alternatives(model, calibration, importance, dict(levels), self.options, store, progress)

    def _distill_shared(
        self, importance: Importance, store: AlternativeStore, progress: bool
    ) -> dict[SubBlockLevel, Alternative]:
        """Train the blocks whose alternatives the store lacks, each under its own lock: a block another process
        holds is skipped at first and waited for at the end. Returns the alternatives this process trained."""
        store.folder.mkdir(parents=True, exist_ok=True)
        pending = [
            index
            for index, per_kind in self.levels_per_block.items()
            if any(not store.path((index, kind, level)).is_file() for kind in per_kind for level in per_kind[kind])
        ]
        built: dict[SubBlockLevel, Alternative] = {}
        for blocking in (False, True):
            deferred = []
            for index in pending:
                lock = FileLock(store.folder / f".block{index}.lock", timeout=-1 if blocking else 0)
                try:
                    lock.acquire()
                except Timeout:
                    deferred.append(index)
                    continue
                try:
                    trained = self._distill({index: self.levels_per_block[index]}, importance, store, progress)
                finally:
                    lock.release()
                built |= {key: alternative for key, alternative in trained.items() if not alternative.from_store}
            pending = deferred
        return built

    def _write_summary(self, folder: Path, alternatives: Mapping[SubBlockLevel, Alternative]) -> None:
        """alternatives.json: each alternative's training result and the store's bytes, for reports and benchmarks."""
        summary = {
            "alternatives": [
                {"block": index, "kind": kind, "level": level, **asdict(alternative.result)}
                for (index, kind, level), alternative in sorted(alternatives.items())
            ],
            "training_seconds": sum(alternative.result.seconds for alternative in alternatives.values()),
            "store_bytes": store_bytes(folder),
        }
        text = json.dumps(summary, indent=1)
        write_atomically(folder / "alternatives.json", lambda temporary: Path(temporary).write_text(text))

    def _register(self, key: SubBlockLevel, modules: Mapping[str, nn.Module], importance: Importance) -> None:
        """The Linears of an alternative as tensors of the file, each stored under its own name."""
        index, kind, level = key
        attribute = ATTRIBUTE_OF[kind]
        main = modules[attribute]
        digest = weights_digest(main)
        config = self.model.config
        columns = None
        if kind == "ffn" and level:
            columns = tuple(_top(importance.mlp_channels[index], level).tolist())
        elif kind == "attention" and level:
            teacher = teacher_shape(config)
            per_group = teacher.num_attention_heads // teacher.num_key_value_heads
            _, heads = _kept_heads(importance.heads[index], level, per_group, per_group)
            columns = tuple(_rows_of_heads(heads, head_dim(config)).tolist())
        tensors = []
        for sub, linear in main.named_modules():
            if not isinstance(linear, nn.Linear):
                continue
            name = f"{self.blocks_name}.{index}.{attribute}.{sub}"
            teacher = self.by_module[name]
            stored_as = f"{name}~{kind}{level}-{digest}"
            cut_inputs = sub in ("down_proj", "o_proj")
            tensors.append(
                AlternativeTensor(
                    teacher.unit,
                    stored_as,
                    teacher.gguf_name,
                    tuple(linear.weight.shape),
                    teacher.statistics_of,
                    name=name,
                    alternative=key,
                    columns=columns if cut_inputs else None,
                )
            )
            self.modules[stored_as] = linear
            self.dense[stored_as] = linear.weight.detach().to("cpu", copy=True)
        self.alternative_tensors[key] = tensors

    def _quantize(self, tensor: UnitTensor, level: str) -> GgufBlocks:
        columns = getattr(tensor, "columns", None)
        if columns is None:
            return super()._quantize(tensor, level)
        stats = self.statistics().get(tensor.statistics_of)
        if stats is None or stats.input_sq_norms is None:
            raise ValueError(f"{tensor.module}: no calibration statistics for its importance matrix")
        sliced = LayerStatistics(stats.n_tokens, input_sq_norms=stats.input_sq_norms[list(columns)])
        return quantize(self.dense[tensor.module], level, sliced)

    # ------------------------------------------------------------ a plan's tensors

    def changed_sub_blocks(self, plan: CompressionPlan) -> dict[int, dict[str, int]]:
        """Per block index, the sub-blocks the plan's shapes change and the level each takes."""
        config = self.model.config
        changed = {}
        for name, shape in plan.structure.items():
            changed[block_index(name, self.blocks_name)] = sub_block_levels(shape, config)
        return changed

    def active(self, plan: CompressionPlan) -> list[UnitTensor]:
        """The tensors of the file of `plan`: the teacher's where its blocks keep their shape, the alternatives'
        elsewhere (none for no attention or a removed block). The alternatives must be built."""
        changed = self.changed_sub_blocks(plan)
        tensors = []
        for tensor in self.tensors:
            part = self.part_of[tensor.module]
            if part is None or part[1] not in changed.get(part[0], {}):
                tensors.append(tensor)
        for index, levels in changed.items():
            for kind, level in levels.items():
                tensors += self.alternative_tensors[index, kind, level]
        return tensors

    @staticmethod
    def _needs_importance(tensor: UnitTensor, level: str) -> bool:
        return tensor.statistics_of is not None and BLOCK_TYPES[level].uses_importance

    @staticmethod
    def stored_level(tensor: UnitTensor, levels: Mapping[str, str]) -> str:
        return storable_level(levels[tensor.unit], tensor.shape[1])

    def stored_forms(self, unit_levels: Mapping[str, Sequence[str]]) -> list[tuple[UnitTensor, str]]:
        """The teacher's tensors at their units' levels, and every alternative's at the types those levels store
        on its shapes."""
        wanted = super().stored_forms(unit_levels)
        for tensors in self.alternative_tensors.values():
            for tensor in tensors:
                levels = dict.fromkeys(storable_level(level, tensor.shape[1]) for level in unit_levels[tensor.unit])
                wanted += [(tensor, level) for level in levels]
        return wanted

    def stored_tensors(self, plan: CompressionPlan) -> list[tuple[UnitTensor, str]]:
        """The tensors of the plan's shapes (its alternatives', built if need be), each with the type it stores."""
        levels = self.levels(plan)
        if plan.structure:
            self.build_alternatives()
        return [(tensor, self.stored_level(tensor, levels)) for tensor in self.active(plan)]

    def precompute(self, unit_levels: Mapping[str, Sequence[str]] | None, progress: bool) -> str | None:
        began = time.perf_counter()
        self.build_alternatives(progress)
        trained = [alternative.result for alternative in self.built_now.values()]
        seconds = sum(result.seconds for result in trained)
        steps = sum(result.steps > 0 for result in trained)
        folder = self.store_folder
        stored = "" if folder is None else f" {folder}: {store_bytes(folder) / 1e6:,.1f} MB,"
        line = (
            f"structural alternatives{stored} {len(self.distilled)} ({len(trained)} built now, {steps} trained in "
            f"{seconds:.0f} s, {seconds / max(1, steps):.1f} s each; {time.perf_counter() - began:.0f} s in all)"
        )
        blocks = super().precompute(unit_levels, progress)
        return line if blocks is None else f"{line}\nautocompress: {blocks}"

    # ------------------------------------------------------------ stitching, size, export

    def restore_dense(self) -> None:
        super().restore_dense()
        if self.stitcher is not None:
            self.stitcher.restore()

    def check_plan(self, plan: CompressionPlan) -> None:
        """Besides the types: shapes the model can take and llama.cpp run, each one whose alternative the study's
        `search.structure` trains (a plan given as JSON may name others)."""
        super().check_plan(plan)
        check_structure(plan.structure, self.model.config, self.blocks_name)
        for index, levels in self.changed_sub_blocks(plan).items():
            for kind, level in levels.items():
                if level not in self.levels_per_block[index][kind]:
                    what = f"{level} key/value groups" if kind == "attention" else f"{level} FFN channels"
                    raise ValueError(
                        f"{self.blocks_name}.{index}: search.structure offers no alternative with {what} there; "
                        "offer the plan's shapes in search.structure"
                    )

    @torch.no_grad()
    def stitch(self, plan: CompressionPlan) -> SizeReport:
        """The plan's shapes swapped in, then its types decoded into the tensors whose type changed. Statistics a
        missing block needs are collected first (that runs the dense teacher), before anything is swapped."""
        levels = self.levels(plan)
        if plan.structure:
            self.build_alternatives()
        active = self.active(plan)
        missing = [tensor for tensor in active if not self._stored(tensor, self.stored_level(tensor, levels))]
        if any(self._needs_importance(tensor, self.stored_level(tensor, levels)) for tensor in missing):
            self.statistics()
        if self.stitcher is not None:
            self.stitcher.stitch(plan)
        for tensor in active:
            level = self.stored_level(tensor, levels)
            if self.applied.get(tensor.module) == level:
                continue
            weight = self.modules[tensor.module].weight
            weight.data.copy_(self.blocks(tensor, level).decode(weight.dtype).to(weight.device))
            self.applied[tensor.module] = level
        return self.size(plan)

    def layout_for(self, plan: CompressionPlan) -> GgufLayout:
        """The file of the plan's shapes without tensor data: a weightless copy of the model with them (the first deci
        file's metadata, `file.reshaped_layout`)."""
        key = json.dumps({name: shape.model_dump() for name, shape in plan.structure.items()}, sort_keys=True)
        if key not in self._layouts:
            skeleton = copy.deepcopy(self.skeleton)
            blocks = decoder_blocks(skeleton)[1]
            config = skeleton.config
            importance = zero_importance(config)
            for name, shape in plan.structure.items():
                index = block_index(name, self.blocks_name)
                swap_modules(blocks[index], variant_modules(blocks[index], index, shape, importance, config))
            if self._deci is None:  # the first deci file: its metadata, copied tokenizer included (seconds)
                self._deci = self.layout_of(skeleton)
                self._deci_kv_bytes = layout_kv_bytes(self._deci)
            if len(self._layouts) >= 1024:
                self._layouts.clear()
            self._layouts[key] = reshaped_layout(self._deci, skeleton, self._deci_kv_bytes)
        return self._layouts[key]

    def _slot_levels(self, plan: CompressionPlan) -> list[tuple[TensorSlot, UnitTensor, str]]:
        """The tensors of the deci file of the plan's shapes that a unit sets the type of: each one's slot, the
        teacher's tensor it takes the place of, and the type it stores (shapes alone: nothing is built)."""
        levels = self.levels(plan)
        found = []
        for key, slot in self.layout_for(plan).slots.items():
            teacher = self.by_module.get(key.removesuffix(".weight"))
            if teacher is not None and key.endswith(".weight"):
                found.append((slot, teacher, storable_level(levels[teacher.unit], slot.shape[1])))
        return found

    def stored_shapes(self, plan: CompressionPlan) -> list[tuple[str, str, tuple[int, int]]]:
        if not plan.structure:
            return super().stored_shapes(plan)
        return [(slot.name, level, slot.shape) for slot, _, level in self._slot_levels(plan)]

    def size(self, plan: CompressionPlan) -> SizeReport:
        """The exact bytes of the plan's file: the deci file of its shapes, each tensor in the type it stores."""
        if not plan.structure:
            return super().size(plan)
        types, per_layer = {}, {}
        for slot, teacher, level in self._slot_levels(plan):
            types[slot.key] = level
            per_layer[teacher.module] = tensor_bytes(level, *slot.shape)
        return SizeReport(self.layout_for(plan).file_bytes(types), self.dense_bytes, per_layer)

    def blocks_of(self, plan: CompressionPlan) -> dict[str, GgufBlocks]:
        blocks = {}
        for tensor, level in self.stored_tensors(plan):
            name = tensor.name if isinstance(tensor, AlternativeTensor) else tensor.module
            blocks[f"{name}.weight"] = self.blocks(tensor, level)
        return blocks
