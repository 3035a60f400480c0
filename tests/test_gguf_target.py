"""The gguf target's levels: llama.cpp's tensor types per unit, quantized with the calibration's importance, scored
exactly as decoded from their blocks, sized from shapes, and llama.cpp's presets as plans."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM

from autocompress.calibration import collect_statistics
from autocompress.config import Config, describe_validation_error
from autocompress.errors import UserError
from autocompress.models import CompressibleLinear, compressible_linears
from autocompress.plan import CompressionPlan, LayerCompression
from autocompress.targets.gguf import blocks as gguf_blocks
from autocompress.targets.gguf.file import gguf_layout
from autocompress.targets.gguf.weights import (
    SEED_PRESETS,
    GgufWeights,
    check_levels,
    check_plan_levels,
    gguf_tensors,
    importance,
    preset_levels,
    preset_seeds,
    space_levels,
    unit_levels,
)
from tests.conftest import tiny_study_config

LEVELS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "q5_0", "q5_1", "iq4_nl", "f16"]


def wide_llama(tie_word_embeddings: bool = True, hidden_size: int = 96) -> LlamaForCausalLM:
    """A tiny Llama whose MLP rows (256) take K-types and whose hidden rows (96) take only 32-block types, as
    SmolLM2's 1536 and 576 do."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden_size,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(config).eval()


def calibration(model: LlamaForCausalLM) -> dict:
    """Input statistics of every decoder-block Linear and of lm_head on random tokens."""
    linears = [*compressible_linears(model), CompressibleLinear("lm_head", "", model.lm_head)]
    tokens = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    return collect_statistics(model, linears, tokens, {"input_sq_norms"})


@pytest.mark.parametrize("tied", [True, False])
def test_units_are_the_linears_the_embedding_and_an_untied_output(tied: bool) -> None:
    tensors = gguf_tensors(wide_llama(tied), "linear")
    names = [tensor.gguf_name for tensor in tensors]
    assert len(tensors) == 2 * 7 + (1 if tied else 2)
    assert names[0] == "blk.0.attn_q.weight" and "blk.1.ffn_down.weight" in names
    embedding = next(tensor for tensor in tensors if tensor.gguf_name == "token_embd.weight")
    assert embedding.unit == "model.embed_tokens" and embedding.shape == (128, 96)
    # the tied weight is the output matmul's too, so it is quantized with lm_head's input statistics
    assert embedding.statistics_of == ("lm_head" if tied else None)
    if not tied:
        assert tensors[-1].gguf_name == "output.weight" and tensors[-1].statistics_of == "lm_head"
    blocks = {tensor.unit for tensor in gguf_tensors(wide_llama(tied), "block")}
    assert blocks == {"model.layers.0", "model.layers.1", "model.embed_tokens"} | (set() if tied else {"lm_head"})


def test_each_unit_is_offered_only_the_levels_its_rows_take() -> None:
    tensors = gguf_tensors(wide_llama(), "linear")
    allowed = check_levels(tensors, LEVELS)
    assert allowed["model.layers.0.mlp.down_proj"] == LEVELS  # rows of 256
    assert allowed["model.layers.0.self_attn.q_proj"] == ["q8_0", "q5_0", "q5_1", "iq4_nl", "f16"]  # rows of 96
    blocks = unit_levels(gguf_tensors(wide_llama(), "block"), LEVELS)
    assert blocks["model.layers.0"] == ["q8_0", "q5_0", "q5_1", "iq4_nl", "f16"]  # every Linear of the block


def test_a_level_no_tensor_can_take_is_refused_in_one_line() -> None:
    tensors = gguf_tensors(wide_llama(hidden_size=80), "linear")  # rows of 80 and 256: 80 is no multiple of 32
    with pytest.raises(ValueError, match=r"can take none of the levels") as error:
        check_levels(tensors, ["q4_k"])
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"no unit of this model can take iq4_xs"):
        check_levels(gguf_tensors(wide_llama(hidden_size=64), "linear")[:1], ["iq4_xs", "q8_0"])
    with pytest.raises(ValueError, match=r"q_proj cannot take q4_k: its rows of 96 weights"):
        check_plan_levels(gguf_tensors(wide_llama(), "linear"), {"model.layers.0.self_attn.q_proj": "q4_k"})


def test_importance_is_the_mean_squared_input_as_llama_quantize_divides_it() -> None:
    model = wide_llama()
    stats = calibration(model)["model.layers.0.mlp.down_proj"]
    assert stats.n_tokens == 64
    expected = (stats.input_sq_norms.double() / 64).float()
    assert torch.equal(importance(stats), expected)


@pytest.mark.parametrize("tied", [True, False])
def test_evaluated_weights_equal_the_decoded_blocks_bit_for_bit(tmp_path: Path, tied: bool) -> None:
    model = wide_llama(tied)
    stats = calibration(model)
    dense = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    weights = GgufWeights(model, "linear", lambda: stats, tmp_path / "blocks", gguf_layout(model))
    units = {tensor.unit: tensor for tensor in weights.tensors}
    layers = {
        "model.layers.0.mlp.down_proj": LayerCompression(format="q3_k"),
        "model.layers.1.mlp.down_proj": LayerCompression(format="q6_k"),
        "model.layers.0.self_attn.v_proj": LayerCompression(format="iq4_nl"),
        "model.embed_tokens": LayerCompression(format="q5_1"),
    }
    plan = CompressionPlan(default=LayerCompression(format="q8_0"), layers=layers, granularity="linear")
    size = weights.stitch(plan)
    sizes = size.per_layer
    for unit, tensor in units.items():
        level = (layers.get(unit) or plan.default).format
        importance_of = stats[tensor.statistics_of] if tensor.statistics_of else None
        blocks = gguf_blocks.quantize_rows(
            dense[f"{tensor.module}.weight"], level, importance(importance_of) if importance_of else None
        )
        decoded = gguf_blocks.dequantize_rows(blocks, level, tensor.shape[1])
        assert torch.equal(dict(model.named_modules())[tensor.module].weight, decoded), unit
        assert sizes[tensor.module] == blocks.nbytes == gguf_blocks.tensor_bytes(level, *tensor.shape)
    blocks = weights.blocks_of(plan)
    assert size.total_bytes == gguf_layout(model).file_bytes({key: kept.type for key, kept in blocks.items()})
    # the blocks were kept: a second model stitches the same weights without quantizing again
    again = wide_llama(tied)
    cached = GgufWeights(
        again, "linear", lambda: pytest.fail("statistics asked for"), tmp_path / "blocks", gguf_layout(again)
    )
    cached.stitch(plan)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))
    # a corrupted and a truncated block file are quantized again, to the same blocks
    stored = sorted((tmp_path / "blocks").rglob("*.npy"))
    stored[0].write_bytes(b"not numpy")
    stored[1].write_bytes(stored[1].read_bytes()[:-7])
    healed = wide_llama(tied)
    GgufWeights(healed, "linear", lambda: stats, tmp_path / "blocks", gguf_layout(healed)).stitch(plan)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), healed.parameters(), strict=True))
    weights.restore_dense()
    assert all(torch.equal(parameter, dense[name]) for name, parameter in model.named_parameters())


def test_only_tensors_whose_level_changed_are_decoded_again(tmp_path: Path) -> None:
    model = wide_llama()
    weights = GgufWeights(model, "linear", lambda: calibration(model), None, gguf_layout(model))
    weights.stitch(CompressionPlan.uniform(format="q8_0", granularity="linear"))
    down = "model.layers.0.mlp.down_proj"
    plan = CompressionPlan(
        default=LayerCompression(format="q8_0"), layers={down: LayerCompression(format="q4_k")}, granularity="linear"
    )
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    weights.stitch(plan)
    changed = {name for name, parameter in model.named_parameters() if not torch.equal(parameter, before[name])}
    assert changed == {f"{down}.weight"}


def test_sparsity_is_refused_under_the_gguf_target() -> None:
    model = wide_llama()
    weights = GgufWeights(model, "linear", lambda: {}, None, gguf_layout(model))
    with pytest.raises(ValueError, match="stores no sparsity"):
        weights.stitch(CompressionPlan.uniform(sparsity=0.5, format="q8_0", granularity="linear"))


def test_presets_are_plans_of_per_linear_units() -> None:
    model = wide_llama()
    tensors = gguf_tensors(model, "linear")
    allowed = unit_levels(tensors, [*LEVELS, "q4_0"])
    levels, reason = preset_levels("q4_k_m", tensors, model.config, allowed)
    assert reason is None
    # llama.cpp's Q4_K_M: q4_k where rows take it, more bits on attn_v and some ffn_down, its fallbacks elsewhere
    assert levels["model.layers.0.mlp.down_proj"] == "q4_k"
    assert levels["model.layers.1.mlp.down_proj"] == "q6_k"  # the last eighth of the layers
    assert levels["model.layers.0.mlp.up_proj"] == "q5_0"  # rows of 96: q4_k falls back to q5_0
    assert levels["model.layers.1.self_attn.v_proj"] == "q8_0"  # q6_k falls back to q8_0
    assert levels["model.embed_tokens"] == "q8_0"  # the tied output's rule, rows of 96
    # a preset needing a type the space does not offer is not a plan of it, and says why
    levels, reason = preset_levels("q2_k", tensors, model.config, unit_levels(tensors, LEVELS))
    assert levels is None and "q4_0" in reason
    # per block, a preset's tensors of one unit differ
    blocks = gguf_tensors(model, "block")
    levels, reason = preset_levels("q4_k_m", blocks, model.config, unit_levels(blocks, [*LEVELS, "q4_0"]))
    assert levels is None and "granularity: linear" in reason
    assert set(SEED_PRESETS) >= {"q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k"}


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wide tiny Llama's config.json alone: the gguf checks read shapes, never weights."""
    folder = tmp_path_factory.mktemp("wide-llama")
    wide_llama().config.save_pretrained(folder)
    return folder


def gguf_config(tmp_path: Path, model_dir: Path, compression: dict | None = None, **search: object) -> Config:
    """A gguf study config for the model folder: per-Linear units, no sparsity, GGUF types as formats."""
    search = {"sparsity": [0.0], "bits": [16], "formats": ["q4_k", "q8_0", "q5_1"]} | search
    compression = {"granularity": "linear", "target": "gguf"} | (compression or {})
    raw = tiny_study_config(tmp_path, model_dir, compression=compression)
    return Config.model_validate(raw | {"search": raw["search"] | search})


@pytest.mark.parametrize("target", ["artifact", "vllm"])
def test_llama_cpp_types_are_refused_by_a_config_without_the_gguf_target(
    tmp_path: Path, wide_model_dir: Path, target: str
) -> None:
    raw = tiny_study_config(tmp_path, wide_model_dir, compression={"target": target})
    with pytest.raises(ValidationError, match=r"a level of compression\.target: gguf only"):
        Config.model_validate(raw | {"search": {"sparsity": [0.0], "bits": [16], "formats": ["q4_k", "int8"]}})


def test_the_space_is_checked_from_the_model_config_alone(tmp_path: Path, wide_model_dir: Path) -> None:
    allowed = space_levels(gguf_config(tmp_path, wide_model_dir))
    assert len(allowed) == 15  # 2 x 7 Linears + the tied embedding
    assert allowed["model.layers.1.mlp.down_proj"] == ["q4_k", "q5_1", "q8_0"]
    assert allowed["model.embed_tokens"] == ["q5_1", "q8_0"]


@pytest.mark.parametrize(
    ("compression", "search", "message"),
    [
        ({}, {"formats": ["int4"]}, "the gguf target stores the levels"),
        ({}, {"formats": ["nf4"]}, "the gguf target stores the levels"),
        ({}, {"sparsity": [0.0, 0.5]}, "GGUF stores zeros densely"),
        ({"quantization": "gptq"}, {}, "GPTQ onto GGUF blocks is not implemented"),
        ({}, {"database": "on"}, "the layer-variant database is not used"),
    ],
)
def test_what_the_target_cannot_store_is_refused_by_the_config_in_one_line(
    tmp_path: Path, wide_model_dir: Path, compression: dict, search: dict, message: str
) -> None:
    with pytest.raises(ValidationError, match=message) as error:
        gguf_config(tmp_path, wide_model_dir, compression, **search)
    assert describe_validation_error(error.value).count("\n") == 0


@pytest.mark.parametrize(
    ("compression", "search", "message"),
    [
        ({}, {"formats": ["q4_k", "iq4_xs"]}, r"q_proj \(rows of 96\) can take none of the levels"),
        ({"granularity": "block"}, {"formats": ["q4_k"]}, "model.layers.0 .* can take none of the levels"),
    ],
)
def test_what_the_model_shapes_rule_out_is_refused_before_any_weight_loads(
    tmp_path: Path, wide_model_dir: Path, compression: dict, search: dict, message: str
) -> None:
    with pytest.raises(UserError, match=message) as error:
        space_levels(gguf_config(tmp_path, wide_model_dir, compression, **search))
    assert "\n" not in str(error.value)


def test_presets_become_seed_parameters_or_say_why_not() -> None:
    model = wide_llama()
    tensors = gguf_tensors(model, "linear")
    allowed = unit_levels(tensors, ["q4_k", "q5_k", "q6_k", "q8_0", "q5_0", "q5_1"])
    seeds = {seed.baseline: seed for seed in preset_seeds(tensors, model.config, allowed)}
    assert list(seeds) == [f"llama.cpp {preset}" for preset in SEED_PRESETS]
    q4_k_m = seeds["llama.cpp q4_k_m"].params
    assert q4_k_m["model.layers.1.mlp.down_proj.format"] == "q6_k"
    assert q4_k_m["model.embed_tokens.format"] == "q8_0"
    assert seeds["llama.cpp q2_k"].params is None and "q4_0" in seeds["llama.cpp q2_k"].reason
