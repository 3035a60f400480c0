"""Pruning and quantization methods, and how apply_plan puts their results into a model."""

from __future__ import annotations

import pytest
import torch

from autocompress.calibration import collect_statistics
from autocompress.compress import apply_plan, compress_weight, statistics_needed
from autocompress.errors import UserError
from autocompress.methods import PRUNERS, QUANTIZERS, LayerStatistics, QuantSpec, SparsityPattern
from autocompress.methods.pruning import magnitude, pruned_per_row, wanda
from autocompress.methods.quantization import quantize_rtn
from autocompress.models import CompressibleLinear, compressible_linears
from autocompress.plan import CompressionPlan, LayerCompression

UNSTRUCTURED = SparsityPattern()
NO_STATS = LayerStatistics()


def random_weight(out_features: int = 16, in_features: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def norms_stats(norms: torch.Tensor) -> LayerStatistics:
    return LayerStatistics(n_tokens=100, input_sq_norms=norms)


def uniform_norms(in_features: int) -> LayerStatistics:
    return norms_stats(torch.ones(in_features))


def prune(name: str, weight: torch.Tensor, sparsity: float, pattern: SparsityPattern = UNSTRUCTURED) -> torch.Tensor:
    stats = uniform_norms(weight.shape[1]) if name == "wanda" else NO_STATS
    return PRUNERS[name].function(weight, sparsity, pattern, stats)


def column_groups(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """[out, in] -> [out, groups, size]: consecutive inputs of each row, `size` at a time."""
    return tensor.reshape(tensor.shape[0], -1, size)


# --- how many weights a pruner removes --------------------------------------------------------------------------


def test_an_unstructured_pruner_removes_round_sparsity_times_inputs_per_row():
    assert pruned_per_row(100, 0.5, UNSTRUCTURED) == 50
    assert pruned_per_row(100, 0.333, UNSTRUCTURED) == 33
    assert pruned_per_row(576, 0.95, UNSTRUCTURED) == 547
    assert pruned_per_row(64, 0.0, UNSTRUCTURED) == 0


def test_an_n_m_pruner_removes_m_minus_n_of_every_m_inputs():
    assert pruned_per_row(64, 0.5, SparsityPattern(2, 4)) == 32
    assert pruned_per_row(64, 0.75, SparsityPattern(1, 4)) == 48
    assert pruned_per_row(64, 0.0, SparsityPattern(2, 4)) == 0


@pytest.mark.parametrize("name", ["magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.5, 0.77, 0.95])
def test_a_pruner_zeroes_exactly_out_times_round_sparsity_times_in_weights(name, sparsity):
    weight = random_weight(16, 50)
    pruned = prune(name, weight, sparsity)
    assert int((pruned == 0).sum()) == 16 * round(sparsity * 50)


@pytest.mark.parametrize("name", ["magnitude", "wanda"])
def test_a_pruner_leaves_the_kept_weights_unchanged_and_the_input_alone(name):
    weight = random_weight()
    original = weight.clone()
    pruned = prune(name, weight, 0.5)
    kept = pruned != 0
    assert torch.equal(pruned[kept], original[kept])
    assert torch.equal(weight, original)


@pytest.mark.parametrize("name", ["magnitude", "wanda"])
def test_zero_sparsity_returns_an_unchanged_copy(name):
    weight = random_weight()
    pruned = prune(name, weight, 0.0)
    assert torch.equal(pruned, weight)
    assert pruned.data_ptr() != weight.data_ptr()


# --- magnitude --------------------------------------------------------------------------------------------------


def test_magnitude_compares_weights_across_the_whole_layer():
    weight = torch.cat([torch.full((1, 8), 10.0), torch.full((1, 8), 0.1)]) + random_weight(2, 8) * 0.01
    pruned = magnitude(weight, 0.5, UNSTRUCTURED, NO_STATS)
    assert torch.count_nonzero(pruned[0]) == 8  # the large row survives whole
    assert torch.count_nonzero(pruned[1]) == 0  # the small row goes entirely


def test_magnitude_prunes_the_weights_of_smallest_absolute_value():
    weight = random_weight(8, 32)
    pruned = magnitude(weight, 0.25, UNSTRUCTURED, NO_STATS)
    largest_pruned = weight[pruned == 0].abs().max()
    smallest_kept = weight[pruned != 0].abs().min()
    assert largest_pruned < smallest_kept


# --- Wanda ------------------------------------------------------------------------------------------------------


def test_wanda_compares_weights_within_each_row():
    weight = torch.cat([torch.full((1, 8), 10.0), torch.full((1, 8), 0.1)]) + random_weight(2, 8) * 0.01
    pruned = wanda(weight, 0.5, UNSTRUCTURED, uniform_norms(8))
    assert torch.count_nonzero(pruned, dim=1).tolist() == [4, 4]


def test_wanda_prunes_the_same_count_in_every_row():
    pruned = wanda(random_weight(16, 50), 0.3, UNSTRUCTURED, uniform_norms(50))
    assert (pruned == 0).sum(dim=1).tolist() == [15] * 16


def test_wanda_keeps_a_small_weight_whose_input_has_a_huge_activation_norm():
    weight = random_weight(16, 32).abs() + 1.0  # every |w| in [1, ...)
    weight[:, 5] = 0.01  # the smallest weights of every row...
    norms = torch.ones(32)
    norms[5] = 1e8  # ...see an input with a huge norm (score |w|·‖x‖ = 0.01 · 1e4 = 100)
    pruned = wanda(weight, 0.5, UNSTRUCTURED, norms_stats(norms))
    assert (pruned[:, 5] != 0).all()
    assert (magnitude(weight, 0.5, UNSTRUCTURED, NO_STATS)[:, 5] == 0).all()  # magnitude alone drops them


def test_wanda_prunes_a_large_weight_whose_input_is_never_active():
    weight = random_weight(16, 32).abs() + 1.0
    weight[:, 7] = 100.0
    norms = torch.ones(32)
    norms[7] = 0.0
    pruned = wanda(weight, 0.25, UNSTRUCTURED, norms_stats(norms))
    assert (pruned[:, 7] == 0).all()


def test_wanda_scores_with_the_weight_times_the_root_of_the_summed_squares():
    norms = norms_stats(torch.tensor([16.0, 1.0]))  # input norms 4 and 1
    # scores 1·4 > 3·1: the larger weight goes (magnitude alone would drop the smaller one)
    assert wanda(torch.tensor([[1.0, 3.0]]), 0.5, UNSTRUCTURED, norms).tolist() == [[1.0, 0.0]]
    # scores 1·4 < 5·1: the smaller weight goes (scoring with the squared norm, 1·16 > 5·1, would not)
    assert wanda(torch.tensor([[1.0, 5.0]]), 0.5, UNSTRUCTURED, norms).tolist() == [[0.0, 5.0]]


def test_wanda_without_activation_norms_is_an_error():
    with pytest.raises(ValueError, match="activation norms"):
        wanda(random_weight(), 0.5, UNSTRUCTURED, NO_STATS)


# --- N:M --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["magnitude", "wanda"])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_n_m_pruning_keeps_exactly_n_weights_in_every_m_consecutive_inputs(name, n, m):
    pruned = prune(name, random_weight(16, 64), 1 - n / m, SparsityPattern(n, m))
    assert (column_groups(pruned, m) != 0).sum(-1).eq(n).all()


def test_n_m_magnitude_keeps_the_largest_weights_of_each_group():
    weight = random_weight(8, 32)
    pruned = magnitude(weight, 0.5, SparsityPattern(2, 4), NO_STATS)
    groups, kept = column_groups(weight.abs(), 4), column_groups(pruned != 0, 4)
    smallest_kept = torch.where(kept, groups, torch.inf).amin(-1)
    largest_pruned = torch.where(kept, -torch.inf, groups).amax(-1)
    assert (largest_pruned < smallest_kept).all()


@pytest.mark.parametrize("name", ["magnitude", "wanda"])
def test_n_m_pruning_needs_an_input_size_divisible_by_m(name):
    with pytest.raises(ValueError, match="divisible by M"):
        prune(name, random_weight(4, 30), 0.5, SparsityPattern(2, 4))


# --- RTN quantization -------------------------------------------------------------------------------------------


def grid_bounds(quantized) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-column scale, lowest and highest representable value of each weight's group."""
    codes = quantized.codes
    size = codes.shape[1] if quantized.group_size == -1 else quantized.group_size
    column_group = torch.arange(codes.shape[1]) // size
    scale = quantized.scale.float()[:, column_group]
    zero = quantized.zero.float()[:, column_group]
    return scale, (0 - zero) * scale, (2**quantized.bits - 1 - zero) * scale


def assert_rounds_to_nearest(weight, quantized):
    """Each weight inside its group's grid is within half a step of its value. One outside it (by rounding the
    zero-point, and the scale to float16) is within half a step plus the float16 error of the grid's far end."""
    scale, low, high = grid_bounds(quantized)
    error = (weight - quantized.dequantize()).abs()
    inside = (weight >= low) & (weight <= high)
    tolerance = 1e-6 * scale
    assert (error[inside] <= (scale / 2 + tolerance)[inside]).all()
    float16_drift = (2**quantized.bits - 1) * 2**-11 * scale
    assert (error <= scale / 2 + float16_drift + tolerance).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_codes_are_unsigned_integers_below_two_to_the_bits(bits, symmetric):
    quantized = quantize_rtn(random_weight(16, 96), None, QuantSpec(bits, 32, symmetric))
    assert quantized.codes.dtype == torch.uint8
    assert quantized.codes.shape == (16, 96)
    assert int(quantized.codes.min()) >= 0
    assert int(quantized.codes.max()) <= 2**bits - 1
    assert quantized.bits == bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_rtn_is_within_half_a_step_per_group(bits):
    weight = random_weight(16, 128)
    quantized = quantize_rtn(weight, None, QuantSpec(bits, 32, symmetric=False))
    assert quantized.scale.shape == (16, 4)
    assert_rounds_to_nearest(weight, quantized)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_rtn_is_within_half_a_step_of_every_weight(bits):
    weight = random_weight(16, 128)
    quantized = quantize_rtn(weight, None, QuantSpec(bits, 32, symmetric=True))
    scale, _, _ = grid_bounds(quantized)
    error = (weight - quantized.dequantize()).abs()
    assert (error <= scale / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_a_symmetric_grid_has_its_zero_point_fixed_at_half_the_range(bits):
    quantized = quantize_rtn(random_weight(), None, QuantSpec(bits, 32, symmetric=True))
    assert (quantized.zero == 2 ** (bits - 1)).all()


def test_an_asymmetric_grid_spans_its_group_from_minimum_to_maximum():
    weight = random_weight(16, 128)
    quantized = quantize_rtn(weight, None, QuantSpec(4, 32, symmetric=False))
    groups = column_groups(weight, 32)
    expected = (groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)) / 15  # the range always holds 0
    assert torch.allclose(quantized.scale.float(), expected, rtol=1e-3)


@pytest.mark.parametrize("symmetric", [False, True])
def test_group_size_minus_one_fits_one_grid_per_row(symmetric):
    weight = random_weight(16, 100)
    quantized = quantize_rtn(weight, None, QuantSpec(4, -1, symmetric))
    assert quantized.scale.shape == (16, 1)
    assert quantized.zero.shape == (16, 1)
    assert quantized.group_size == -1
    assert_rounds_to_nearest(weight, quantized)


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_group_size_that_does_not_divide_the_row_leaves_a_shorter_last_group(symmetric):
    weight = random_weight(16, 100)
    weight[:, 96:] *= 1e-3  # the last, 4-column group holds only tiny values
    quantized = quantize_rtn(weight, None, QuantSpec(4, 32, symmetric))
    assert quantized.scale.shape == (16, 4)  # 32 + 32 + 32 + 4
    assert (quantized.scale[:, 3] < quantized.scale[:, :3].amin(-1) / 100).all()  # fitted to its own values
    assert_rounds_to_nearest(weight, quantized)


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_576_wide_row_in_groups_of_128_has_five_groups(symmetric):
    weight = random_weight(4, 576)
    quantized = quantize_rtn(weight, None, QuantSpec(4, 128, symmetric))
    assert quantized.scale.shape == (4, 5)
    assert_rounds_to_nearest(weight, quantized)


def test_a_group_larger_than_the_row_is_one_group():
    weight = random_weight(8, 40)
    quantized = quantize_rtn(weight, None, QuantSpec(4, 128, symmetric=False))
    assert quantized.scale.shape == (8, 1)
    assert_rounds_to_nearest(weight, quantized)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_an_asymmetric_grid_fits_a_group_whose_weights_all_share_a_sign(sign):
    weight = sign * (random_weight(8, 64).abs() + 1.0)  # every value in [1, ...), or (..., -1]
    quantized = quantize_rtn(weight, None, QuantSpec(4, 32, symmetric=False))
    assert_rounds_to_nearest(weight, quantized)


def test_the_grid_is_fitted_to_the_kept_weights_only():
    weight = random_weight(4, 32)
    weight[:, 0] = 1000.0  # a pruned outlier
    mask = torch.ones_like(weight, dtype=torch.bool)
    mask[:, 0] = False
    with_mask = quantize_rtn(weight, mask, QuantSpec(4, -1, symmetric=False))
    kept = weight[:, 1:]
    expected = (kept.amax(-1) - kept.amin(-1).clamp(max=0)) / 15
    assert torch.allclose(with_mask.scale.float().squeeze(-1), expected, rtol=1e-3)
    error = (weight - with_mask.dequantize()).abs()[:, 1:]
    assert (error <= with_mask.scale.float() * (0.5 + 15 * 2**-11)).all()  # the kept weights round to nearest


def test_scales_are_stored_in_float16_and_dequantize_uses_them():
    quantized = quantize_rtn(random_weight(8, 64), None, QuantSpec(4, 32, symmetric=False))
    assert quantized.scale.dtype == torch.float16
    scale, _, _ = grid_bounds(quantized)
    zero = quantized.zero.float().repeat_interleave(32, dim=1)
    assert torch.equal(quantized.dequantize(), (quantized.codes.float() - zero) * scale)


# --- calibration statistics -------------------------------------------------------------------------------------


def test_pruning_with_wanda_needs_activation_norms_and_rtn_needs_nothing():
    assert PRUNERS["wanda"].needs == {"input_sq_norms"}
    assert PRUNERS["magnitude"].needs == set()
    assert QUANTIZERS["rtn"].needs == set()
    assert statistics_needed(CompressionPlan.uniform(sparsity=0.5, pruning="wanda")) == {"input_sq_norms"}
    assert statistics_needed(CompressionPlan.uniform(bits=4, pruning="wanda")) == set()
    assert statistics_needed(CompressionPlan.uniform()) == set()


def test_calibration_sums_the_squared_inputs_of_every_linear(tiny_model):
    tokens = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    linears = compressible_linears(tiny_model)
    seen = []
    probe = linears[-1].module.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].reshape(-1, 128)))
    try:
        statistics = collect_statistics(tiny_model, linears, tokens, {"input_sq_norms"}, batch_size=2)
    finally:
        probe.remove()
    down = statistics["model.layers.1.mlp.down_proj"]
    assert down.n_tokens == 30
    assert torch.allclose(down.input_sq_norms, torch.cat(seen).square().sum(0), rtol=1e-5)
    q, k = statistics["model.layers.0.self_attn.q_proj"], statistics["model.layers.0.self_attn.k_proj"]
    assert torch.equal(q.input_sq_norms, k.input_sq_norms)  # the same input
    assert q.hessian is None


def test_linears_fed_the_same_input_share_one_hessian_equal_to_their_own(tiny_model):
    tokens = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(1))
    linears = compressible_linears(tiny_model)
    inputs = {}
    probes = [
        linear.module.register_forward_hook(
            lambda _m, given, _o, name=linear.name: inputs.setdefault(name, []).append(
                given[0].reshape(-1, given[0].shape[-1])
            )
        )
        for linear in linears
        if linear.name.startswith("model.layers.0.") and not linear.name.endswith("down_proj")
    ]
    try:
        statistics = collect_statistics(tiny_model, linears, tokens, {"hessian"}, batch_size=2)
    finally:
        for probe in probes:
            probe.remove()
    attention, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert statistics[attention + "q_proj"] is statistics[attention + "k_proj"] is statistics[attention + "v_proj"]
    assert statistics[mlp + "gate_proj"] is statistics[mlp + "up_proj"]
    assert statistics[attention + "o_proj"] is not statistics[attention + "q_proj"]
    assert len({id(stats) for stats in statistics.values()}) == 2 * 4  # per block: attention, o, mlp, down inputs
    for name in (attention + "v_proj", attention + "o_proj", mlp + "up_proj"):
        x = torch.cat(inputs[name]).float()
        assert torch.allclose(statistics[name].hessian, x.T @ x, rtol=1e-5, atol=1e-4), name


def test_calibrating_the_first_block_alone_gives_its_sums_of_a_full_pass_and_runs_no_block_after_it(tiny_model):
    tokens = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(1))
    linears = compressible_linears(tiny_model)
    everything = collect_statistics(tiny_model, linears, tokens, {"hessian"}, batch_size=2)
    later_blocks_run = []
    probe = tiny_model.model.layers[1].register_forward_pre_hook(lambda *_: later_blocks_run.append(1))
    try:
        first_block = [linear for linear in linears if linear.block == "model.layers.0"]
        alone = collect_statistics(tiny_model, first_block, tokens, {"hessian"}, batch_size=2)
    finally:
        probe.remove()
    assert set(alone) == {linear.name for linear in first_block}
    for name, stats in alone.items():
        assert torch.equal(stats.hessian, everything[name].hessian), name
        assert stats.n_tokens == everything[name].n_tokens == 30
    assert not later_blocks_run


def test_calibrating_the_output_head_sums_its_inputs_without_running_its_matmul(tiny_model):
    tokens = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(2))
    head = tiny_model.get_output_embeddings()
    linears = [*compressible_linears(tiny_model), CompressibleLinear("lm_head", "", head)]
    seen, head_outputs = [], []
    probe = tiny_model.model.norm.register_forward_hook(lambda _m, _i, output: seen.append(output.reshape(-1, 64)))
    head_probe = head.register_forward_hook(lambda *_: head_outputs.append(1))
    try:
        statistics = collect_statistics(tiny_model, linears, tokens, {"input_sq_norms"}, batch_size=2)
    finally:
        probe.remove()
        head_probe.remove()
    assert statistics["lm_head"].n_tokens == 30
    assert torch.allclose(statistics["lm_head"].input_sq_norms, torch.cat(seen).square().sum(0), rtol=1e-5)
    assert not head_outputs


def test_calibration_collects_nothing_when_no_method_asks(tiny_model):
    tokens = torch.randint(0, 256, (2, 8))
    statistics = collect_statistics(tiny_model, compressible_linears(tiny_model), tokens, set())
    assert len(statistics) == 14
    assert all(stats.n_tokens == 0 and stats.input_sq_norms is None for stats in statistics.values())


# --- compress_weight and apply_plan -----------------------------------------------------------------------------


def test_pruned_weights_stay_zero_after_quantization():
    weight = random_weight(16, 64) + 5.0  # far from zero: a grid point at 0 is not where the kept weights lie
    plan = CompressionPlan.uniform(sparsity=0.5, bits=3, pruning="magnitude", group_size=16)
    compressed = compress_weight(weight, plan.default, plan, NO_STATS)
    assert compressed.mask is not None
    assert int((~compressed.mask).sum()) == 16 * 32
    assert (compressed.weight[~compressed.mask] == 0).all()
    assert (compressed.weight[compressed.mask] != 0).all()


@pytest.fixture
def calibrated(tiny_model):
    tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    linears = compressible_linears(tiny_model)
    return tiny_model, collect_statistics(tiny_model, linears, tokens, {"input_sq_norms"})


@pytest.mark.parametrize("symmetric", [False, True])
def test_apply_plan_writes_exactly_what_the_stored_codes_dequantize_to(calibrated, symmetric):
    model, statistics = calibrated
    plan = CompressionPlan.uniform(bits=4, group_size=32, symmetric=symmetric)
    kept = apply_plan(model, plan, statistics, keep=True)
    assert len(kept) == 14
    for linear in compressible_linears(model):
        assert torch.equal(linear.module.weight, kept[linear.name].quantized.dequantize())


def test_apply_plan_writes_the_masked_dequantized_codes_of_a_pruned_and_quantized_layer(calibrated):
    model, statistics = calibrated
    plan = CompressionPlan.uniform(sparsity=0.5, bits=4, group_size=32)
    kept = apply_plan(model, plan, statistics, keep=True)
    for linear in compressible_linears(model):
        stored = kept[linear.name]
        in_features = linear.module.in_features
        assert (~stored.mask).sum(1).eq(in_features // 2).all()
        assert torch.equal(linear.module.weight, stored.quantized.dequantize() * stored.mask)


def test_apply_plan_compresses_each_block_as_the_plan_says(calibrated):
    model, statistics = calibrated
    dense = {linear.name: linear.module.weight.clone() for linear in compressible_linears(model)}
    plan = CompressionPlan(layers={"model.layers.1": LayerCompression(sparsity=0.25)})
    kept = apply_plan(model, plan, statistics, keep=True)
    assert sorted(kept) == sorted(name for name in dense if name.startswith("model.layers.1."))
    for linear in compressible_linears(model):
        weight = linear.module.weight
        if linear.block == "model.layers.0":
            assert torch.equal(weight, dense[linear.name])
        else:
            assert int((weight == 0).sum()) == weight.shape[0] * round(0.25 * weight.shape[1])
            assert kept[linear.name].quantized is None


def test_apply_plan_at_linear_granularity_touches_only_the_named_linears(calibrated):
    model, statistics = calibrated
    name = "model.layers.0.mlp.down_proj"
    before = {linear.name: linear.module.weight.clone() for linear in compressible_linears(model)}
    plan = CompressionPlan(granularity="linear", layers={name: LayerCompression(bits=2)})
    apply_plan(model, plan, statistics)
    changed = [
        linear.name
        for linear in compressible_linears(model)
        if not torch.equal(linear.module.weight, before[linear.name])
    ]
    assert changed == [name]


def test_apply_plan_leaves_embeddings_norms_and_lm_head_alone(calibrated):
    model, statistics = calibrated
    compressible = {id(linear.module.weight) for linear in compressible_linears(model)}
    others = {name: p.clone() for name, p in model.named_parameters() if id(p) not in compressible}
    apply_plan(model, CompressionPlan.uniform(sparsity=0.5, bits=2), statistics)
    for name, parameter in model.named_parameters():
        if name in others:
            assert torch.equal(parameter, others[name]), name


def test_an_identity_plan_changes_nothing_and_keeps_nothing(calibrated):
    model, statistics = calibrated
    before = {name: p.clone() for name, p in model.state_dict().items()}
    assert apply_plan(model, CompressionPlan.uniform(), statistics, keep=True) == {}
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())


def test_apply_plan_rejects_a_plan_naming_a_block_the_model_does_not_have(calibrated):
    model, statistics = calibrated
    plan = CompressionPlan(layers={"model.layers.7": LayerCompression(bits=4)})
    with pytest.raises(UserError, match=r"model\.layers\.7"):
        apply_plan(model, plan, statistics)


def test_apply_plan_reports_wanda_without_statistics_as_a_user_error(tiny_model):
    with pytest.raises(UserError, match=r"cannot compress model\.layers\.0\.self_attn\.q_proj.*activation norms"):
        apply_plan(tiny_model, CompressionPlan.uniform(sparsity=0.5, pruning="wanda"), {})
