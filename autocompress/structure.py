"""Per-block shapes: each decoder block of the teacher with its own FFN width and attention heads, or removed.

A plan's `structure` (`plan.BlockStructure` per block) says what each block keeps. This module resolves it against the
teacher's config (`block_shape`), refuses what llama.cpp's `deci` architecture cannot run (`check_structure`,
`check_levels`), and builds the model: transformers has no DeciLM class, so a structural model is the teacher's own
Llama model with sub-modules swapped, block by block:
- a narrower FFN: the teacher's MLP with the channels of highest activation importance kept (gate/up rows, down
  columns), as Minitron cuts (`distillation.measure_importance`);
- fewer key/value groups: the teacher's attention with the most important groups kept, each with all the teacher's
  query heads per group (`distillation._kept_heads`), so the head grouping, the head size and the rope are the
  teacher's;
- no attention: `NoAttention` (and no input norm), which adds nothing to the residual stream;
- a removed block: no attention and `NoFeedForward` (and no norms), so its input passes on unchanged.
Every decoder block stays a block of the teacher's class at its index, so block names, block discovery and the
per-layer arrays of the GGUF file (`targets.gguf`) keep their indices.

What llama.cpp's `deci` runs (verified on tiny random deci GGUFs in llama-cpp-python 0.3.36, llama.cpp 0c1e570):
per-block FFN widths and query/key-value head counts; `n_head = n_head_kv = 0` (no attention) in any block but the
first, whose head count gives the head size; `n_ff = 0`, which drops the whole block (attention included, so "no FFN"
is "block removed"), in any block but the first and the last (where it aborts).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from autocompress.distillation import Importance, _kept_heads, _rows_of_heads, _slice_linear, _top
from autocompress.models import decoder_blocks, head_dim
from autocompress.plan import BlockStructure, CompressionPlan

# The transformers classes whose blocks llama.cpp's `deci` computes (Llama's blocks: RMSNorm, rope, SwiGLU).
DECI_FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM")


@dataclass(frozen=True)
class BlockShape:
    """A decoder block's dimensions as llama.cpp's per-layer arrays hold them (0 heads: no attention; 0 FFN channels:
    the block removed)."""

    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int

    @property
    def removed(self) -> bool:
        return self.intermediate_size == 0


def teacher_shape(config) -> BlockShape:
    heads = config.num_attention_heads
    return BlockShape(config.intermediate_size, heads, getattr(config, "num_key_value_heads", None) or heads)


def ffn_width(fraction: float, config) -> int:
    """The FFN channels a fraction of the teacher's width keeps; ValueError unless it is a whole number."""
    width = fraction * config.intermediate_size
    if abs(width - round(width)) > 1e-6 or round(width) < 1:
        raise ValueError(
            f"an FFN width of {fraction:g} of the teacher's {config.intermediate_size} channels is {width:g}, "
            "not a whole number of channels"
        )
    return round(width)


def block_shape(structure: BlockStructure, config) -> BlockShape:
    """The dimensions a block's structure gives it in a model of `config`; ValueError (one line) if it cannot."""
    teacher = teacher_shape(config)
    if structure.removed:
        return BlockShape(0, 0, 0)
    groups = teacher.num_key_value_heads if structure.kv_groups is None else structure.kv_groups
    if groups > teacher.num_key_value_heads:
        raise ValueError(
            f"{groups} key/value groups: the teacher has {teacher.num_key_value_heads}, and a group keeps its "
            f"{teacher.num_attention_heads // teacher.num_key_value_heads} query heads"
        )
    per_group = teacher.num_attention_heads // teacher.num_key_value_heads
    return BlockShape(ffn_width(structure.ffn, config), groups * per_group, groups)


def block_index(name: str, blocks_name: str) -> int:
    """The index of the decoder block `name` (`model.layers.3` → 3); ValueError for a name that is no block."""
    prefix = f"{blocks_name}."
    index = name.removeprefix(prefix)
    if not name.startswith(prefix) or not index.isdigit():
        raise ValueError(f"{name!r} is not a decoder block (blocks are named {prefix}<index>)")
    return int(index)


def check_position(index: int, structure: BlockStructure, n_layers: int, name: str) -> None:
    """ValueError (one line) for a shape llama.cpp's `deci` cannot run at block `index` of `n_layers`."""
    if structure.removed and not 0 < index < n_layers - 1:
        raise ValueError(
            f"{name}: llama.cpp removes blocks 1 to {n_layers - 2} only (the first gives the head size, and a "
            "removed last block aborts)"
        )
    if structure.kv_groups == 0 and index == 0:
        raise ValueError(f"{name}: the first block keeps its attention (llama.cpp reads the head size from it)")


def check_shapes(shapes: list[BlockShape]) -> None:
    """ValueError (one line) for per-block dimensions llama.cpp's `deci` cannot run."""
    for index, shape in enumerate(shapes):
        groups = shape.num_key_value_heads
        structure = BlockStructure(removed=True) if shape.removed else BlockStructure(kv_groups=groups)
        check_position(index, structure, len(shapes), f"block {index}")


def check_structure(structure: Mapping[str, BlockStructure], config, blocks_name: str = "model.layers") -> None:
    """ValueError (one line) for a plan's block shapes that `config`'s model cannot take or llama.cpp cannot run."""
    for name, shape in structure.items():
        index = block_index(name, blocks_name)
        if index >= config.num_hidden_layers:
            raise ValueError(f"{name}: the model has {config.num_hidden_layers} blocks")
        check_position(index, shape, config.num_hidden_layers, name)
        try:
            block_shape(shape, config)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from error


def check_levels(config, family: str, ffn: Iterable[float], kv_groups: Iterable[int] | None, drop_blocks: bool) -> None:
    """ValueError (one line) for structural levels a model (its config and transformers class) cannot take, or
    that no block of it may take in llama.cpp's `deci`."""
    if family not in DECI_FAMILIES:
        raise ValueError(
            f"structural levels ship as llama.cpp's deci architecture, which runs {', '.join(DECI_FAMILIES)} "
            f"blocks, not {family}'s"
        )
    for fraction in ffn:
        ffn_width(fraction, config)
    for groups in kv_groups or ():
        block_shape(BlockStructure(kv_groups=groups), config)
    if drop_blocks and config.num_hidden_layers < 3:
        raise ValueError(
            f"drop_blocks: llama.cpp removes neither the first nor the last block, and the model has only "
            f"{config.num_hidden_layers}"
        )
    if 0 in (kv_groups or ()) and config.num_hidden_layers < 2:
        raise ValueError("kv_groups 0: the first block keeps its attention, and the model has only one block")


def structure_choices(
    ffn: Iterable[float],
    kv_groups: Iterable[int] | None,
    drop_blocks: bool,
    n_layers: int,
    blocks_name: str = "model.layers",
) -> dict[str, list]:
    """Each block's structural trial parameters (`{block}.ffn`, `{block}.kv_groups`, `{block}.removed`, as
    `CompressionPlan.from_params` reads them) with the values a search may give them there: no attention nowhere
    but in blocks 1 to L-1, removal only in blocks 1 to L-2 (llama.cpp's deci). A dimension the config leaves at the
    teacher's is not listed."""
    choices: dict[str, list] = {}
    widths = sorted(set(ffn))
    for index in range(n_layers):
        block = f"{blocks_name}.{index}"
        if widths != [1.0]:
            choices[f"{block}.ffn"] = widths
        if kv_groups is not None:
            choices[f"{block}.kv_groups"] = sorted({groups for groups in kv_groups if index > 0 or groups > 0})
        if drop_blocks and 0 < index < n_layers - 1:
            choices[f"{block}.removed"] = [False, True]
    return choices


# ---------------------------------------------------------------- modules


class NoAttention(nn.Module):
    """A block's attention removed: it adds nothing to the residual stream (llama.cpp's `n_head = 0`)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class NoFeedForward(nn.Module):
    """A removed block's FFN: it adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def cut_ffn(mlp: nn.Module, channels: torch.Tensor) -> nn.Module:
    """A copy of a SwiGLU MLP keeping `channels` of its intermediate width."""
    cut = copy.deepcopy(mlp)
    _slice_linear(cut.gate_proj, rows=channels)
    _slice_linear(cut.up_proj, rows=channels)
    _slice_linear(cut.down_proj, columns=channels)
    return cut


def cut_attention(attention: nn.Module, groups: list[int], heads: list[int], size: int) -> nn.Module:
    """A copy of an attention module keeping the key/value `groups` and the query `heads` (head size `size`); its
    query heads per group are the teacher's, so it computes as the teacher's attention does."""
    cut = copy.deepcopy(attention)
    _slice_linear(cut.q_proj, rows=_rows_of_heads(heads, size))
    _slice_linear(cut.k_proj, rows=_rows_of_heads(groups, size))
    _slice_linear(cut.v_proj, rows=_rows_of_heads(groups, size))
    _slice_linear(cut.o_proj, columns=_rows_of_heads(heads, size))
    return cut


@torch.no_grad()
def attention_alternative(
    block: nn.Module, index: int, groups: int, importance: Importance, config
) -> dict[str, nn.Module]:
    """The sub-modules (by attribute of the decoder block) that keep `groups` key/value groups of the teacher's
    `block` (block `index`), the most important ones, each with all its query heads; none: no attention."""
    if groups == 0:
        return {"self_attn": NoAttention(), "input_layernorm": nn.Identity()}
    teacher = teacher_shape(config)
    per_group = teacher.num_attention_heads // teacher.num_key_value_heads
    kept, heads = _kept_heads(importance.heads[index], groups, per_group, per_group)
    return {"self_attn": cut_attention(block.self_attn, kept, heads, head_dim(config))}


@torch.no_grad()
def ffn_alternative(block: nn.Module, index: int, channels: int, importance: Importance) -> dict[str, nn.Module]:
    """The sub-modules that keep `channels` FFN channels of the teacher's `block`, the most important ones; none:
    no FFN (the block removed, with its attention)."""
    if channels == 0:
        return {"mlp": NoFeedForward(), "post_attention_layernorm": nn.Identity()}
    return {"mlp": cut_ffn(block.mlp, _top(importance.mlp_channels[index], channels))}


def sub_block_levels(structure: BlockStructure, config) -> dict[str, int]:
    """The sub-blocks a structure changes, with the level each takes: "attention" its key/value groups (0: none),
    "ffn" its channels (0: the block removed); sub-blocks at the teacher's shape are not listed."""
    shape, teacher = block_shape(structure, config), teacher_shape(config)
    levels = {}
    if shape.num_key_value_heads < teacher.num_key_value_heads:
        levels["attention"] = shape.num_key_value_heads
    if shape.intermediate_size < teacher.intermediate_size:
        levels["ffn"] = shape.intermediate_size
    return levels


def variant_modules(
    block: nn.Module, index: int, structure: BlockStructure, importance: Importance, config
) -> dict[str, nn.Module]:
    """The sub-modules (by attribute of the decoder block) that give the teacher's `block` its `structure`, cut by
    importance; the teacher's block is left untouched. Sub-modules at the teacher's shape are not listed."""
    swaps: dict[str, nn.Module] = {}
    for kind, level in sub_block_levels(structure, config).items():
        if kind == "attention":
            swaps |= attention_alternative(block, index, level, importance, config)
        else:
            swaps |= ffn_alternative(block, index, level, importance)
    return swaps


def swap_modules(block: nn.Module, swaps: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Put `swaps` into `block` (by attribute), on its device and dtype; returns the modules they replaced."""
    parameter = next(block.parameters(), None)
    replaced = {}
    for attribute, module in swaps.items():
        replaced[attribute] = getattr(block, attribute)
        if parameter is not None:
            module = module.to(device=parameter.device, dtype=parameter.dtype)
        setattr(block, attribute, module)
    return replaced


@torch.no_grad()
def build_structured(model: nn.Module, plan: CompressionPlan, importance: Importance) -> nn.Module:
    """A copy of `model` with each block of the plan's `structure` cut to its shape by importance; `model` is left
    untouched. ValueError (one line) for a structure the model cannot take or llama.cpp cannot run."""
    config = model.config
    blocks_name, _ = decoder_blocks(model)
    check_structure(plan.structure, config, blocks_name)
    structured = copy.deepcopy(model)
    _, blocks = decoder_blocks(structured)
    for name, structure in plan.structure.items():
        index = block_index(name, blocks_name)
        swap_modules(blocks[index], variant_modules(blocks[index], index, structure, importance, config))
    return structured.eval()


def block_shapes(model: nn.Module) -> list[BlockShape]:
    """Every decoder block's dimensions, read from its modules."""
    size = head_dim(model.config)
    shapes = []
    for block in decoder_blocks(model)[1]:
        removed = isinstance(block.mlp, NoFeedForward)
        ffn = 0 if removed else block.mlp.up_proj.out_features
        if isinstance(block.self_attn, NoAttention):
            shapes.append(BlockShape(ffn, 0, 0))
            continue
        attention = block.self_attn
        shapes.append(BlockShape(ffn, attention.q_proj.out_features // size, attention.k_proj.out_features // size))
    return shapes


def is_structured(model: nn.Module) -> bool:
    """Whether any block of `model` has other dimensions than its config gives every block."""
    try:
        shapes = block_shapes(model)
    except AttributeError:  # not Llama's block layout (Phi-3's fused projections), which is never cut here
        return False
    return any(shape != teacher_shape(model.config) for shape in shapes)


# ---------------------------------------------------------------- stitching

SubBlockLevel = tuple[int, str, int]  # (block index, "attention" | "ffn", key/value groups or channels kept)
SUB_MODULES = ("self_attn", "input_layernorm", "mlp", "post_attention_layernorm")


class StructureStitcher:
    """Stitches a plan's block shapes into a model in place, sub-module by sub-module, and puts the teacher's back.

    Each alternative (a block's attention at some key/value groups, its FFN at some width) is built once from the
    teacher's own sub-module, cut by importance, and kept: `alternatives` may hold trained ones
    (`block_distillation.distill`), keyed by `SubBlockLevel`. The teacher's sub-modules are held, never changed, so
    `restore` (a rollback) gives the teacher back exactly.
    """

    def __init__(
        self,
        model: nn.Module,
        importance: Importance,
        alternatives: Mapping[SubBlockLevel, Mapping[str, nn.Module]] | None = None,
    ) -> None:
        self.model = model
        self.importance = importance
        self.blocks_name, self.blocks = decoder_blocks(model)
        self.teacher = [{name: getattr(block, name) for name in SUB_MODULES} for block in self.blocks]
        self.alternatives = {key: dict(modules) for key, modules in (alternatives or {}).items()}
        self.applied: dict[str, BlockStructure] = {}

    def alternative(self, index: int, kind: str, level: int) -> dict[str, nn.Module]:
        """The sub-modules of block `index`'s `kind` at `level`, built from the teacher's on first use."""
        key = (index, kind, level)
        if key not in self.alternatives:
            self.restore_block(index)
            block, config = self.blocks[index], self.model.config
            if kind == "attention":
                self.alternatives[key] = attention_alternative(block, index, level, self.importance, config)
            else:
                self.alternatives[key] = ffn_alternative(block, index, level, self.importance)
        return self.alternatives[key]

    def restore_block(self, index: int) -> None:
        for name, module in self.teacher[index].items():
            setattr(self.blocks[index], name, module)

    def restore(self) -> None:
        """The teacher's sub-modules back in every block."""
        for index in range(len(self.blocks)):
            self.restore_block(index)
        self.applied = {}

    @torch.no_grad()
    def stitch(self, plan: CompressionPlan) -> None:
        """Give every block the plan's shape (the teacher's where the plan names none); ValueError (one line) for a
        structure the model cannot take or llama.cpp cannot run, before anything changes."""
        config = self.model.config
        check_structure(plan.structure, config, self.blocks_name)
        wanted = {block_index(name, self.blocks_name): structure for name, structure in plan.structure.items()}
        for index in range(len(self.blocks)):
            levels = sub_block_levels(wanted[index], config) if index in wanted else {}
            swaps = {}
            for kind, level in levels.items():
                swaps |= self.alternative(index, kind, level)
            self.restore_block(index)
            swap_modules(self.blocks[index], swaps)
        self.applied = dict(plan.structure)
