"""GGUF for llama.cpp: a compressed model written in the tensor types llama.cpp runs, as faithfully as GGUF allows.

GGUF quantizes in blocks of 32 consecutive inputs of a row with one float16 scale (and, for the `_1` types,
one float16 offset) per block. A plan's quantized Linear maps onto those blocks exactly when its groups are a
whole number of blocks (group size a multiple of 32, or one group per row of a multiple of 32 inputs), since a
group's scale and zero-point then repeat in each of its blocks:

| plan's grid (our codes c, zero-point z, scale s: w = s·(c − z)) | GGUF type | stored as |
|---|---|---|
| symmetric 2–4 bits | Q4_0 (`d·(q − 8)`) | d = s, q = c − z + 8 (exact) |
| asymmetric 2–4 bits | Q4_1 (`d·q + m`) | d = s, q = c, m = −s·z rounded to float16 |
| symmetric 5 bits | Q5_0 (`d·(q − 16)`) | d = s, q = c − z + 16 (exact) |
| asymmetric 5 bits | Q5_1 (`d·q + m`) | d = s, q = c, m = −s·z rounded to float16 |
| 6 bits, symmetric 8 bits | Q8_0 (`d·q`) | d = s, q = c − z (exact) |
| asymmetric 8 bits | Q8_0 when every c − z fits a signed byte, else F16 | |

What GGUF cannot express is written densely instead, and `GgufReport.notes` says so:
- sparsity: GGUF has no sparse tensors; pruned weights are stored as zeros (exact zeros for Q4_0/Q5_0/Q8_0 and
  F16, zeros up to the float16 rounding of m for Q4_1/Q5_1), so pruning saves no bytes in the file;
- groups that are not a whole number of 32-blocks, non-uniform grids and number formats (FP8, NF4, MXFP4, NVFP4),
  and asymmetric 8-bit codes that do not fit a signed byte: F16 of the weight the compressed model computes with
  (no loss beyond float16 rounding);
- its own 2/3/6-bit k-quants (Q2_K, Q3_K, Q6_K) use 256-weight super-blocks with quantized sub-block scales,
  which our per-group float16 scales do not map onto; those bit-widths go to Q4_x or Q8_0 instead.
Everything else follows llama.cpp's own converter: 1-D tensors in F32, other uncompressed ones in F16, query and
key rows permuted for its rotary layout, a tied lm_head omitted. Only the Llama family (Llama, Mistral) is written.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from transformers import PreTrainedModel

from autocompress.compress import CompressedLinear
from autocompress.errors import UserError
from autocompress.methods import QuantizedWeight
from autocompress.plan import CompressionPlan

BLOCK = 32
GGUF_FILE = "model.gguf"
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
_FLOAT_TYPES = (QType.F16, QType.F32)


@dataclass
class GgufReport:
    path: Path
    types: dict[str, str]  # GGUF tensor name -> its type
    notes: list[str] = field(default_factory=list)  # what the file could not express as the plan has it

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size

    def summary(self) -> str:
        counts = Counter(self.types.values())
        return ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))


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


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 32] values → [..., 16] bytes: value j in the low nibble of byte j, value j+16 in its high nibble."""
    return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)


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
        parts = [d, _nibbles(q)] if qtype == QType.Q4_0 else [d, _high_bits(q), _nibbles(q)]
    else:  # Q4_1, Q5_1: d·q + m with m = −s·z
        block_zero = zero[:, first_column].float()
        m = _half_bytes((-(scale * block_zero)).numpy()[..., None])
        q = codes.numpy().reshape(shape).astype(np.uint8)
        parts = [d, m, _nibbles(q)] if qtype == QType.Q4_1 else [d, m, _high_bits(q), _nibbles(q)]
    data = np.concatenate(parts, axis=-1)
    assert data.shape[-1] == gguf.GGML_QUANT_SIZES[qtype][1]
    return np.ascontiguousarray(data.reshape(out_features, -1))


def _high_bits(q: np.ndarray) -> np.ndarray:
    """The fifth bit of each of 32 values as a little-endian 32-bit word (4 bytes), value j in bit j."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def _rope_rows(rows: int, heads: int) -> np.ndarray:
    """llama.cpp's permutation of query/key rows (its converter's `permute`), as row indices."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _add_model_metadata(writer: gguf.GGUFWriter, model: PreTrainedModel, notes: list[str]) -> None:
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(str(getattr(config, "_name_or_path", "") or "autocompress model"))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        notes.append(f"rope scaling {rope.get('rope_type') or rope.get('type')!r} is not written")


def _copy_tokenizer_fields(writer: gguf.GGUFWriter, source: Path) -> None:
    """The tokenizer.* keys of the GGUF file the base model came from, as they are."""
    reader = gguf.GGUFReader(source)
    for key, reader_field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value_type = reader_field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, reader_field.contents(), value_type, sub_type=reader_field.types[-1])
        else:
            writer.add_key_value(key, reader_field.contents(), value_type)


def _add_bpe_tokenizer(writer: gguf.GGUFWriter, tokenizer, notes: list[str]) -> None:
    """A GPT-2 style byte-level BPE tokenizer from its tokenizer.json; other kinds are not written."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        try:
            vocab = gguf.vocab.BpeVocab(Path(folder))
        except (FileNotFoundError, KeyError, ValueError):
            notes.append("the tokenizer is not a byte-level BPE one, so it is not written (llama.cpp needs one)")
            return
        tokens, types = [], []
        for text, _score, token_type in vocab.all_tokens():
            tokens.append(text)
            types.append(token_type)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.vocab.SpecialVocab(Path(folder), load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    notes.append("the tokenizer's pre-tokenizer is written as llama.cpp's 'default'")


def _architecture(model: PreTrainedModel) -> str:
    name = type(model).__name__
    if name not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UserError(f"export: GGUF is written for {known} only, not {name}; use --format compressed or hf")
    return ARCHITECTURES[name]


@torch.no_grad()
def gguf_tensors(
    model: PreTrainedModel, compressed: Mapping[str, CompressedLinear], notes: list[str]
) -> list[tuple[str, np.ndarray, QType]]:
    """Every tensor of the GGUF file: (GGUF name, data, type); data is raw block bytes for quantized types."""
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    fallbacks: Counter[str] = Counter()
    widened: Counter[tuple[int, str]] = Counter()
    pruned = 0
    tensors = []
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"export: GGUF has no name for the tensor {key!r}")
        rows = None
        if name.endswith(("attn_q.weight", "attn_q.bias")):
            rows = _rope_rows(tensor.shape[0], heads)
        elif name.endswith(("attn_k.weight", "attn_k.bias")):
            rows = _rope_rows(tensor.shape[0], kv_heads)
        linear = key.removesuffix(".weight")
        kept = compressed.get(linear) if key.endswith(".weight") else None
        qtype = None
        if kept is not None:
            pruned += kept.mask is not None
            if kept.quantized is not None:
                qtype, reason = gguf_type_for(kept.quantized, tensor.shape[1])
                if qtype is None:
                    fallbacks[reason] += 1
                elif kept.quantized.bits not in (4, 5, 8):
                    widened[kept.quantized.bits, qtype.name] += 1
        if qtype is not None:
            data = encode_blocks(kept.quantized, kept.mask, qtype)
        else:
            source = kept.weight if kept is not None else tensor
            qtype = QType.F32 if tensor.dim() == 1 else QType.F16
            data = source.detach().cpu().float().numpy().astype(np.float32 if qtype == QType.F32 else np.float16)
        if rows is not None:
            data = data[rows]
        tensors.append((name, np.ascontiguousarray(data), qtype))
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
    """Write `model` (compressed in place by `apply_plan(..., keep=True)`, which returned `compressed`) as one
    GGUF file for llama.cpp. `tokenizer_source` is a GGUF file whose tokenizer keys are copied as they are
    (the base model's own, when it came from GGUF); else a byte-level BPE tokenizer is converted."""
    path = Path(path)
    architecture = _architecture(model)
    notes: list[str] = []
    tensors = gguf_tensors(model, compressed, notes)
    writer = gguf.GGUFWriter(None, architecture)
    _add_model_metadata(writer, model, notes)
    if any(qtype not in _FLOAT_TYPES for _, _, qtype in tensors):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer_source is not None:
        _copy_tokenizer_fields(writer, tokenizer_source)
    elif tokenizer is not None:
        _add_bpe_tokenizer(writer, tokenizer, notes)
    writer.add_string("autocompress.plan", plan.model_dump_json())
    writer.add_string("autocompress.provenance", json.dumps(dict(metadata or {}), default=str))
    for name, data, qtype in tensors:
        writer.add_tensor(name, data, raw_dtype=None if qtype in _FLOAT_TYPES else qtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(descriptor)
    try:
        writer.write_header_to_file(Path(temporary))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return GgufReport(path, {name: qtype.name for name, _, qtype in tensors}, notes)
