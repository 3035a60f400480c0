"""GGUF for llama.cpp: a model written in the tensor types llama.cpp runs, tensor by tensor, for each family it runs.

Two ways in, one writer:
- `write_gguf_tensors(model, tokenizer, tensors, path, ...)` takes, per state-dict tensor, its GGUF block bytes and
  type (what `autocompress.targets.gguf.blocks.quantize_rows` wrote, so the file holds exactly what the search
  evaluated); every other tensor is stored as llama.cpp's converter stores it: 1-D tensors in F32, the rest in F16.
  `gguf_layout(...)` describes the same file without any tensor data: `GgufLayout.file_bytes(types)` is its exact
  size (header, metadata, tensor infos, alignment padding, tensor bytes), so accounted bytes equal written bytes
  by construction;
- `write_gguf(model, tokenizer, plan, compressed, path, ...)` maps the integer grids of our own artifact's levels
  onto Q4_0/Q4_1/Q5_x/Q8_0 blocks (table below) and stores what has no block type densely, then writes the same way.

Families (`FAMILIES`) follow llama.cpp's `convert_hf_to_gguf.py` (the copy llama-cpp-python 0.3.36 vendors): its
metadata keys per architecture, `gguf.get_tensor_name_map` for the names, and its transforms:
- Llama/Mistral: query and key rows permuted for llama.cpp's rotary layout (block bytes are whole rows, so
  quantized rows permute as they are); Llama 3's rope scaling becomes the `rope_freqs` tensor;
- Qwen2: its q/k/v biases; Qwen3: q_norm/k_norm and an explicit head size;
- Gemma 2/3: RMSNorm weights + 1 (transformers computes x·(1 + w), llama.cpp x·w); llama.cpp scales the
  embedding by √hidden itself; softcapping, the sliding window and which layers slide (written per layer);
- Phi-3: the fused `qkv_proj` and `gate_up_proj` are stored fused, as llama.cpp reads them.
Tied embeddings are one tensor (token_embd) and no output tensor. What llama.cpp would compute differently is
refused in one line (UserError): another architecture, a tensor without a GGUF name, a rope scaling or attention
scale llama.cpp does not read, a type whose blocks do not divide a tensor's rows. What it computes differently
only past a window the file cannot express (Mistral's and Phi-3's sliding windows, which these llama.cpp
architectures do not apply) is said in `GgufReport.notes`.

Our artifact's integer grids map onto GGUF's 32-weight blocks exactly when a group is a whole number of blocks
(group size a multiple of 32, or one group per row of a multiple of 32 inputs), since a group's scale and
zero-point then repeat in each of its blocks:

| plan's grid (our codes c, zero-point z, scale s: w = s·(c − z)) | GGUF type | stored as |
|---|---|---|
| symmetric 2–4 bits | Q4_0 (`d·(q − 8)`) | d = s, q = c − z + 8 (exact) |
| asymmetric 2–4 bits | Q4_1 (`d·q + m`) | d = s, q = c, m = −s·z rounded to float16 |
| symmetric 5 bits | Q5_0 (`d·(q − 16)`) | d = s, q = c − z + 16 (exact) |
| asymmetric 5 bits | Q5_1 (`d·q + m`) | d = s, q = c, m = −s·z rounded to float16 |
| 6 bits, symmetric 8 bits | Q8_0 (`d·q`) | d = s, q = c − z (exact) |
| asymmetric 8 bits | Q8_0 when every c − z fits a signed byte, else F16 | |

What that path cannot express is written densely instead, and `GgufReport.notes` says so: sparsity (GGUF has
no sparse tensors; pruned weights are zeros), groups that are not a whole number of 32-blocks, non-uniform grids
and number formats (F16 of the weight the compressed model computes with), and 2/3/6-bit codes, which go to
Q4_x or Q8_0 (GGUF's own k-quants use 256-weight super-blocks with quantized scales, which our per-group float16
scales do not map onto; the `target: gguf` levels quantize into those blocks directly).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from transformers import PreTrainedModel

from autocompress.compress import CompressedLinear
from autocompress.errors import UserError
from autocompress.files import write_atomically
from autocompress.methods import QuantizedWeight
from autocompress.models import EMBEDDED_MODEL, cache_dir, embedded_gguf, file_digest
from autocompress.plan import CompressionPlan
from autocompress.structure import DECI_FAMILIES, BlockShape, block_shapes, check_shapes, is_structured
from autocompress.targets.gguf.blocks import BLOCK_TYPES, GgufBlocks, fifth_bits, fits, pack_nibbles, tensor_bytes

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from autocompress.config import ModelConfig

BLOCK = 32
GGUF_FILE = "model.gguf"
PLAN_KEY = "autocompress.plan"
PROVENANCE_KEY = "autocompress.provenance"
_HEADER_BYTES = 4 + 4 + 8 + 8  # magic, version, tensor count, key-value count
_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, dimension count, type, offset (plus the name and 8 per dimension)


@dataclass
class GgufReport:
    path: Path
    types: dict[str, str]  # GGUF tensor name -> its type
    accounted_bytes: int  # the layout's size of the file, from shapes and metadata
    notes: list[str] = field(default_factory=list)  # what the file could not express as the model has it

    def summary(self) -> str:
        counts = Counter(self.types.values())
        return ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))


# ---------------------------------------------------------------- families


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_parameters(config) -> tuple[dict, dict | None]:
    """(full-attention rope parameters, sliding-attention ones or None): transformers nests them per layer type
    for models with two kinds of layers (Gemma 3)."""
    parameters = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "full_attention" in parameters:
        return dict(parameters["full_attention"]), dict(parameters.get("sliding_attention") or {})
    if "rope_theta" not in parameters and getattr(config, "rope_theta", None) is not None:
        parameters["rope_theta"] = config.rope_theta
    return parameters, None


def _rope_type(parameters: Mapping[str, Any]) -> str:
    return str(parameters.get("rope_type", parameters.get("type")) or "default").lower()


def _add_rope(writer: gguf.GGUFWriter, config, allowed: tuple[str, ...]) -> None:
    """Rope base and scaling as the converter writes them; a scaling llama.cpp would not apply is refused."""
    full, sliding = _rope_parameters(config)
    kind = _rope_type(full)
    if kind not in ("default", *allowed):
        raise UserError(f"export: GGUF does not carry {type(config).__name__}'s rope scaling {kind!r} here")
    writer.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    if sliding:
        if _rope_type(sliding) != "default":
            raise UserError(f"export: GGUF does not carry a rope scaling {_rope_type(sliding)!r} on sliding layers")
        writer.add_rope_freq_base_swa(float(sliding.get("rope_theta", 10000.0)))


def _add_common(writer: gguf.GGUFWriter, config, shapes: Sequence[BlockShape] | None = None) -> None:
    """The keys `TextModel.set_gguf_parameters` writes for every family; with per-block `shapes`, the FFN width and
    head counts per layer, as the deci converter writes them (the head size is written either way)."""
    heads = config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    if shapes is None:
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    else:
        writer.add_feed_forward_length([shape.intermediate_size for shape in shapes])
        writer.add_head_count([shape.num_attention_heads for shape in shapes])
        writer.add_head_count_kv([shape.num_key_value_heads for shape in shapes])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))


def _refuse_sliding_layers(config) -> None:
    """An architecture whose llama.cpp graph has no sliding-window layers cannot take a model that has some."""
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        raise UserError(f"export: llama.cpp runs {type(config).__name__} without sliding-window layers; this has some")


def _note_sliding_window(config, notes: list[str]) -> None:
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings:
        notes.append(
            f"llama.cpp applies no sliding window to this architecture: windows longer than {window} tokens "
            "attend further back than in transformers"
        )


def _llama_metadata(
    writer: gguf.GGUFWriter, config, notes: list[str], shapes: Sequence[BlockShape] | None = None
) -> None:
    _add_common(writer, config, shapes)
    _add_rope(writer, config, ("linear", "llama3"))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(_head_dim(config))
    _refuse_sliding_layers(config)
    _note_sliding_window(config, notes)


def _qwen_metadata(writer: gguf.GGUFWriter, config, notes: list[str]) -> None:
    _add_common(writer, config)
    _add_rope(writer, config, ("linear",))
    _refuse_sliding_layers(config)


def _gemma_attention_scale(config) -> None:
    """llama.cpp scales queries by 1/√head_dim (for any size but 27B, whose layer count it recognizes), not by
    the config's query_pre_attn_scalar."""
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and scalar != _head_dim(config):
        raise UserError(
            f"export: llama.cpp scales Gemma's queries by 1/sqrt(head_dim={_head_dim(config)}), "
            f"this model by 1/sqrt(query_pre_attn_scalar={scalar})"
        )


def _add_sliding_layers(writer: gguf.GGUFWriter, config) -> None:
    """Which layers slide, per layer, from transformers' layer_types (llama.cpp reads the array before its own
    default pattern)."""
    layer_types = getattr(config, "layer_types", None) or []
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])


def _gemma2_metadata(writer: gguf.GGUFWriter, config, notes: list[str]) -> None:
    _add_common(writer, config)
    _add_rope(writer, config, ())
    _gemma_attention_scale(config)
    writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
    writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
    _add_sliding_layers(writer, config)


def _gemma3_metadata(writer: gguf.GGUFWriter, config, notes: list[str]) -> None:
    _add_common(writer, config)
    _add_rope(writer, config, ("linear",))
    _gemma_attention_scale(config)
    if getattr(config, "attn_logit_softcapping", None):
        raise UserError("export: llama.cpp's Gemma 3 has no attention-logit softcapping; this model has one")
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if config.sliding_window:
        _add_sliding_layers(writer, config)
    elif "sliding_attention" in (getattr(config, "layer_types", None) or []):
        raise UserError("export: Gemma 3 layers marked sliding need a sliding_window")


def _phi3_metadata(writer: gguf.GGUFWriter, config, notes: list[str]) -> None:
    full, _ = _rope_parameters(config)
    if _rope_type(full) != "default":
        raise UserError(f"export: GGUF does not carry Phi-3's rope scaling {_rope_type(full)!r} here")
    rotary = float(full.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(int(rotary * config.hidden_size) // config.num_attention_heads)
    writer.add_rope_freq_base(float(full.get("rope_theta", 10000.0)))
    writer.add_sliding_window(config.sliding_window or 0)
    _note_sliding_window(config, notes)


@dataclass(frozen=True)
class Family:
    """How llama.cpp's converter writes one transformers architecture."""

    arch: gguf.MODEL_ARCH
    metadata: Callable[[gguf.GGUFWriter, Any, list[str]], None]
    permute_rope: bool = False  # Llama's q/k rows reordered for llama.cpp's rotary layout
    norm_shift: float = 0.0  # added to every `*norm.weight`: Gemma's RMSNorm computes x·(1 + w)


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(gguf.MODEL_ARCH.LLAMA, _llama_metadata, permute_rope=True),
    "MistralForCausalLM": Family(gguf.MODEL_ARCH.LLAMA, _llama_metadata, permute_rope=True),
    "Qwen2ForCausalLM": Family(gguf.MODEL_ARCH.QWEN2, _qwen_metadata),
    "Qwen3ForCausalLM": Family(gguf.MODEL_ARCH.QWEN3, _qwen_metadata),
    "Gemma2ForCausalLM": Family(gguf.MODEL_ARCH.GEMMA2, _gemma2_metadata, norm_shift=1.0),
    "Gemma3ForCausalLM": Family(gguf.MODEL_ARCH.GEMMA3, _gemma3_metadata, norm_shift=1.0),
    "Phi3ForCausalLM": Family(gguf.MODEL_ARCH.PHI3, _phi3_metadata),
}


def family_of(model: PreTrainedModel) -> Family:
    """The family a model is written as: its class's, or llama.cpp's `deci` for a Llama whose blocks have shapes of
    their own (`autocompress.structure`), with the FFN width and head counts per layer."""
    name = type(model).__name__
    if name not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        raise UserError(f"export: GGUF is written for {known}, not {name}; use --format compressed or hf")
    if not is_structured(model):
        return FAMILIES[name]
    if name not in DECI_FAMILIES:
        raise UserError(
            f"export: blocks of their own shapes are written as llama.cpp's deci architecture, which runs "
            f"{', '.join(DECI_FAMILIES)} blocks, not {name}'s"
        )
    shapes = block_shapes(model)
    try:
        check_shapes(shapes)
    except ValueError as error:
        raise UserError(f"export: {error}") from error
    return Family(gguf.MODEL_ARCH.DECI, partial(_llama_metadata, shapes=shapes), permute_rope=True)


# ---------------------------------------------------------------- tokenizer


def tokenizer_fields(source: Path) -> list[dict[str, Any]]:
    """The tokenizer.* keys of a GGUF file: key, value type, item type of an array, contents. `gguf.GGUFReader`
    takes minutes over a vocabulary of 262k tokens (a memory-mapped view per string), so they are read once per
    file content and kept as JSON in the model cache."""
    path = cache_dir() / "models" / "gguf-tokenizers" / f"{file_digest(source)[:32]}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as error:
            log.warning("%s is unreadable (%s); reading the tokenizer again", path, error)
    fields = []
    for key, reader_field in gguf.GGUFReader(source).fields.items():
        if key.startswith("tokenizer."):
            types = [int(value_type) for value_type in reader_field.types]
            fields.append({"key": key, "type": types[0], "item_type": types[-1], "contents": reader_field.contents()})
    write_atomically(path, lambda temporary: Path(temporary).write_text(json.dumps(fields)))
    return fields


def _copy_tokenizer_fields(writer: gguf.GGUFWriter, source: Path) -> int:
    """The tokenizer.* keys of the GGUF file the base model came from, as they are; returns the token count."""
    tokens = 0
    for entry in tokenizer_fields(source):
        value_type = gguf.GGUFValueType(entry["type"])
        if value_type == gguf.GGUFValueType.ARRAY:
            contents = entry["contents"]
            item_type = gguf.GGUFValueType(entry["item_type"])
            writer.add_key_value(entry["key"], contents, value_type, sub_type=item_type)
            tokens = len(contents) if entry["key"] == gguf.Keys.Tokenizer.LIST else tokens
        else:
            writer.add_key_value(entry["key"], entry["contents"], value_type)
    return tokens


def _add_bpe_tokenizer(writer: gguf.GGUFWriter, tokenizer, n_vocab: int, notes: list[str]) -> int:
    """A byte-level BPE tokenizer as the converter's `_set_vocab_gpt2` writes it: ids the tokenizer lacks up to
    the embedding's rows become unused `[PAD<id>]` tokens. Returns the token count (0 for another kind, which is
    not written: llama.cpp then has no tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or json.loads(backend.to_str())["model"]["type"] != "BPE":
        notes.append("the tokenizer is not a byte-level BPE one, so it is not written (llama.cpp needs one)")
        return 0
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    if max(by_id) >= n_vocab:
        raise UserError(f"export: the tokenizer has ids up to {max(by_id)}, the embedding only {n_vocab} rows")
    tokens, types = [], []
    for index in range(n_vocab):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        if index in added:
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        gguf.vocab.SpecialVocab(Path(folder), load_merges=True, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
    notes.append("the tokenizer's pre-tokenizer is written as llama.cpp's 'default' (ids are scored as they are)")
    return len(tokens)


# ---------------------------------------------------------------- layout


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of the file: where it comes from, its GGUF name and shape, and what the converter does to it."""

    key: str  # the state-dict key, or the GGUF name for a tensor the converter generates (rope_freqs)
    name: str
    shape: tuple[int, ...]  # in torch's order: [out_features, in_features] for a weight
    rows: tuple[int, ...] | None = None  # row order llama.cpp expects (q/k rows for rope), None: as they are
    shift: float = 0.0  # added to the values (Gemma's norms)

    @property
    def default_type(self) -> str:
        return "f32" if len(self.shape) == 1 else "f16"

    def nbytes(self, kind: str) -> int:
        if kind == "f32":
            return 4 * int(np.prod(self.shape))
        if len(self.shape) != 2:
            raise UserError(f"export: {self.key} is {len(self.shape)}-D; only 2-D weights take GGUF block types")
        if kind not in BLOCK_TYPES:
            raise UserError(f"export: unknown GGUF type {kind!r} for {self.key}; known: {', '.join(BLOCK_TYPES)}")
        rows, columns = self.shape
        if not fits(kind, columns):
            size = BLOCK_TYPES[kind].block_size
            raise UserError(
                f"export: {self.key} has rows of {columns} weights, which {kind}'s {size}-blocks do not divide"
            )
        return tensor_bytes(kind, rows, columns)


@dataclass
class GgufLayout:
    """The file `write_gguf_tensors` writes, without tensor data: its metadata and every tensor's name and shape.

    Its size depends on the types only through the tensor bytes (a tensor info takes as many bytes whatever the
    type), so `overhead_bytes` is computed once and `file_bytes` is exact for any choice of types."""

    family: Family
    metadata: gguf.GGUFWriter  # every key-value the file holds, not yet written
    slots: dict[str, TensorSlot]  # by key
    overhead_bytes: int  # header, key-values and tensor infos, padded to the alignment where tensor data starts
    alignment: int
    notes: list[str]

    def padded(self, nbytes: int) -> int:
        return -(-nbytes // self.alignment) * self.alignment

    def canonical(self, by_key: Mapping[str, Any]) -> dict[str, Any]:
        """`by_key` keyed by the file's tensors: on a tied model `lm_head.weight` names the embedding it shares."""
        by_key = dict(by_key)
        if "lm_head.weight" in by_key and "lm_head.weight" not in self.slots:
            embedding = next(key for key, slot in self.slots.items() if slot.name == "token_embd.weight")
            if embedding in by_key:
                raise UserError(
                    "export: a tied model stores one embedding matrix; give lm_head or embed_tokens, not both"
                )
            by_key[embedding] = by_key.pop("lm_head.weight")
        return by_key

    def file_bytes(self, types: Mapping[str, str] | None = None) -> int:
        """Exact bytes of the file with `types` (state-dict key -> GGUF type) and the converter's F16/F32 for the
        rest: the search counts bytes with it."""
        types = self.canonical(types or {})
        unknown = set(types) - set(self.slots)
        if unknown:
            raise UserError(f"export: the model has no tensor {sorted(unknown)[0]!r} to store in GGUF")
        return self.overhead_bytes + sum(
            self.padded(slot.nbytes(types.get(key, slot.default_type))) for key, slot in self.slots.items()
        )


def _rope_rows(rows: int, heads: int) -> tuple[int, ...]:
    """llama.cpp's permutation of query/key rows (its converter's `permute`), as row indices."""
    order = np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)
    return tuple(int(row) for row in order)


def _llama3_rope_factors(config) -> np.ndarray | None:
    """Llama 3's rope scaling as llama.cpp reads it: per frequency, the factor its base frequency is divided by
    (transformers' own llama3 frequencies against the unscaled ones)."""
    full, _ = _rope_parameters(config)
    if _rope_type(full) != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    dim = _head_dim(config)
    base = float(full.get("rope_theta", 10000.0))
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (plain / scaled.float()).numpy().astype(np.float32)


def _slots(model: PreTrainedModel, family: Family) -> dict[str, TensorSlot]:
    config = model.config
    names = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    slots = {}
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reads the output matrix from token_embd
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"export: GGUF ({family.arch.name.lower()}) has no name for the tensor {key!r}")
        rows = None
        if family.permute_rope and name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            rows = _rope_rows(tensor.shape[0], tensor.shape[0] // _head_dim(config))  # this layer's own heads
        shift = family.norm_shift if key.endswith("norm.weight") else 0.0
        slots[key] = TensorSlot(key, name, tuple(tensor.shape), rows, shift)
    factors = _llama3_rope_factors(config)
    if factors is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        slots[name] = TensorSlot(name, name, tuple(factors.shape))
    return slots


def _kv_bytes(writer: gguf.GGUFWriter) -> int:
    """Bytes of the key-value section, serialized by the writer's own packer (what write_kv_data_to_file writes)."""
    total = 0
    for key, value in writer.kv_data[0].items():
        total += len(writer._pack_val(key, gguf.GGUFValueType.STRING, add_vtype=False))
        total += len(writer._pack_val(value.value, value.type, add_vtype=True, sub_type=value.sub_type))
    return total


def gguf_layout(
    model: PreTrainedModel,
    tokenizer=None,
    tokenizer_source: Path | str | None = None,
    metadata: Mapping[str, Any] | None = None,
    plan: CompressionPlan | None = None,
) -> GgufLayout:
    """The GGUF file of `model` without its tensor data. Only shapes and the config are read, so `model` may live
    on the meta device (`with torch.device("meta"): AutoModelForCausalLM.from_config(config)`).

    `tokenizer_source` is a GGUF file whose tokenizer keys are copied as they are (the base model's own, when it
    came from GGUF); else `tokenizer`, a byte-level BPE one, is converted. `metadata` (the provenance) and `plan`
    are stored as JSON under `autocompress.provenance` and `autocompress.plan`; they count in the size."""
    family = family_of(model)
    slots = _slots(model, family)
    notes: list[str] = []
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[family.arch])
    config = model.config
    writer.add_name(str(getattr(config, "_name_or_path", "") or "autocompress model"))
    family.metadata(writer, config, notes)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    n_vocab = next(slot.shape[0] for slot in slots.values() if slot.name == "token_embd.weight")
    if tokenizer_source is not None:
        n_tokens = _copy_tokenizer_fields(writer, Path(tokenizer_source))
    elif tokenizer is not None:
        n_tokens = _add_bpe_tokenizer(writer, tokenizer, n_vocab, notes)
    else:
        n_tokens = 0
    if n_tokens and n_tokens != n_vocab:
        raise UserError(
            f"export: the tokenizer has {n_tokens} tokens, the embedding {n_vocab} rows (llama.cpp needs both equal)"
        )
    if plan is not None:
        writer.add_string(PLAN_KEY, plan.model_dump_json())
    writer.add_string(PROVENANCE_KEY, json.dumps(dict(metadata or {}), default=str))
    infos = sum(_TENSOR_INFO_BYTES + len(slot.name.encode()) + 8 * len(slot.shape) for slot in slots.values())
    alignment = writer.data_alignment or gguf.GGUF_DEFAULT_ALIGNMENT
    overhead = -(-(_HEADER_BYTES + _kv_bytes(writer) + infos) // alignment) * alignment
    return GgufLayout(family, writer, slots, overhead, alignment, notes)


def reshaped_layout(layout: GgufLayout, model: PreTrainedModel, kv_bytes: int | None = None) -> GgufLayout:
    """The layout of `model`, which has `layout`'s config, architecture and metadata keys but other block shapes
    (`autocompress.structure`): the deci architecture's per-layer arrays hold one number per block whatever it is,
    so the key-value section keeps its size (`kv_bytes`, `_kv_bytes(layout.metadata)` if not given) and only the
    tensor infos and data change. `gguf_layout` copies the tokenizer anew, which takes seconds for a large
    vocabulary; this takes milliseconds."""
    family = family_of(model)
    if family.arch != layout.family.arch:
        raise ValueError(f"a {family.arch.name} model does not reshape a {layout.family.arch.name} file's layout")
    slots = _slots(model, family)
    kv_bytes = _kv_bytes(layout.metadata) if kv_bytes is None else kv_bytes
    infos = sum(_TENSOR_INFO_BYTES + len(slot.name.encode()) + 8 * len(slot.shape) for slot in slots.values())
    overhead = -(-(_HEADER_BYTES + kv_bytes + infos) // layout.alignment) * layout.alignment
    return GgufLayout(family, layout.metadata, slots, overhead, layout.alignment, layout.notes)


def layout_kv_bytes(layout: GgufLayout) -> int:
    """The bytes of a layout's key-value section."""
    return _kv_bytes(layout.metadata)


# ---------------------------------------------------------------- writing


def _qtype(kind: str) -> QType:
    return QType.F32 if kind == "f32" else BLOCK_TYPES[kind].qtype


@torch.no_grad()
def _file_tensor(
    slot: TensorSlot, source: torch.Tensor | np.ndarray, given: GgufBlocks | None
) -> tuple[np.ndarray, str]:
    """The data llama.cpp reads for one slot, and its type: the given block bytes, or the converter's float."""
    if given is not None:
        expected = (slot.shape[0], slot.nbytes(given.type) // slot.shape[0])
        data = np.ascontiguousarray(given.data)
        if data.dtype != np.uint8 or data.shape != expected:
            raise ValueError(f"{slot.key}: {given.type} bytes must be uint8 {expected}, got {data.dtype} {data.shape}")
        kind = given.type
    else:
        values = source.detach().cpu().float().numpy() if isinstance(source, torch.Tensor) else source
        values = values.astype(np.float32) + np.float32(slot.shift)
        kind = slot.default_type
        data = values if kind == "f32" else values.astype(np.float16)
        if not np.isfinite(data).all():
            raise UserError(f"export: {slot.key} overflows float16 (|w| up to {np.abs(values).max():g})")
    if slot.rows is not None:
        data = data[list(slot.rows)]
    return np.ascontiguousarray(data), kind


def write_gguf_tensors(
    model: PreTrainedModel,
    tokenizer,
    tensors: Mapping[str, GgufBlocks],
    path: Path | str,
    metadata: Mapping[str, Any] | None = None,
    tokenizer_source: Path | str | None = None,
    plan: CompressionPlan | None = None,
    notes: list[str] | None = None,
) -> GgufReport:
    """Write `model` as one GGUF file: each tensor in `tensors` (by state-dict key; on a tied model either
    `model.embed_tokens.weight` or `lm_head.weight` names the one shared matrix) as its given block bytes, the
    rest as the converter stores them. The report's `accounted_bytes` is `gguf_layout(...).file_bytes(types)`,
    which the test holds equal to the file's size; see `gguf_layout` for the other arguments."""
    path = Path(path)
    layout = gguf_layout(model, tokenizer, tokenizer_source, metadata, plan)
    tensors = layout.canonical(tensors)
    types = {key: tensor.type for key, tensor in tensors.items()}
    accounted = layout.file_bytes(types)
    state = model.state_dict()
    writer = layout.metadata
    written = {}
    for key, slot in layout.slots.items():
        source = state[key] if key in state else _llama3_rope_factors(model.config)
        data, kind = _file_tensor(slot, source, tensors.get(key))
        writer.add_tensor(slot.name, data, raw_dtype=_qtype(kind) if data.dtype == np.uint8 else None)
        written[slot.name] = _qtype(kind).name
    _write_atomically(writer, path)
    return GgufReport(path, written, accounted, [*(notes or []), *layout.notes])


def _write_atomically(writer: gguf.GGUFWriter, path: Path) -> None:
    def write(temporary: str) -> None:
        writer.write_header_to_file(Path(temporary))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomically(path, write)


# ---------------------------------------------------------------- our artifact's integer grids


def gguf_type_for(quantized: QuantizedWeight, in_features: int) -> tuple[QType | None, str | None]:
    """The block type that holds a quantized Linear's grid exactly (or up to the float16 offset of the `_1`
    types), or None and the reason it has none."""
    if getattr(quantized, "format", None) is not None:
        return None, f"{quantized.format} values (not an integer grid)"
    if quantized.levels is not None:
        return None, "non-uniform grids"
    size = in_features if quantized.group_size == -1 else quantized.group_size
    if in_features % BLOCK or size % BLOCK:
        return None, f"groups that are not a multiple of {BLOCK} weights"
    bits, symmetric = quantized.bits, quantized.symmetric
    if bits <= 4:
        return (QType.Q4_0 if symmetric else QType.Q4_1), None
    if bits == 5:
        return (QType.Q5_0 if symmetric else QType.Q5_1), None
    if bits == 6 or symmetric:
        return QType.Q8_0, None
    offsets = quantized.codes.long() - _per_column(quantized.zero, quantized.group_size, in_features).long()
    if int(offsets.min()) >= -128 and int(offsets.max()) <= 127:
        return QType.Q8_0, None
    return None, "asymmetric 8-bit codes outside a signed byte"


def _per_column(values: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Per-group values [out, groups] spread to every column [out, in]."""
    size = in_features if group_size == -1 else group_size
    return values[:, torch.arange(in_features) // size]


def _half_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape[:-1], -1)


def encode_blocks(quantized: QuantizedWeight, mask: torch.Tensor | None, qtype: QType) -> np.ndarray:
    """The GGUF block bytes [out, blocks·type_size] of a quantized Linear; pruned positions become zeros."""
    codes = quantized.codes.long().cpu()
    out_features, in_features = codes.shape
    zero = _per_column(quantized.zero.cpu(), quantized.group_size, in_features).long()
    if mask is not None:
        codes = torch.where(mask.cpu(), codes, zero)  # the code that decodes to 0
    blocks = in_features // BLOCK
    first_column = torch.arange(blocks) * BLOCK
    scale = _per_column(quantized.scale.cpu().float(), quantized.group_size, in_features)[:, first_column]
    d = _half_bytes(scale.numpy()[..., None])  # [out, blocks, 2]
    shape = (out_features, blocks, BLOCK)
    offsets = (codes - zero).numpy().reshape(shape)
    if qtype == QType.Q8_0:
        parts = [d, offsets.astype(np.int8).view(np.uint8)]
    elif qtype in (QType.Q4_0, QType.Q5_0):
        q = (offsets + (8 if qtype == QType.Q4_0 else 16)).astype(np.uint8)
        parts = [d, pack_nibbles(q & 0x0F)] if qtype == QType.Q4_0 else [d, fifth_bits(q), pack_nibbles(q & 0x0F)]
    else:  # Q4_1, Q5_1: d·q + m with m = −s·z
        block_zero = zero[:, first_column].float()
        m = _half_bytes((-(scale * block_zero)).numpy()[..., None])
        q = codes.numpy().reshape(shape).astype(np.uint8)
        parts = [d, m, pack_nibbles(q & 0x0F)] if qtype == QType.Q4_1 else [d, m, fifth_bits(q), pack_nibbles(q & 0x0F)]
    data = np.concatenate(parts, axis=-1)
    assert data.shape[-1] == gguf.GGML_QUANT_SIZES[qtype][1]
    return np.ascontiguousarray(data.reshape(out_features, -1))


@torch.no_grad()
def grid_tensors(
    model: PreTrainedModel, compressed: Mapping[str, CompressedLinear], notes: list[str]
) -> dict[str, GgufBlocks]:
    """The GGUF tensors of a model compressed with our artifact's levels, by state-dict key: block bytes where a
    grid maps onto a block type, else F16 of the weight the compressed model computes with. Uncompressed tensors
    are left to the writer's defaults (the compressed model holds their values)."""
    fallbacks: Counter[str] = Counter()
    widened: Counter[tuple[int, str]] = Counter()
    pruned = 0
    tensors = {}
    for linear, kept in compressed.items():
        pruned += kept.mask is not None
        qtype = None
        if kept.quantized is not None:
            qtype, reason = gguf_type_for(kept.quantized, kept.weight.shape[1])
            if qtype is None:
                fallbacks[reason] += 1
            elif kept.quantized.bits not in (4, 5, 8):
                widened[kept.quantized.bits, qtype.name] += 1
        if qtype is not None:
            tensors[f"{linear}.weight"] = GgufBlocks(
                qtype.name.lower(), encode_blocks(kept.quantized, kept.mask, qtype)
            )
        else:
            half = kept.weight.detach().cpu().float().numpy().astype(np.float16)
            tensors[f"{linear}.weight"] = GgufBlocks("f16", half.view(np.uint8))
    if pruned:
        notes.append(f"sparsity: {pruned} pruned Linear(s) stored densely with zeros (GGUF has no sparse tensors)")
    for (bits, name), count in sorted(widened.items()):
        notes.append(f"{bits}-bit codes: {count} Linear(s) widened to {name} (GGUF's own {bits}-bit types differ)")
    for reason, count in sorted(fallbacks.items()):
        notes.append(f"{reason}: {count} quantized Linear(s) stored as F16")
    return tensors


def write_gguf(
    model: PreTrainedModel,
    tokenizer,
    plan: CompressionPlan,
    compressed: Mapping[str, CompressedLinear],
    path: Path | str,
    metadata: Mapping[str, Any] | None = None,
    tokenizer_source: Path | None = None,
) -> GgufReport:
    """Write `model` (compressed in place by `apply_plan(..., keep=True)`, which returned `compressed`) with our
    artifact's integer grids mapped onto GGUF blocks (see the module's table); `write_gguf_tensors` does the rest."""
    notes: list[str] = []
    tensors = grid_tensors(model, compressed, notes)
    return write_gguf_tensors(model, tokenizer, tensors, path, metadata, tokenizer_source, plan=plan, notes=notes)


# ---------------------------------------------------------------- the deployment target


def tokenizer_gguf(model: ModelConfig) -> Path | None:
    """The GGUF file the base model came from, whose tokenizer keys llama.cpp reads as they are."""
    if model.name == EMBEDDED_MODEL:
        return embedded_gguf()
    if model.name.endswith(".gguf"):
        return Path(model.name).expanduser()
    return None
