"""Size accounting: bytes as an exported artifact stores them, checked against sizes worked out by hand."""

from __future__ import annotations

import pytest
import torch

from autocompress.plan import CompressionPlan, LayerCompression
from autocompress.size import linear_bytes, model_size, packed_bytes

ASYMMETRIC_G128 = CompressionPlan(group_size=128, symmetric=False)
SYMMETRIC_G128 = CompressionPlan(group_size=128, symmetric=True)

# The tiny Llama: hidden 64, 4 heads of 16 (2 key-value heads: k/v project to 32), MLP 128, 2 blocks, vocab 256.
# Per block:     q 64×64, k 32×64, v 32×64, o 64×64, gate 128×64, up 128×64, down 64×128 (out × in)
TINY_SHAPES = {
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (32, 64),
    "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (128, 64),
    "mlp.up_proj": (128, 64),
    "mlp.down_proj": (64, 128),
}
TINY_LINEAR_WEIGHTS = 36_864  # per block: 4096 + 2048 + 2048 + 4096 + 8192 + 8192 + 8192
TINY_EMBEDDING = 256 * 64  # tied with lm_head: stored once
TINY_NORMS = 2 * 2 * 64 + 64  # two RMSNorms per block, one final
TINY_PARAMETERS = TINY_EMBEDDING + 2 * TINY_LINEAR_WEIGHTS + TINY_NORMS  # 90,432


def test_packed_values_round_up_to_whole_bytes():
    assert packed_bytes(8, 1) == 1
    assert packed_bytes(9, 1) == 2
    assert packed_bytes(5, 3) == 2  # 15 bits
    assert packed_bytes(3, 16) == 6
    assert packed_bytes(0, 4) == 0


def test_a_dense_16_bit_linear_takes_two_bytes_per_weight():
    assert linear_bytes(64, 576, LayerCompression(), ASYMMETRIC_G128) == 64 * 576 * 2  # 73,728


def test_a_bias_adds_two_bytes_per_output():
    assert linear_bytes(64, 576, LayerCompression(), ASYMMETRIC_G128, bias=True) == 73_728 + 128
    quantized = LayerCompression(bits=4)
    assert (
        linear_bytes(64, 576, quantized, ASYMMETRIC_G128, bias=True)
        == linear_bytes(64, 576, quantized, ASYMMETRIC_G128) + 128
    )


def test_4_bit_asymmetric_groups_of_128_on_a_576_wide_row_store_five_scales_and_zero_points_per_row():
    # 576 = 4·128 + 64: five groups per row, the last one half full.
    values = 64 * 576 * 4 // 8  # 18,432
    scales = 64 * 5 * 2  # float16: 640
    zero_points = 64 * 5 * 4 // 8  # packed at 4 bits: 160
    assert linear_bytes(64, 576, LayerCompression(bits=4), ASYMMETRIC_G128) == values + scales + zero_points


def test_a_symmetric_grid_stores_no_zero_points():
    assert linear_bytes(64, 576, LayerCompression(bits=4), SYMMETRIC_G128) == 18_432 + 640


def test_one_group_per_row_stores_one_scale_and_zero_point_per_row():
    plan = CompressionPlan(group_size=-1)
    assert linear_bytes(64, 576, LayerCompression(bits=4), plan) == 18_432 + 64 * 2 + 64 * 4 // 8


def test_zero_points_are_packed_at_the_bit_width_and_rounded_up():
    # 3 rows × 1 group of 3-bit zero-points: 9 bits, 2 bytes; 3·5 values at 3 bits: 45 bits, 6 bytes.
    plan = CompressionPlan(group_size=-1)
    assert linear_bytes(3, 5, LayerCompression(bits=3), plan) == 6 + 3 * 2 + 2


def test_50_percent_sparsity_keeps_half_the_values_and_adds_a_1_bit_mask():
    kept_values = 64 * 288 * 2  # 16-bit: 36,864
    mask = 64 * 576 // 8  # 4,608
    assert linear_bytes(64, 576, LayerCompression(sparsity=0.5), ASYMMETRIC_G128) == kept_values + mask


def test_sparse_and_quantized_stores_kept_values_at_the_bit_width_plus_mask_scales_and_zero_points():
    kept_values = 64 * 288 * 4 // 8  # 9,216
    assert (
        linear_bytes(64, 576, LayerCompression(sparsity=0.5, bits=4), ASYMMETRIC_G128) == kept_values + 4608 + 640 + 160
    )


def test_n_m_sparsity_is_accounted_like_unstructured_sparsity_of_the_same_fraction():
    plan = CompressionPlan(pattern="2:4")
    assert linear_bytes(64, 576, LayerCompression(sparsity=0.5), plan) == 36_864 + 4_608


def test_the_pruned_count_rounds_like_the_pruners():
    # round(0.3 · 10) = 3 pruned per row, 7 kept: 4 rows · 7 · 2 bytes + a 40-bit mask.
    assert linear_bytes(4, 10, LayerCompression(sparsity=0.3), ASYMMETRIC_G128) == 56 + 5


# --- whole models -----------------------------------------------------------------------------------------------


def test_an_identity_plan_is_exactly_the_dense_16_bit_size(tiny_model):
    report = model_size(tiny_model, CompressionPlan.uniform())
    assert report.dense_bytes == TINY_PARAMETERS * 2 == 180_864
    assert report.total_bytes == report.dense_bytes
    assert report.ratio == 1.0


def test_tied_embeddings_are_counted_once(tiny_model, untied_tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight
    tied_report = model_size(tiny_model, CompressionPlan.uniform(bits=4))
    untied_report = model_size(untied_tiny_model, CompressionPlan.uniform(bits=4))
    assert untied_report.dense_bytes - tied_report.dense_bytes == TINY_EMBEDDING * 2
    assert untied_report.total_bytes - tied_report.total_bytes == TINY_EMBEDDING * 2


def test_the_per_layer_sizes_name_every_compressed_linear(tiny_model):
    report = model_size(tiny_model, CompressionPlan.uniform(bits=4))
    expected_names = [f"model.layers.{block}.{name}" for block in range(2) for name in TINY_SHAPES]
    assert list(report.per_layer) == expected_names


def test_4_bit_asymmetric_g128_on_the_tiny_model_matches_the_hand_count(tiny_model):
    # Every row is at most 128 wide: one group per row, 2 bytes of scale and half a byte of zero-point.
    per_linear = {
        "self_attn.q_proj": 2048 + 128 + 32,
        "self_attn.k_proj": 1024 + 64 + 16,
        "self_attn.v_proj": 1024 + 64 + 16,
        "self_attn.o_proj": 2048 + 128 + 32,
        "mlp.gate_proj": 4096 + 256 + 64,
        "mlp.up_proj": 4096 + 256 + 64,
        "mlp.down_proj": 4096 + 128 + 32,
    }
    report = model_size(tiny_model, CompressionPlan.uniform(bits=4, group_size=128))
    assert report.per_layer == {f"model.layers.{b}.{name}": size for b in range(2) for name, size in per_linear.items()}
    untouched = (TINY_EMBEDDING + TINY_NORMS) * 2  # embeddings (= lm_head) and norms stay 16-bit
    assert report.total_bytes == untouched + 2 * 19_712 == 72_832
    assert report.ratio == pytest.approx(72_832 / 180_864)


def test_a_per_block_plan_sizes_each_block_by_its_own_setting(tiny_model):
    plan = CompressionPlan(layers={"model.layers.1": LayerCompression(sparsity=0.5)})
    report = model_size(tiny_model, plan)
    for name, (out_features, in_features) in TINY_SHAPES.items():
        assert report.per_layer[f"model.layers.0.{name}"] == out_features * in_features * 2
        half_sparse = out_features * in_features // 2 * 2 + out_features * in_features // 8
        assert report.per_layer[f"model.layers.1.{name}"] == half_sparse
    assert report.total_bytes == report.dense_bytes - 2 * TINY_LINEAR_WEIGHTS + sum(
        report.per_layer[f"model.layers.1.{name}"] for name in TINY_SHAPES
    )


def test_size_depends_on_the_plan_not_on_the_weights(tiny_model):
    plan = CompressionPlan.uniform(sparsity=0.5, bits=4)
    before = model_size(tiny_model, plan)
    with torch.no_grad():
        for parameter in tiny_model.parameters():
            parameter.zero_()
    assert model_size(tiny_model, plan) == before
