"""A model of per-block shapes written as llama.cpp's `deci` architecture: its per-layer arrays, its size accounted to
the byte, and llama.cpp computing what transformers computes on it."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from autocompress.distillation import measure_importance
from autocompress.errors import UserError
from autocompress.metrics import log_probs
from autocompress.plan import BlockStructure, CompressionPlan
from autocompress.structure import NoAttention, build_structured
from autocompress.targets.gguf.blocks import GgufBlocks, fits, quantize_rows
from autocompress.targets.gguf.file import gguf_layout
from autocompress.targets.gguf.llama_cpp import llama_cpp_available
from tests.conftest import require
from tests.test_gguf_export import (
    COMMON,
    VOCAB,
    activation_rounding,
    bpe_tokenizer,
    dequantized,
    export,
    kl,
    llama_cpp_log_probs,
    windows,
)

STRUCTURE = {
    "model.layers.0": BlockStructure(ffn=0.5),  # 256 channels: K-types fit ffn_down
    "model.layers.1": BlockStructure(removed=True),
    "model.layers.2": BlockStructure(kv_groups=0, ffn=0.75),  # no attention; 384 channels: 32-block types only
    "model.layers.3": BlockStructure(kv_groups=1, ffn=0.25),  # 2 of 4 query heads, 1 of 2 key/value heads
}
SUPER_BLOCK_TYPES = ("q4_k", "q5_k", "q6_k", "q3_k", "iq4_xs", "q8_0")
BLOCK_TYPES = ("q8_0", "q5_1", "q4_0", "iq4_nl")


def teacher() -> LlamaForCausalLM:
    """A random four-block Llama whose weights float16 holds exactly, with random norms and peaked outputs (as
    test_gguf_export's tiny models)."""
    torch.manual_seed(0)
    config = LlamaConfig(**{"vocab_size": VOCAB, **COMMON, "num_hidden_layers": 4, "tie_word_embeddings": False})
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if key.endswith("norm.weight"):
                parameter.copy_(torch.randn_like(parameter) * 0.2 + 1.0)
            elif key.endswith(("lm_head.weight", "embed_tokens.weight")):
                parameter.copy_((parameter * 4.0).half().float())
            else:
                parameter.copy_(parameter.half().float())
    return model


def structured() -> PreTrainedModel:
    model = teacher()
    importance = measure_importance(model, windows(VOCAB))
    return build_structured(model, CompressionPlan(structure=STRUCTURE), importance)


def mixed_types(model: PreTrainedModel) -> dict[str, GgufBlocks]:
    """Every 2-D weight quantized as llama.cpp writes it: K-types where its rows split into 256-blocks, 32-block
    types elsewhere, the embedding q4_k, the output q6_k."""
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for index, (key, weight) in enumerate(
        (key, value) for key, value in model.state_dict().items() if value.dim() == 2
    ):
        kind = (
            "q4_k"
            if key.endswith("embed_tokens.weight")
            else "q6_k"
            if key == "lm_head.weight"
            else SUPER_BLOCK_TYPES[index % len(SUPER_BLOCK_TYPES)]
        )
        if not fits(kind, weight.shape[1]):
            kind = BLOCK_TYPES[index % len(BLOCK_TYPES)]
        importance = torch.rand(weight.shape[1], generator=generator) + 0.1
        tensors[key] = GgufBlocks(kind, quantize_rows(weight, kind, importance))
    return tensors


def test_a_structured_model_is_written_as_deci_with_its_per_layer_shapes(tmp_path: Path) -> None:
    model = structured()
    path = export("deci", model, mixed_types(model), tmp_path / "deci.gguf")  # asserts accounted bytes = file bytes
    reader = gguf.GGUFReader(path)

    def field(key: str):
        return reader.fields[key].contents()

    assert field("general.architecture") == "deci"
    assert field("deci.feed_forward_length") == [256, 0, 384, 128]
    assert field("deci.attention.head_count") == [4, 0, 0, 2]
    assert field("deci.attention.head_count_kv") == [2, 0, 0, 1]
    assert field("deci.attention.key_length") == field("deci.attention.value_length") == 64
    names = {tensor.name for tensor in reader.tensors}
    assert not any(name.startswith("blk.1.") for name in names)  # a removed block has no tensors
    assert not {"blk.2.attn_norm.weight", "blk.2.attn_q.weight"} & names and "blk.2.ffn_norm.weight" in names
    assert reader.tensors[[tensor.name for tensor in reader.tensors].index("blk.3.attn_k.weight")].shape.tolist() == [
        256,
        64,
    ]


def test_the_teachers_own_shapes_keep_the_llama_architecture(tmp_path: Path) -> None:
    model = teacher()
    layout = gguf_layout(model, bpe_tokenizer())
    assert layout.family.arch == gguf.MODEL_ARCH.LLAMA


def test_a_structure_deci_cannot_run_is_refused_at_export(tmp_path: Path) -> None:
    model = teacher()
    model.model.layers[0].self_attn = NoAttention()  # the first block gives llama.cpp the head size
    model.model.layers[0].input_layernorm = torch.nn.Identity()
    with pytest.raises(UserError, match="the first block keeps its attention"):
        gguf_layout(model, bpe_tokenizer())


def test_llama_cpp_computes_what_transformers_computes_on_a_deci_file(tmp_path: Path) -> None:
    """F16: llama.cpp's next-token distributions equal ours to float16 rounding. Mixed types: within the floor that
    8-bit activation rounding alone sets (as test_gguf_export measures it)."""
    require(llama_cpp_available())
    model = structured()
    tokens = windows(VOCAB)
    ours = log_probs(model, tokens)
    f16 = llama_cpp_log_probs(export("deci", model, {}, tmp_path / "f16.gguf"), tokens)
    kl_f16 = kl(f16, ours)

    tensors = mixed_types(model)
    dequantized(model, tensors)
    path = export("deci", model, tensors, tmp_path / "mixed.gguf")
    reference = log_probs(model, tokens)
    mixed = llama_cpp_log_probs(path, tokens)
    hooks = activation_rounding(model, {key: tensor.type for key, tensor in tensors.items()})
    floor = kl(log_probs(model, tokens), reference)
    for hook in hooks:
        hook.remove()
    kl_mixed = kl(mixed, reference)
    top1 = (mixed.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"deci: F16 KL {kl_f16:.1e}; mixed KL {kl_mixed:.1e} (top-1 {top1:.3f}), floor {floor:.1e}")
    assert kl_f16 <= 2e-5
    assert kl_mixed <= max(1e-3, 1.25 * floor)
    assert top1 >= 0.9
