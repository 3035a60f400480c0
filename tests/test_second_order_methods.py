"""SparseGPT and GPTQ: the second-order one-shot methods, on seeded layers with correlated inputs."""

from __future__ import annotations

import pytest
import torch

from autocompress.compress import compress_weight, statistics_needed
from autocompress.methods import PRUNERS, QUANTIZERS, LayerStatistics, QuantSpec, SparsityPattern
from autocompress.methods.pruning import magnitude, pruned_per_row, sparsegpt, wanda
from autocompress.methods.quantization import encode, gptq, gptq_actorder, group_count, quantize_rtn
from autocompress.plan import CompressionPlan, LayerCompression


def make_layer(
    out_features: int = 96,
    in_features: int = 256,
    tokens: int = 1024,
    seed: int = 0,
    outlier_columns: int = 0,
    dead_columns: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, LayerStatistics]:
    """A random weight and inputs X = Z·A with a random mixing A, so the Hessian XᵀX is far from diagonal."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(in_features, in_features, generator=generator) / in_features**0.5 + torch.eye(in_features)
    inputs = torch.randn(tokens, in_features, generator=generator) @ mixing
    inputs *= torch.rand(in_features, generator=generator).mul(2).exp()  # channels of different scales
    columns = torch.randperm(in_features, generator=generator)
    inputs[:, columns[:outlier_columns]] *= 20
    inputs[:, columns[outlier_columns : outlier_columns + dead_columns]] = 0
    weight = torch.randn(out_features, in_features, generator=generator)
    return weight, inputs, statistics(inputs)


def statistics(inputs: torch.Tensor) -> LayerStatistics:
    return LayerStatistics(hessian=inputs.T @ inputs, input_sq_norms=inputs.square().sum(0), n_tokens=inputs.shape[0])


def reconstruction_error(weight: torch.Tensor, approximation: torch.Tensor, inputs: torch.Tensor) -> float:
    return ((weight - approximation) @ inputs.T).square().sum().item()


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, LayerStatistics]:
    return make_layer()


def test_methods_are_registered_with_the_hessian_as_their_need():
    assert PRUNERS["sparsegpt"].function is sparsegpt
    assert QUANTIZERS["gptq"].function is gptq
    assert QUANTIZERS["gptq-actorder"].function is gptq_actorder
    for method in (PRUNERS["sparsegpt"], QUANTIZERS["gptq"], QUANTIZERS["gptq-actorder"]):
        assert method.needs == {"hessian"}


# --- SparseGPT ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sparsity", "pattern"), [(0.5, SparsityPattern()), (0.5, SparsityPattern(2, 4))])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(layer, sparsity, pattern):
    weight, inputs, stats = layer
    errors = {
        pruner.__name__: reconstruction_error(weight, pruner(weight, sparsity, pattern, stats), inputs)
        for pruner in (magnitude, wanda, sparsegpt)
    }
    assert errors["sparsegpt"] < 0.9 * min(errors["magnitude"], errors["wanda"]), errors


@pytest.mark.parametrize("sparsity", [0.1, 0.25, 0.5, 0.7, 0.95])
def test_sparsegpt_prunes_exactly_the_accounted_count_in_every_row(sparsity):
    weight, _, stats = make_layer(out_features=48, in_features=200, tokens=512, seed=1)
    expected = pruned_per_row(200, sparsity, SparsityPattern())
    for block_size in (128, 48):  # 200 is no multiple of either: a shorter last block
        pruned = sparsegpt(weight, sparsity, SparsityPattern(), stats, block_size=block_size)
        assert (pruned == 0).sum(1).tolist() == [expected] * 48


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_sparsegpt_n_m_keeps_exactly_n_in_every_group_of_m(layer, n, m):
    weight, _, stats = layer
    pruned = sparsegpt(weight, 1 - n / m, SparsityPattern(n, m), stats, block_size=60)  # rounded to a multiple of m
    kept_per_group = (pruned != 0).reshape(weight.shape[0], -1, m).sum(-1)
    assert (kept_per_group == n).all()


def test_sparsegpt_updates_the_kept_weights_and_zeros_the_pruned(layer):
    weight, _, stats = layer
    pruned = sparsegpt(weight, 0.5, SparsityPattern(), stats)
    kept = pruned != 0
    assert pruned.dtype == weight.dtype and pruned.shape == weight.shape
    assert not torch.equal(pruned[kept], weight[kept])  # error compensation moved the kept weights
    assert torch.isfinite(pruned).all()


def test_sparsegpt_prunes_dead_inputs_first_and_for_free():
    weight, _, stats = make_layer(out_features=32, in_features=128, tokens=512, dead_columns=20, seed=2)
    dead = stats.hessian.diagonal() == 0
    pruned = sparsegpt(weight, 10 / 128, SparsityPattern(), stats)  # fewer than the dead inputs
    assert (pruned == 0).sum(1).tolist() == [10] * 32
    assert (pruned[:, ~dead] == weight[:, ~dead]).all()  # pruning a dead input costs nothing, moves nothing
    pruned = sparsegpt(weight, 0.5, SparsityPattern(), stats)
    assert (pruned[:, dead] == 0).all() and (pruned == 0).sum(1).tolist() == [64] * 32


def test_sparsegpt_needs_the_hessian_and_leaves_zero_sparsity_alone(layer):
    weight, _, stats = layer
    assert torch.equal(sparsegpt(weight, 0.0, SparsityPattern(), LayerStatistics()), weight)
    with pytest.raises(ValueError, match="Hessian"):
        sparsegpt(weight, 0.5, SparsityPattern(), LayerStatistics(input_sq_norms=stats.input_sq_norms))


# --- GPTQ --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [128, -1])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_reconstructs_better_than_rtn(layer, bits, group_size, symmetric):
    weight, inputs, stats = layer
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    rtn_error = reconstruction_error(weight, quantize_rtn(weight, None, spec).dequantize(), inputs)
    for quantizer in (gptq, gptq_actorder):
        error = reconstruction_error(weight, quantizer(weight, None, spec, stats).dequantize(), inputs)
        assert error < 0.8 * rtn_error, (quantizer.__name__, error, rtn_error)


def test_gptq_actorder_wins_when_some_input_columns_are_outliers():
    weight, inputs, stats = make_layer(outlier_columns=8, seed=3)
    for spec in (QuantSpec(3, 128, False), QuantSpec(4, -1, True)):
        rtn_error = reconstruction_error(weight, quantize_rtn(weight, None, spec).dequantize(), inputs)
        plain = reconstruction_error(weight, gptq(weight, None, spec, stats).dequantize(), inputs)
        ordered = reconstruction_error(weight, gptq_actorder(weight, None, spec, stats).dequantize(), inputs)
        assert ordered <= plain < rtn_error


@pytest.mark.parametrize("quantizer", [gptq, gptq_actorder])
@pytest.mark.parametrize(
    ("in_features", "spec"),
    [
        (256, QuantSpec(4, 128, False)),
        (576, QuantSpec(3, 128, True)),  # a shorter last group of 64
        (200, QuantSpec(2, -1, False)),
        (100, QuantSpec(8, 128, False)),  # a group wider than the row
        (160, QuantSpec(4, 32, True)),  # groups narrower than a block
    ],
)
def test_gptq_stores_what_rtn_stores(quantizer, in_features, spec):
    weight, inputs, stats = make_layer(out_features=32, in_features=in_features, tokens=768, seed=4)
    quantized = quantizer(weight, None, spec, stats)
    reference = quantize_rtn(weight, None, spec)
    groups = group_count(in_features, spec.group_size)
    assert quantized.codes.dtype == torch.uint8 and quantized.codes.shape == weight.shape
    assert int(quantized.codes.max()) < 2**spec.bits
    assert quantized.scale.dtype == torch.float16 and quantized.scale.shape == (32, groups)
    assert quantized.zero.shape == (32, groups) and quantized.zero.dtype == reference.zero.dtype
    assert (quantized.group_size, quantized.bits, quantized.symmetric) == (
        reference.group_size,
        spec.bits,
        spec.symmetric,
    )
    assert torch.equal(quantized.zero, quantized.zero.round())
    assert (quantized.zero >= 0).all() and (quantized.zero < 2**spec.bits).all()
    if spec.symmetric:
        assert (quantized.zero == 2 ** (spec.bits - 1)).all()
    # dequantized values lie on the stored grid: encoding them again gives back the same codes
    dequantized = quantized.dequantize()
    size = reference.group_size if reference.group_size != -1 else in_features
    per_column = torch.arange(in_features) // size
    scale, zero = quantized.scale.float()[:, per_column], quantized.zero[:, per_column]
    assert torch.equal(encode(dequantized, scale, zero, spec.bits).to(torch.uint8), quantized.codes)
    assert reconstruction_error(weight, dequantized, inputs) < reconstruction_error(
        weight, reference.dequantize(), inputs
    )


def test_gptq_actorder_keeps_the_static_contiguous_groups_of_rtn(layer):
    weight, _, stats = layer
    spec = QuantSpec(4, 64, False)
    assert torch.equal(gptq_actorder(weight, None, spec, stats).scale, quantize_rtn(weight, None, spec).scale)


@pytest.mark.parametrize("quantizer", [gptq, gptq_actorder])
@pytest.mark.parametrize("pattern", [SparsityPattern(), SparsityPattern(2, 4)])
def test_gptq_honours_the_mask(layer, quantizer, pattern):
    weight, inputs, stats = layer
    pruned = wanda(weight, 0.5, pattern, stats)
    mask = pruned != 0
    spec = QuantSpec(4, 128, False)
    quantized = quantizer(pruned, mask, spec, stats)
    dequantized = quantized.dequantize()
    assert (dequantized[~mask] == 0).all()  # pruned weights are stored as exact zeros
    # pruned positions play no part: garbage there changes nothing, neither scales nor codes
    garbage = torch.where(mask, pruned, 1e4)
    again = quantizer(garbage, mask, spec, stats)
    assert torch.equal(again.codes, quantized.codes) and torch.equal(again.scale, quantized.scale)
    rtn = quantize_rtn(pruned, mask, spec).dequantize()
    assert reconstruction_error(weight, dequantized, inputs) < reconstruction_error(weight, rtn, inputs)


def test_gptq_needs_the_hessian(layer):
    weight, _, _ = layer
    with pytest.raises(ValueError, match="Hessian"):
        gptq(weight, None, QuantSpec(4, 128, False), LayerStatistics())


def test_a_rank_deficient_hessian_is_dampened_until_invertible():
    weight, inputs, _ = make_layer(out_features=16, in_features=128, tokens=32, seed=5)  # rank 32 of 128
    stats = statistics(inputs)
    assert torch.isfinite(sparsegpt(weight, 0.5, SparsityPattern(), stats, damping=0.0)).all()
    assert torch.isfinite(gptq(weight, None, QuantSpec(4, 128, False), stats).dequantize()).all()


# --- through compress_weight ------------------------------------------------------------------------------------


def test_usable_through_compress_weight(layer):
    weight, inputs, stats = layer
    pruning_plan = CompressionPlan(pruning="sparsegpt")
    quantization_plan = CompressionPlan(quantization="gptq")
    both = CompressionPlan(pruning="sparsegpt", quantization="gptq-actorder", pattern="2:4", symmetric=True)
    assert statistics_needed(CompressionPlan.uniform(0.5, 4, pruning="sparsegpt", quantization="gptq")) == {"hessian"}

    pruned = compress_weight(weight, LayerCompression(sparsity=0.5), pruning_plan, stats)
    assert torch.equal(pruned.weight, sparsegpt(weight, 0.5, SparsityPattern(), stats))
    assert (pruned.mask.sum(1) == 128).all() and pruned.quantized is None

    quantized = compress_weight(weight, LayerCompression(bits=4), quantization_plan, stats)
    assert torch.equal(quantized.weight, quantized.quantized.dequantize()) and quantized.mask is None

    compressed = compress_weight(weight, LayerCompression(sparsity=0.5, bits=4), both, stats)
    assert torch.equal(compressed.mask, sparsegpt(weight, 0.5, SparsityPattern(2, 4), stats) != 0)
    assert torch.equal(compressed.weight, compressed.quantized.dequantize() * compressed.mask)
    assert ((compressed.weight != 0).reshape(96, -1, 4).sum(-1) <= 2).all()
    rtn_plan = CompressionPlan(pruning="sparsegpt", quantization="rtn", pattern="2:4", symmetric=True)
    rtn = compress_weight(weight, LayerCompression(sparsity=0.5, bits=4), rtn_plan, stats)
    assert reconstruction_error(weight, compressed.weight, inputs) < reconstruction_error(weight, rtn.weight, inputs)
