"""Floating-point and lookup-table formats (FP8 E4M3/E5M2, MXFP4, NVFP4, NF4), as specifications."""

from __future__ import annotations

import math

import pytest
import torch

from autocompress.compress import apply_plan, compress_weight
from autocompress.errors import UserError
from autocompress.methods import QUANTIZERS, LayerStatistics, QuantizedWeight, QuantSpec
from autocompress.methods.formats import (
    ELEMENTS,
    FORMATS,
    NF4_LEVELS,
    PER_ROW,
    PER_TENSOR,
    FormatStorage,
    bits_per_weight,
    decode,
    e8m0_scale,
    encode,
    encode_by_table,
    format_storage,
    layout,
    levels_tensor,
    nvfp4_scales,
    round_to,
    scale_codes,
    scales_from_codes,
)
from autocompress.plan import CompressionPlan, LayerCompression

NO_STATS = LayerStatistics()
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
TORCH_FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def finite_values(element: str) -> torch.Tensor:
    """Every finite representable value of an element (both zeros collapse to 0), ascending."""
    levels = levels_tensor(element)
    return torch.unique(levels[torch.isfinite(levels)])


def quantize(name: str, weight: torch.Tensor, group_size: int = PER_ROW, mask=None) -> QuantizedWeight:
    spec = QuantSpec(bits=FORMATS[name].bits, group_size=group_size, symmetric=False)
    return QUANTIZERS[name].function(weight, mask, spec, NO_STATS)


def random_weight(out_features: int = 8, in_features: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


# --- the elements: tables ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("element", ["e4m3", "e5m2"])
def test_fp8_tables_are_the_bit_patterns_torch_reads(element):
    ours = levels_tensor(element)
    theirs = torch.arange(256, dtype=torch.uint8).view(TORCH_FP8[element]).float()
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
    assert torch.equal(ours[~torch.isnan(ours)], theirs[~torch.isnan(theirs)])


def test_fp8_special_values_and_ranges():
    e4m3, e5m2 = levels_tensor("e4m3"), levels_tensor("e5m2")
    assert torch.isnan(e4m3[[0x7F, 0xFF]]).all() and int(torch.isnan(e4m3).sum()) == 2  # E4M3FN: only S.1111.111
    assert not torch.isinf(e4m3).any()
    assert ELEMENTS["e4m3"].max == 448 and ELEMENTS["e4m3"].min_positive == 2.0**-9
    assert e5m2[0x7C] == math.inf and e5m2[0xFC] == -math.inf and int(torch.isnan(e5m2).sum()) == 6
    assert ELEMENTS["e5m2"].max == 57344 and ELEMENTS["e5m2"].min_positive == 2.0**-16
    assert e4m3[0x01] == 2.0**-9 and e4m3[0x08] == 2.0**-6  # the smallest subnormal and normal
    assert e5m2[0x01] == 2.0**-16 and e5m2[0x04] == 2.0**-14


def test_fp4_and_nf4_tables():
    assert levels_tensor("e2m1").tolist() == [*E2M1, *(-value for value in E2M1)]
    nf4 = levels_tensor("nf4")
    assert len(NF4_LEVELS) == 16 and torch.equal(nf4, torch.sort(nf4).values)  # code order is sorted order
    assert nf4[0] == -1 and nf4[7] == 0 and nf4[15] == 1
    assert nf4[8].item() == pytest.approx(0.07958029955625534) and nf4[1].item() == pytest.approx(-0.6961928)


# --- the elements: rounding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("element", ["e4m3", "e5m2", "e2m1", "nf4"])
def test_every_representable_value_round_trips_at_unit_scale(element):
    levels = levels_tensor(element)
    codes = torch.arange(len(levels))
    finite = torch.isfinite(levels) & ~((levels == 0) & (codes != codes[levels == 0][0]))  # one zero code
    assert torch.equal(encode(levels[finite], element), codes[finite].to(torch.uint8))
    assert torch.equal(round_to(levels[finite], element), levels[finite])


@pytest.mark.parametrize("element", ["e4m3", "e5m2", "e2m1", "nf4"])
def test_values_between_two_representable_values_round_to_the_nearer(element):
    values = finite_values(element).double()
    low, high = values[:-1], values[1:]
    for fraction, expected in ((0.25, low), (0.49, low), (0.51, high), (0.75, high)):
        assert torch.equal(round_to(low + fraction * (high - low), element).double(), expected), fraction


@pytest.mark.parametrize("element", ["e4m3", "e5m2"])
def test_fp8_rounding_matches_torch_casts_on_midpoints_and_random_values(element):
    values = finite_values(element).double()
    midpoints = ((values[1:] + values[:-1]) / 2).float()
    scales = torch.exp2(torch.randint(-24, 20, (20000,), generator=torch.Generator().manual_seed(1)).float())
    x = torch.cat([midpoints, torch.randn(20000, generator=torch.Generator().manual_seed(2)) * scales])
    bound = ELEMENTS[element].max
    assert torch.equal(round_to(x, element), x.clamp(-bound, bound).to(TORCH_FP8[element]).float())


@pytest.mark.parametrize("element", ["e4m3", "e5m2", "e2m1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_minifloat_arithmetic_matches_the_table_search(element, dtype):
    values = finite_values(element).double()
    midpoints = (values[1:] + values[:-1]) / 2
    scales = torch.exp2(torch.randint(-30, 30, (20000,), generator=torch.Generator().manual_seed(4)).double())
    noise = torch.randn(20000, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * scales
    extremes = torch.tensor([math.inf, -math.inf, 1e38, -1e38, 1e-45, -0.0], dtype=torch.float64)
    x = torch.cat([values, -values, midpoints, -midpoints, noise, extremes]).to(dtype)
    assert torch.equal(encode(x, element), encode_by_table(x, element))


def test_e2m1_ties_round_half_to_even():
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    assert round_to(torch.tensor(ties), "e2m1").tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert round_to(-torch.tensor(ties), "e2m1").tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]


def test_fp8_ties_round_half_to_even_in_normals_subnormals_and_across_binades():
    e4m3 = [1 + 1 / 16, 1 + 3 / 16, 2.0**-10, 3 * 2.0**-10, 15.5 * 2.0**-4, 2.0**-6 - 2.0**-10, 432.0]
    assert round_to(torch.tensor(e4m3), "e4m3").tolist() == [1.0, 1.25, 0.0, 2.0**-8, 1.0, 2.0**-6, 448.0]
    e5m2 = [1 + 1 / 8, 1 + 3 / 8, 2.0**-17, 3 * 2.0**-17, 53248.0]
    assert round_to(torch.tensor(e5m2), "e5m2").tolist() == [1.0, 1.5, 0.0, 2.0**-15, 49152.0]


def test_nf4_ties_go_to_the_level_of_smaller_magnitude():
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float64)
    midpoints = (levels[1:] + levels[:-1]) / 2
    expected = torch.where(levels[1:].abs() < levels[:-1].abs(), levels[1:], levels[:-1])
    assert torch.equal(round_to(midpoints, "nf4").double(), expected.float().double())
    assert round_to(torch.tensor([NF4_LEVELS[6] / 2, NF4_LEVELS[8] / 2], dtype=torch.float64), "nf4").tolist() == [0, 0]


@pytest.mark.parametrize(
    ("element", "beyond", "bound"),
    [
        ("e4m3", [449.0, 464.0, 480.0, 1e6, math.inf], 448.0),
        ("e5m2", [57345.0, 61440.0, 1e9, math.inf], 57344.0),  # 61440 would round to inf in IEEE style
        ("e2m1", [6.5, 7.0, 100.0, math.inf], 6.0),
        ("nf4", [1.01, 2.0, math.inf], 1.0),
    ],
)
def test_values_beyond_the_largest_saturate(element, beyond, bound):
    values = torch.tensor(beyond)
    assert round_to(values, element).tolist() == [bound] * len(beyond)
    low = -1.0 if element == "nf4" else -bound
    assert round_to(-values, element).tolist() == [low] * len(beyond)


@pytest.mark.parametrize("element", ["e4m3", "e5m2", "e2m1", "nf4"])
def test_nan_is_refused_and_zero_has_one_code(element):
    with pytest.raises(ValueError, match="NaN"):
        encode(torch.tensor([1.0, math.nan]), element)
    zero = encode(torch.tensor([0.0, -0.0, -1e-30]), element)
    assert len(set(zero.tolist())) == 1 and decode(zero, element).tolist() == [0.0] * 3


# --- block scales -----------------------------------------------------------------------------------------------


def test_mxfp4_scale_is_two_to_the_floor_log2_amax_minus_two():
    amax = torch.tensor([5.0, 13.0, 4.0, 7.99, 8.0, 0.75, 6.0, 0.0, 1e-40])
    expected = [1.0, 2.0, 1.0, 1.0, 2.0, 2.0**-3, 1.0, 1.0, 2.0**-127]
    assert e8m0_scale(amax).tolist() == expected


def test_mxfp4_blocks_are_32_wide_and_saturate_above_six_times_the_scale():
    block = torch.zeros(1, 64)
    block[0, :4] = torch.tensor([5.0, -1.3, 0.25, 0.76])  # amax 5: scale 1
    block[0, 32:36] = torch.tensor([13.0, -13.0, 2.9, 5.0])  # amax 13: scale 2; 13/2 = 6.5 saturates to 6
    quantized = quantize("mxfp4", block, group_size=128)  # the format fixes its block size
    assert quantized.group_size == 32 and quantized.scale.tolist() == [[1.0, 2.0]]
    assert quantized.scale_format == "e8m0" and quantized.tensor_scale is None
    weight = quantized.dequantize()
    assert weight[0, :4].tolist() == [4.0, -1.5, 0.0, 1.0]  # 5 ties 4|6 -> 4 (even); 0.25 ties 0|0.5 -> 0
    assert weight[0, 32:36].tolist() == [12.0, -12.0, 3.0, 4.0]  # 2.9/2 -> 1.5; 5/2 = 2.5 ties 2|3 -> 2


def test_nvfp4_scales_for_a_hand_computed_example():
    # tensor amax 10: tensor scale 10 / 2688; a block of amax 1: 1 / (6 · 10/2688) = 44.8 -> E4M3 44 (step 4)
    blocks, tensor_scale = nvfp4_scales(torch.tensor([1.0, 10.0, 0.0]), 10.0)
    assert tensor_scale == float(torch.tensor(10.0) / 2688)
    assert blocks.tolist() == [44.0, 448.0, 1.0]
    blocks, tensor_scale = nvfp4_scales(torch.tensor([1.8, 6.0, 2688.0]), 2688.0)  # tensor scale 1
    assert tensor_scale == 1.0 and blocks.tolist() == [0.3125, 1.0, 448.0]  # 0.3 -> E4M3 0.3125
    weight = torch.zeros(1, 32)
    weight[0, 0], weight[0, 16:18] = 10.0, torch.tensor([1.0, 0.5])
    quantized = quantize("nvfp4", weight)
    assert quantized.group_size == 16 and quantized.scale.tolist() == [[448.0, 44.0]]
    assert quantized.scale_format == "e4m3" and quantized.tensor_scale == float(torch.tensor(10.0) / 2688)
    scale = torch.tensor(44.0) * torch.tensor(quantized.tensor_scale)
    assert quantized.dequantize()[0, 16] == 6 * 44 * torch.tensor(quantized.tensor_scale)  # 1 / scale = 6.1 -> 6
    assert float(0.5 / scale) == pytest.approx(3.05, abs=0.01)
    assert quantized.dequantize()[0, 17] == 3 * 44 * torch.tensor(quantized.tensor_scale)


def test_nf4_scale_is_the_block_absmax_in_float16():
    weight = torch.tensor([[0.5, -2.0, 1.0, 0.0], [0.1, 0.2, 0.3, -0.3]])
    quantized = quantize("nf4", weight, group_size=2)
    assert quantized.scale.dtype == torch.float16 and quantized.group_size == 2
    assert torch.equal(quantized.scale, torch.tensor([[2.0, 1.0], [0.2, 0.3]]).half())
    # 0.5 / 2 = 0.25 -> 0.2461 (code 10); -2 / 2 = -1 (code 0); 1 / 1 -> 1 (code 15); 0 -> code 7
    assert quantized.codes[0].tolist() == [10, 0, 15, 7]
    assert quantized.dequantize()[0].tolist() == [pytest.approx(2 * 0.24611230194568634), -2.0, 1.0, 0.0]


@pytest.mark.parametrize("name", ["fp8-e4m3", "fp8-e5m2"])
def test_fp8_scales_per_row_per_group_and_per_tensor(name):
    bound = ELEMENTS[FORMATS[name].element.name].max
    weight = torch.tensor([[2.0 * bound, 1.0, -bound / 8, bound / 16], [0.0, 0.0, bound / 4, 0.0]])
    per_row = quantize(name, weight, PER_ROW)
    assert per_row.scale.dtype == torch.float16 and per_row.scale.float().flatten().tolist() == [2.0, 0.25]
    per_group = quantize(name, weight, 2)  # an all-zero group gets scale 1
    assert per_group.group_size == 2 and per_group.scale.float().tolist() == [[2.0, 0.125], [1.0, 0.25]]
    odd = quantize(name, torch.tensor([[0.3 * bound, 0.1]]), PER_ROW)  # 0.3 is not a float16: rounded to nearest
    assert odd.scale.item() == torch.tensor(0.3).half().item()
    per_tensor = quantize(name, weight, PER_TENSOR)
    assert per_tensor.scale_format == "none" and per_tensor.tensor_scale == 2.0 and per_tensor.group_size == PER_ROW
    assert torch.equal(per_tensor.scale, torch.ones(2, 1))
    for quantized in (per_row, per_group, per_tensor):
        assert torch.equal(quantized.dequantize(), weight)  # every value here is representable at its scale


# --- every representable value through a block whose scale we control ------------------------------------------


@pytest.mark.parametrize("name", ["fp8-e4m3", "fp8-e5m2"])
@pytest.mark.parametrize("group_size", [PER_ROW, PER_TENSOR])
def test_fp8_round_trips_every_value_through_scaled_rows(name, group_size):
    values = finite_values(FORMATS[name].element.name)
    row = torch.cat([values, values.flip(0)])  # amax = max: scale 1
    weight = torch.stack([row, row * 2.0**-3 if group_size == PER_ROW else -row])
    quantized = quantize(name, weight, group_size)
    assert torch.equal(quantized.dequantize(), weight)
    assert torch.equal(quantize(name, quantized.dequantize(), group_size).codes, quantized.codes)


def test_mxfp4_round_trips_every_value_through_blocks_of_each_scale():
    values = finite_values("e2m1")  # 15 values, amax 6: scale 2^k for the block times 2^k
    block = torch.cat([values, values, torch.zeros(2)])
    weight = torch.stack([torch.cat([block * 2.0**k, block * 2.0 ** (k + 1)]) for k in range(-20, 20, 2)])
    quantized = quantize("mxfp4", weight)
    assert torch.equal(quantized.dequantize(), weight)
    assert quantized.scale[:, 0].tolist() == [2.0**k for k in range(-20, 20, 2)]


def test_nvfp4_round_trips_every_value_through_blocks_of_every_e4m3_scale():
    values = finite_values("e2m1")
    scales = finite_values("e4m3")
    scales = scales[scales > 0]  # 126 block scales, the largest 448 makes the tensor amax 2688: tensor scale 1
    weight = (torch.cat([values, torch.zeros(1)]).repeat(len(scales), 1) * scales[:, None]).reshape(-1, 32)
    quantized = quantize("nvfp4", weight)
    assert quantized.tensor_scale == 1.0
    assert torch.equal(quantized.scale.flatten(), scales)
    assert torch.equal(quantized.dequantize(), weight)


def test_nf4_round_trips_every_level_through_blocks_whose_absmax_we_choose():
    levels = torch.tensor(NF4_LEVELS)
    weight = torch.stack([levels * scale for scale in (1.0, 0.5, 2.0**-8, 0.3, 7.0)])  # absmax: the scale
    quantized = quantize("nf4", weight, group_size=16)
    assert torch.equal(quantized.codes, torch.arange(16, dtype=torch.uint8).repeat(5, 1))
    assert torch.equal(quantized.dequantize()[:3], weight[:3])  # power-of-two absmax: exact
    assert torch.equal(quantize("nf4", quantized.dequantize(), group_size=16).codes, quantized.codes)


# --- masks, bits, bad weights, the registry and compress_weight -------------------------------------------------


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_pruned_weights_do_not_count_for_scales_and_take_the_zero_code(name):
    weight = random_weight()
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(3)) > 0.5
    spikes = torch.where(torch.arange(weight.numel()).reshape(weight.shape) % 2 == 0, 1e4, math.nan)
    spiked = torch.where(mask, weight, spikes)  # huge or even NaN where pruned: ignored
    quantized, reference = quantize(name, spiked, 32, mask), quantize(name, torch.where(mask, weight, 0.0), 32)
    assert torch.equal(quantized.scale, reference.scale) and torch.equal(quantized.codes, reference.codes)
    assert torch.all(quantized.dequantize()[~mask] == 0)


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_kept_weights_are_refused(name, bad):
    weight = random_weight()
    weight[2, 5] = bad
    with pytest.raises(ValueError, match="finite"):
        quantize(name, weight)


@pytest.mark.parametrize(("name", "bits"), [("mxfp4", 8), ("nvfp4", 3), ("nf4", 8), ("fp8-e4m3", 4), ("fp8-e5m2", 4)])
def test_a_plan_bit_width_other_than_the_formats_is_refused(name, bits):
    with pytest.raises(ValueError, match=rf"{name} stores {FORMATS[name].bits}-bit values.*asks for {bits} bits"):
        QUANTIZERS[name].function(random_weight(), None, QuantSpec(bits, -1, False), NO_STATS)


def test_group_sizes_a_format_cannot_take_are_refused():
    with pytest.raises(ValueError, match="group_size"):
        quantize("nf4", random_weight(), PER_TENSOR)
    with pytest.raises(ValueError, match="group_size"):
        quantize("fp8-e4m3", random_weight(), -5)


def test_formats_are_registered_quantizers_needing_no_statistics():
    for name in ("fp8-e4m3", "fp8-e5m2", "mxfp4", "nvfp4", "nf4"):
        assert QUANTIZERS[name].needs == set()
        assert CompressionPlan.uniform(bits=FORMATS[name].bits, quantization=name).quantization == name


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_quantized_weights_state_their_format_and_codes_index_the_levels(name):
    quantized = quantize(name, random_weight(), 32)
    assert quantized.format == name and quantized.bits == FORMATS[name].bits and quantized.codes.dtype == torch.uint8
    assert len(quantized.levels) == 2**quantized.bits and torch.all(quantized.zero == 0)
    values = quantized.levels[quantized.codes.long()]
    assert torch.isfinite(values).all()
    per_column = torch.arange(96) // (96 if quantized.group_size == PER_ROW else quantized.group_size)
    expected = values * quantized.scale.float()[:, per_column] * (quantized.tensor_scale or 1.0)
    assert torch.equal(quantized.dequantize(), expected)


def test_compress_weight_with_an_nf4_plan_prunes_quantizes_and_re_masks():
    weight = random_weight(16, 128)
    plan = CompressionPlan.uniform(sparsity=0.5, bits=4, pruning="magnitude", quantization="nf4", group_size=64)
    compressed = compress_weight(weight, plan.default, plan, NO_STATS)
    quantized = compressed.quantized
    assert quantized.format == "nf4" and quantized.scale.shape == (16, 2)
    assert torch.equal(compressed.weight, quantized.dequantize() * compressed.mask)
    assert int((compressed.weight == 0).sum()) >= 16 * 64
    kept = compressed.mask
    assert torch.all(quantized.codes[~kept] == 7)  # the code of 0
    assert (compressed.weight - weight)[kept].abs().max() < 0.2 * weight.abs().max()


def test_compress_weight_refuses_a_format_at_the_wrong_bit_width():
    plan = CompressionPlan.uniform(bits=8, quantization="mxfp4")
    with pytest.raises(ValueError, match="mxfp4 stores 4-bit values, but the plan asks for 8 bits"):
        compress_weight(random_weight(), plan.default, plan, NO_STATS)


def test_apply_plan_runs_formats_per_layer_and_reports_a_mismatch_as_a_user_error(tiny_model):
    plan = CompressionPlan.uniform(bits=4, quantization="nvfp4", granularity="linear")
    kept = apply_plan(tiny_model, plan, {}, keep=True)
    assert kept and all(linear.quantized.format == "nvfp4" for linear in kept.values())
    bad = CompressionPlan(default=LayerCompression(bits=4), quantization="fp8-e4m3")
    with pytest.raises(UserError, match="fp8-e4m3 stores 8-bit values, but the plan asks for 4 bits"):
        apply_plan(tiny_model, bad, {})


def test_dequantize_in_a_16_bit_dtype_computes_in_float32_first():
    weight = torch.tensor([[2.0**18, 2.0**15] + [0.0] * 30])  # E8M0 scale 2^16: beyond float16
    quantized = quantize("mxfp4", weight)
    assert quantized.scale.tolist() == [[2.0**16]]
    assert quantized.dequantize(torch.float16)[0, 1].item() == 2.0**15  # 0.5 · 2^16, a float16


def test_integer_grids_are_unchanged_by_the_new_fields():
    quantized = QuantizedWeight(
        codes=torch.tensor([[0, 3, 15]], dtype=torch.uint8),
        scale=torch.tensor([[0.5]]).half(),
        zero=torch.tensor([[3.0]]),
        bits=4,
        group_size=-1,
        symmetric=False,
    )
    assert quantized.format is None and quantized.scale_format == "float16" and quantized.tensor_scale is None
    assert quantized.dequantize().tolist() == [[-1.5, 0.0, 6.0]]
    assert quantized.dequantize(torch.float16).dtype == torch.float16


# --- stored scale bytes -----------------------------------------------------------------------------------------


def test_scale_codes_round_trip():
    e8m0 = torch.tensor([1.0, 2.0, 0.125, 2.0**-127, 2.0**127])
    assert scale_codes(e8m0, "e8m0").tolist() == [127, 128, 124, 0, 254]
    assert torch.equal(scales_from_codes(scale_codes(e8m0, "e8m0"), "e8m0"), e8m0)
    e4m3 = torch.tensor([1.0, 448.0, 2.0**-9, 44.0])
    assert scale_codes(e4m3, "e4m3").tolist() == [0x38, 0x7E, 0x01, 0x63]  # 44 = 1.375 · 2^5: S.1100.011
    assert torch.equal(scales_from_codes(scale_codes(e4m3, "e4m3"), "e4m3"), e4m3)
    with pytest.raises(ValueError):
        scale_codes(torch.tensor([3.0]), "e8m0")
    with pytest.raises(ValueError):
        scale_codes(torch.tensor([0.3]), "e4m3")


# --- honest size ------------------------------------------------------------------------------------------------


def test_format_metadata():
    table = {
        name: (f.bits, f.block_size, f.default_group_size, f.scale_format, f.scale_bits) for name, f in FORMATS.items()
    }
    assert table == {
        "fp8-e4m3": (8, None, -1, "float16", 16),
        "fp8-e5m2": (8, None, -1, "float16", 16),
        "mxfp4": (4, 32, 32, "e8m0", 8),
        "nvfp4": (4, 16, 16, "e4m3", 8),
        "nf4": (4, None, 64, "float16", 16),
    }
    assert FORMATS["nvfp4"].tensor_scale and not FORMATS["mxfp4"].tensor_scale
    assert FORMATS["mxfp4"].element is FORMATS["nvfp4"].element is ELEMENTS["e2m1"]


def test_storage_of_a_4096_square_weight_by_hand():
    n = 4096 * 4096
    assert format_storage("nf4", 4096, 4096) == FormatStorage(n // 2, 4096 * 64 * 2, 0)
    assert format_storage("nf4", 4096, 4096, group_size=128) == FormatStorage(n // 2, 4096 * 32 * 2, 0)
    assert format_storage("mxfp4", 4096, 4096) == FormatStorage(n // 2, 4096 * 128, 0)
    assert format_storage("mxfp4", 4096, 4096, group_size=128) == FormatStorage(n // 2, 4096 * 128, 0)
    assert format_storage("nvfp4", 4096, 4096) == FormatStorage(n // 2, 4096 * 256, 4)
    assert format_storage("fp8-e4m3", 4096, 4096) == FormatStorage(n, 4096 * 2, 0)
    assert format_storage("fp8-e5m2", 4096, 4096, group_size=PER_TENSOR) == FormatStorage(n, 0, 4)
    assert format_storage("fp8-e4m3", 4096, 4096, group_size=128).scales == 4096 * 32 * 2
    assert format_storage("nvfp4", 4096, 4096).total == n // 2 + 4096 * 256 + 4
    assert bits_per_weight("nf4", 4096) == 4.25 and bits_per_weight("mxfp4", 4096) == 4.25
    assert bits_per_weight("nvfp4", 4096) == 4.5 and bits_per_weight("fp8-e4m3", 4096) == 8 + 16 / 4096
    assert bits_per_weight("fp8-e4m3", 4096, PER_TENSOR) == 8.0


def test_storage_of_pruned_and_ragged_weights_by_hand():
    assert format_storage("nf4", 10, 100, kept=1001) == FormatStorage(501, 10 * 2 * 2, 0)  # blocks 64 + 36
    assert format_storage("mxfp4", 3, 100, kept=7) == FormatStorage(4, 3 * 4, 0)  # 4 blocks: 32·3 + 4
    assert format_storage("nvfp4", 3, 100, kept=300) == FormatStorage(150, 3 * 7, 4)  # 7 blocks: 16·6 + 4
    assert format_storage("fp8-e4m3", 5, 20, kept=33) == FormatStorage(33, 10, 0)
    assert format_storage("mxfp4", 2, 16) == FormatStorage(16, 2, 0)  # a row shorter than a block: one block
    assert layout("mxfp4", 16) == (16, 1) and layout("nf4", 100) == (64, 2) and layout("fp8-e4m3", 100, 0) == (-1, 1)


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("group_size", [PER_ROW, 48])
def test_accounted_scales_are_the_scales_a_quantizer_returns(name, group_size):
    quantized = quantize(name, random_weight(6, 100), group_size)
    storage = format_storage(name, 6, 100, group_size=group_size)
    assert storage.scales * 8 == quantized.scale.numel() * FORMATS[name].scale_bits
    assert storage.codes == math.ceil(quantized.codes.numel() * quantized.bits / 8)
    assert storage.tensor_scale == (4 if quantized.tensor_scale is not None else 0)


def test_per_tensor_fp8_accounts_no_row_scales():
    quantized = quantize("fp8-e4m3", random_weight(6, 100), PER_TENSOR)
    assert quantized.scale_format == "none" and format_storage("fp8-e4m3", 6, 100, group_size=PER_TENSOR).scales == 0
