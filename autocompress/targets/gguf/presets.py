"""llama.cpp's quantization presets (`llama-quantize ... Q4_K_M`) as it assigns them, tensor by tensor.

A preset is not one type: llama.cpp gives each tensor a type by its role (attn_v, ffn_down, output...), its
layer's position in the stack and its row length. This is a port of `llama_tensor_get_type` and the preset
defaults of the llama.cpp that llama-cpp-python 0.3.36 vendors (`src/llama-quant.cpp`, commit 0c1e570, release
b11312), so that a search can start from, size and be compared against exactly the files `llama-quantize` writes;
a test quantizes with llama.cpp and compares every tensor's type.

Ported for the Llama family (Llama, Mistral, Mixtral: llama.cpp's `llama` architecture) and the presets in
`PRESETS`; the IQ presets (whose rules need an importance matrix) and other architectures' exceptions (Falcon,
GLM5) are not. What the port keeps from llama.cpp, on purpose:
- tensors are visited in llama.cpp's order (non-layer tensors first, then by layer number, by name within a
  layer), since the attn_v rules count attn_v tensors in that order;
- `attn_qkv` and `attn_kv_b` follow the attn_v rules (llama.cpp's own attn_qkv branch is unreachable);
- with no `output.weight` (tied embeddings), `token_embd.weight` takes the output tensor's rules;
- a row length that the chosen type's block does not divide falls back to a 32-block type (this llama.cpp:
  Q2_K, Q3_K → Q4_0; Q4_K → Q5_0; Q5_K → Q5_1; Q6_K → Q8_0), and to F16 when 32 does not divide it either;
  SmolLM2-135M's 576-wide rows are such a case;
- the output tensor (or tied embedding) takes Q8_0 outright, before that fallback, when its rows do not fit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType


@dataclass(frozen=True)
class Preset:
    ftype: int  # llama.cpp's LLAMA_FTYPE_MOSTLY_* value, what llama_model_quantize_params.ftype takes
    default: str  # the tensor type that llama.cpp starts from (llama_ftype_get_default_type)


PRESETS: dict[str, Preset] = {
    "f32": Preset(0, "f32"),
    "f16": Preset(1, "f16"),
    "q4_0": Preset(2, "q4_0"),
    "q4_1": Preset(3, "q4_1"),
    "q8_0": Preset(7, "q8_0"),
    "q5_0": Preset(8, "q5_0"),
    "q5_1": Preset(9, "q5_1"),
    "q2_k": Preset(10, "q2_k"),
    "q3_k_s": Preset(11, "q3_k"),
    "q3_k_m": Preset(12, "q3_k"),
    "q3_k_l": Preset(13, "q3_k"),
    "q4_k_s": Preset(14, "q4_k"),
    "q4_k_m": Preset(15, "q4_k"),
    "q5_k_s": Preset(16, "q5_k"),
    "q5_k_m": Preset(17, "q5_k"),
    "q6_k": Preset(18, "q6_k"),
    "bf16": Preset(32, "bf16"),
}

# Where a type goes when a tensor's rows are not a whole number of its blocks (tensor_type_fallback).
_FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}

# Substrings of tensor names that llama.cpp never quantizes, whatever the preset (tensor_allows_quantization;
# the architecture-specific GLM5 ones left out).
_KEPT_SUBSTRINGS = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
_KEPT_NAMES = ("position_embd.weight", "token_types.weight")
_LAYER = re.compile(r"blk\.(\d+)\.")


class Role(Enum):
    """llama.cpp's tensor_category: the role a tensor's name gives it, in the order llama.cpp tests names."""

    OUTPUT = "output"
    TOKEN_EMBD = "token_embd"
    ATTN_QKV = "attn_qkv"
    ATTN_KV_B = "attn_kv_b"
    ATTN_V = "attn_v"
    ATTN_K = "attn_k"
    ATTN_Q = "attn_q"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OTHER = "other"


_ROLE_SUBSTRINGS = (
    ("attn_qkv.weight", Role.ATTN_QKV),
    ("attn_kv_b.weight", Role.ATTN_KV_B),
    ("attn_v.weight", Role.ATTN_V),
    ("attn_k.weight", Role.ATTN_K),
    ("attn_q.weight", Role.ATTN_Q),
    ("attn_output.weight", Role.ATTN_OUTPUT),
    ("ffn_up", Role.FFN_UP),
    ("ffn_gate", Role.FFN_GATE),
    ("ffn_down", Role.FFN_DOWN),
)
_ATTN_V_LIKE = (Role.ATTN_V, Role.ATTN_QKV, Role.ATTN_KV_B)


def role(name: str) -> Role:
    """The role llama.cpp reads from a GGUF tensor name (tensor_get_category)."""
    if name == "output.weight":
        return Role.OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return Role.TOKEN_EMBD
    return next((found for part, found in _ROLE_SUBSTRINGS if part in name), Role.OTHER)


def block_size(type_name: str) -> int:
    """Weights per block of a GGUF type (256 for the k-quants, 32 for q4_0..q8_0 and iq4_nl, 1 for floats)."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name.upper()]][0]


def is_quantized(type_name: str) -> bool:
    return type_name not in ("f32", "f16", "bf16")


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """Whether llama.cpp quantizes this tensor at all: 2-D (or 3-D expert) weights other than norms, routers and a
    few small tables; 1-D tensors keep their type (F32 as written)."""
    if len(shape) < 2 or not name.endswith("weight") or name in _KEPT_NAMES:
        return False
    return not any(part in name for part in _KEPT_SUBSTRINGS)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers llama.cpp gives more bits in the _M presets: the first and last eighth, and every third between.
    (C++ truncates `%` toward zero, Python floors; they differ only for negative operands, which the first test
    already excludes.)"""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _layer(name: str) -> int:
    """The layer llama.cpp's loader reads from `blk.N.` (-1 for tensors outside the layers)."""
    found = _LAYER.match(name)
    return int(found.group(1)) if found else -1


@dataclass
class _State:
    """quantize_state_impl: the model's shape and the counters that llama.cpp advances while it assigns types."""

    preset: str
    n_layers: int
    n_gqa: int
    n_expert: int
    is_70b: bool
    imatrix: bool
    tied: bool
    n_attention_wv: int
    i_attention_wv: int = 0
    i_ffn_down: int = 0

    def ffn_down_layer(self, name: str) -> int:
        """The layer a ffn_down tensor counts as: its position among the ffn_down tensors, or, in a mixture of
        experts (whose expert tensors llama.cpp does not find consecutive), the layer in its name."""
        if self.n_expert > 1:
            found = _layer(name)
            if not 0 <= found < self.n_layers:
                raise ValueError(f"tensor {name!r}: no layer in [0, {self.n_layers}) in its name")
            return found
        return self.i_ffn_down


def _role_type(state: _State, new_type: str, name: str, row: int, category: Role) -> str:
    """llama_tensor_get_type_impl for the presets in PRESETS: the preset's type for this tensor's role and layer."""
    p = state.preset
    if category == Role.OUTPUT or (state.tied and category == Role.TOKEN_EMBD):
        if row % block_size(new_type):
            return "q8_0"
        return new_type if new_type == "q8_0" else "q6_k"
    if category in _ATTN_V_LIKE:
        n, i = state.n_attention_wv, state.i_attention_wv
        if p == "q2_k":
            new_type = "q4_k" if state.n_gqa >= 4 else "q3_k"
        elif p == "q3_k_m":
            new_type = "q5_k" if i < 2 else "q4_k"
        elif p == "q3_k_l":
            new_type = "q5_k"
        elif p in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
            new_type = "q6_k"
        elif p == "q4_k_s" and i < 4:
            new_type = "q5_k"
        if state.is_70b and new_type in ("q3_k", "q4_k"):
            new_type = "q5_k"  # 8 heads share each attn_v there: more bits for almost no bytes
        if state.n_expert == 8:
            new_type = "q8_0"
        state.i_attention_wv += 1
    elif category == Role.ATTN_K:
        if state.n_expert == 8:
            new_type = "q8_0"
    elif category == Role.FFN_DOWN:
        i_layer, n_layers = state.ffn_down_layer(name), state.n_layers
        if p == "q2_k":
            new_type = "q3_k"
        elif p == "q3_k_m":
            new_type = "q5_k" if i_layer < n_layers // 16 else "q4_k"
        elif p == "q3_k_l":
            new_type = "q5_k"
        elif p in ("q4_k_m", "q5_k_m"):
            if _use_more_bits(i_layer, n_layers):
                new_type = "q6_k"
        elif p == "q4_k_s" and i_layer < n_layers // 8:
            new_type = "q5_k"
        elif p in ("q4_0", "q5_0") and state.imatrix and i_layer < n_layers // 8:
            new_type = "q4_1" if p == "q4_0" else "q5_1"
        state.i_ffn_down += 1
    elif category == Role.ATTN_OUTPUT:
        if state.n_expert == 8:
            if p in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m"):
                new_type = "q5_k"
        elif p == "q2_k":
            new_type = "q3_k"
        elif p == "q3_k_m":
            new_type = "q4_k"
        elif p == "q3_k_l":
            new_type = "q5_k"
    return new_type


def _fallback(type_name: str, row: int) -> str:
    """tensor_type_fallback: a type whose blocks divide the row, else F16."""
    if row % block_size(type_name) == 0:
        return type_name
    if type_name in _FALLBACK:
        type_name = _FALLBACK[type_name]
    elif block_size(type_name) > 32:
        raise ValueError(f"llama.cpp has no fallback for {type_name}")
    return type_name if row % block_size(type_name) == 0 else "f16"


def _llama_order(name: str) -> tuple[int, str]:
    """llama.cpp's loader's weight order (weight_name_comparer)."""
    return _layer(name), name


def preset_types(
    preset: str,
    tensors: Sequence[tuple[str, tuple[int, ...]]],
    n_layers: int,
    *,
    n_head: int,
    n_head_kv: int,
    n_expert: int = 0,
    imatrix: bool = False,
    source_types: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The type llama.cpp's `llama-quantize` gives each tensor of a GGUF file under `preset` (e.g. "q4_k_m").

    `tensors` are the file's (GGUF name, shape) pairs with shapes in PyTorch order (a Linear's [out, in]: the last
    dimension is the row that blocks divide); `n_layers`, `n_head`, `n_head_kv`, `n_expert` are its block count,
    attention heads, key/value heads and experts. `imatrix` says whether an importance matrix is given (it changes
    q4_0/q5_0's first ffn_down layers). Tensors llama.cpp keeps as they are get their type in `source_types`,
    by default F32 for 1-D tensors and F16 for others, as the project's writer and llama.cpp's converter store them.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown llama.cpp preset {preset!r}; known: {', '.join(PRESETS)}")
    default = PRESETS[preset].default
    names = [name for name, _ in tensors]
    state = _State(
        preset=preset,
        n_layers=n_layers,
        n_gqa=n_head // n_head_kv if n_head_kv else 0,
        n_expert=n_expert,
        is_70b=n_expert != 8 and n_layers == 80 and n_head != n_head_kv,
        imatrix=imatrix,
        tied="output.weight" not in names,
        n_attention_wv=sum(role(name) in _ATTN_V_LIKE for name in names),
    )
    types = {}
    for name, shape in sorted(tensors, key=lambda tensor: _llama_order(tensor[0])):
        if not allows_quantization(name, shape):
            kept = (source_types or {}).get(name)
            types[name] = kept or ("f32" if len(shape) < 2 else "f16")
        elif not is_quantized(default):
            types[name] = default
        else:
            row = shape[-1]
            types[name] = _fallback(_role_type(state, default, name, row, role(name)), row)
    return {name: types[name] for name in names}
