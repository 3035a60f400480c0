"""Floating-point and lookup-table formats (FP8 E4M3/E5M2, MXFP4, NVFP4, NF4), as specifications."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml
from pydantic import ValidationError

from autocompress.cli import main
from autocompress.compress import apply_plan, compress_weight
from autocompress.config import Config, load_config
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
from autocompress.models import compressible_linears
from autocompress.plan import CompressionPlan, LayerCompression, Level, parse_level
from autocompress.record import TrialRecord
from autocompress.search import SearchSpace, StudyLocation, run_search
from autocompress.session import CompressionSession
from autocompress.size import linear_bytes, model_size
from tests.conftest import random_text

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


# --- precision levels: a per-unit format in plans -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "bits", "method", "group_size"),
    [
        ("fp16", 16, None, None),
        ("int4", 4, None, None),  # the plan's integer method and groups
        ("int3-g64", 3, None, 64),
        ("int8-row", 8, None, PER_ROW),
        ("nf4", 4, "nf4", None),  # the format's canonical blocks (64)
        ("nf4-g128", 4, "nf4", 128),
        ("mxfp4", 4, "mxfp4", None),
        ("nvfp4", 4, "nvfp4", None),
        ("fp8-e4m3", 8, "fp8-e4m3", None),  # one scale per row
        ("fp8-e5m2-g32", 8, "fp8-e5m2", 32),
        ("fp8-e4m3-tensor", 8, "fp8-e4m3", PER_TENSOR),
    ],
)
def test_level_names_say_bits_method_and_groups(name, bits, method, group_size):
    assert parse_level(name) == Level(name, bits, method, group_size)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("int4-g128x", "unknown precision level 'int4-g128x'; use fp16, int<bits>"),
        ("int7", "unknown precision level 'int7'"),
        ("fp4", "unknown precision level 'fp4'"),
        ("int4-g0", "a group holds at least one input"),
        ("mxfp4-g64", "mxfp4 fixes its blocks at 32 inputs"),
        ("nvfp4-row", "nvfp4 fixes its blocks at 16 inputs"),
        ("nf4-tensor", "only FP8 takes one scale per tensor"),
    ],
)
def test_a_name_that_is_no_level_is_refused_in_one_line(name, reason):
    with pytest.raises(ValueError, match=re.escape(reason)) as error:
        parse_level(name)
    assert "\n" not in str(error.value)


def test_a_format_setting_takes_the_bits_of_its_level_and_plain_names_are_plain_bits():
    assert LayerCompression(format="nf4") == LayerCompression(bits=4, format="nf4")
    assert LayerCompression(format="fp8-e4m3").bits == 8
    assert LayerCompression(format="int4") == LayerCompression(bits=4)  # one setting, one form
    assert LayerCompression(sparsity=0.5, format="fp16") == LayerCompression(sparsity=0.5)
    assert LayerCompression(format="int4-g32").format == "int4-g32"  # its own groups: a level of its own
    with pytest.raises(ValidationError, match="'nf4' stores 4 bits, not 8"):
        LayerCompression(format="nf4", bits=8)
    with pytest.raises(ValidationError, match="unknown precision level 'nf5'"):
        LayerCompression(format="nf5")


def format_plan(**options: object) -> CompressionPlan:
    """A plan naming a different level for each Linear of the tiny model's first block, pruning one of them."""
    layers = {
        "model.layers.0.self_attn.q_proj": LayerCompression(format="nf4"),
        "model.layers.0.self_attn.k_proj": LayerCompression(format="mxfp4"),
        "model.layers.0.self_attn.v_proj": LayerCompression(format="nvfp4"),
        "model.layers.0.self_attn.o_proj": LayerCompression(format="fp8-e4m3"),
        "model.layers.0.mlp.gate_proj": LayerCompression(sparsity=0.5, format="fp8-e5m2-tensor"),
        "model.layers.0.mlp.up_proj": LayerCompression(format="int4-g32"),
        "model.layers.0.mlp.down_proj": LayerCompression(bits=3),  # the plan's integer grid
    }
    return CompressionPlan(layers=layers, granularity="linear", **{"pruning": "magnitude", "group_size": 64} | options)


def test_a_plan_naming_formats_round_trips_through_json_and_trial_parameters():
    plan = format_plan()
    assert CompressionPlan.from_json(plan.to_json()) == plan
    params = plan.to_params()
    assert params["model.layers.0.self_attn.q_proj.format"] == "nf4"
    assert params["model.layers.0.mlp.down_proj.bits"] == 3 and "model.layers.0.mlp.down_proj.format" not in params
    assert CompressionPlan.from_params(params, **plan.model_dump(exclude={"default", "layers"})) == plan
    assert "format" not in json.loads(CompressionPlan.uniform(bits=4).to_json())["default"]  # plans of old read alike


def test_applying_a_plan_gives_each_linear_its_format_and_groups(tiny_model):
    kept = apply_plan(tiny_model, format_plan(), {}, keep=True)
    quantized = {name.removeprefix("model.layers.0."): linear.quantized for name, linear in kept.items()}
    assert {name: q.format for name, q in quantized.items()} == {
        "self_attn.q_proj": "nf4",
        "self_attn.k_proj": "mxfp4",
        "self_attn.v_proj": "nvfp4",
        "self_attn.o_proj": "fp8-e4m3",
        "mlp.gate_proj": "fp8-e5m2",
        "mlp.up_proj": None,
        "mlp.down_proj": None,
    }
    groups = {name: (q.group_size, q.bits, q.scale_format) for name, q in quantized.items()}
    assert groups["self_attn.q_proj"] == (64, 4, "float16") and groups["self_attn.k_proj"] == (32, 4, "e8m0")
    assert groups["self_attn.v_proj"] == (16, 4, "e4m3") and groups["self_attn.o_proj"] == (PER_ROW, 8, "float16")
    assert groups["mlp.gate_proj"] == (PER_ROW, 8, "none") and kept["model.layers.0.mlp.gate_proj"].mask is not None
    assert groups["mlp.up_proj"] == (32, 4, "float16") and groups["mlp.down_proj"] == (64, 3, "float16")


def test_an_integer_level_needs_an_integer_method():
    with pytest.raises(ValidationError, match="integer level 'int4-g32', but the plan's quantization is the number"):
        format_plan(quantization="nf4")


# --- honest size of format levels -------------------------------------------------------------------------------


def linear_size(level: str, sparsity: float = 0.0, bias: bool = False, **options: object) -> int:
    """Bytes of a 64 × 128 Linear at a level, under a plan with groups of 64 (asymmetric, magnitude pruning)."""
    plan = CompressionPlan(**{"group_size": 64, "pruning": "magnitude"} | options)
    return linear_bytes(64, 128, LayerCompression(sparsity=sparsity, format=level), plan, bias=bias)


def test_format_levels_cost_their_codes_and_scales_and_no_zero_points_by_hand():
    codes4, codes8 = 64 * 128 // 2, 64 * 128
    assert linear_size("nf4") == codes4 + 64 * 2 * 2  # blocks of 64: 2 float16 absmax per row
    assert linear_size("nf4-g128") == codes4 + 64 * 2
    assert linear_size("mxfp4") == codes4 + 64 * 4  # blocks of 32: 4 E8M0 bytes per row
    assert linear_size("nvfp4") == codes4 + 64 * 8 + 4  # blocks of 16: 8 E4M3 bytes per row, a float32 tensor scale
    assert linear_size("fp8-e4m3") == codes8 + 64 * 2  # one float16 scale per row
    assert linear_size("fp8-e5m2-tensor") == codes8 + 4  # one float32 scale in all
    assert linear_size("int4-g32") == codes4 + 64 * 4 * 2 + 64 * 4 // 2  # float16 scales, 4-bit zero-points
    assert linear_size("int4-g32", symmetric=True) == codes4 + 64 * 4 * 2
    assert linear_size("int4") == codes4 + 64 * 2 * 2 + 64 * 2 // 2  # the plan's groups of 64


def test_a_pruned_format_level_stores_a_mask_and_only_the_kept_codes_and_a_bias_in_16_bits():
    mask, kept_codes = 64 * 128 // 8, 64 * 64 // 2
    assert linear_size("nf4", sparsity=0.5) == mask + kept_codes + 64 * 2 * 2
    assert linear_size("nvfp4", sparsity=0.5, bias=True) == mask + kept_codes + 64 * 8 + 4 + 64 * 2


def test_a_plan_wide_number_format_is_sized_as_the_format_it_is():
    plan = CompressionPlan(quantization="nf4", group_size=128)
    assert linear_bytes(64, 128, LayerCompression(bits=4), plan) == linear_size("nf4-g128")


def test_the_model_size_of_a_format_plan_sums_its_linears(tiny_model):
    plan = format_plan()
    report = model_size(tiny_model, plan)
    linears = {linear.name: linear.module for linear in compressible_linears(tiny_model)}
    for name, setting in plan.layers.items():
        out_features, in_features = linears[name].weight.shape
        assert report.per_layer[name] == linear_bytes(out_features, in_features, setting, plan), name
    assert report.per_layer["model.layers.0.self_attn.q_proj"] == format_storage("nf4", 64, 64).total


# --- a search over formats --------------------------------------------------------------------------------------

SEARCHED_FORMATS = ["int4", "nf4", "mxfp4", "nvfp4", "fp8-e4m3", "fp16"]


def format_search_config(model_dir: Path, folder: Path, **search: object) -> dict:
    corpus = folder / "corpus.txt"
    corpus.write_text(random_text(6000, seed=1))
    return {
        "model": {"name": str(model_dir), "device": "cpu"},
        "data": {"source": "files", "files": [str(corpus)], "seq_len": 32, "calibration": 4, "fitness": 4},
        "compression": {"quantization": "rtn", "group_size": 32},
        "search": {"formats": SEARCHED_FORMATS, "n_trials": 10, "seed": 0} | search,
    }


def test_a_search_over_integer_and_float_formats_reports_the_format_of_each_block(tmp_path, tiny_model_dir):
    config = Config.model_validate(format_search_config(tiny_model_dir, tmp_path))
    location = StudyLocation.resolve("formats", tmp_path / "results")
    study = run_search(config, location, n_trials=10, progress=False)

    seeds = [trial.params for trial in study.trials if TrialRecord.of(trial).seed]
    assert [set(params.values()) for params in seeds] == [{"fp16"}] + [{name} for name in SEARCHED_FORMATS[:-1]]
    sizes = {trial.params["model.layers.0.format"]: TrialRecord.of(trial).size_bytes for trial in study.trials[:6]}
    # bits per weight: nf4 and mxfp4 4.25, nvfp4 4.5, int4 in the plan's asymmetric groups of 32 4.625
    assert sizes["nf4"] == sizes["mxfp4"] < sizes["nvfp4"] < sizes["int4"] < sizes["fp8-e4m3"] < sizes["fp16"]
    trials = pd.read_csv(location.out_dir / "trials.csv")
    assert set(trials["model.layers.1.format"]) <= set(SEARCHED_FORMATS)
    frontier = pd.read_csv(location.out_dir / "frontier.csv")
    assert frontier["heldout_ppl"].notna().all()
    for _, member in frontier.iterrows():  # each block's format, and a summary of them
        formats = [member["model.layers.0.format"], member["model.layers.1.format"]]
        assert all(name in member["allocation"] for name in formats), member["allocation"]
    assert "- format per unit: " in (location.out_dir / "report.md").read_text()
    if frontier["allocation"].nunique() > 1:  # a frontier of different formats draws their heatmap
        assert (location.out_dir / "allocation.png").stat().st_size > 0


def test_the_search_space_samples_formats_and_seeds_one_uniform_plan_per_format(tiny_model_dir, tmp_path):
    config = Config.model_validate(format_search_config(tiny_model_dir, tmp_path, sparsity=[0.0, 0.5]))
    space = SearchSpace(config, ["model.layers.0", "model.layers.1"])
    assert space.precision_levels == ["int4", "nf4", "mxfp4", "nvfp4", "fp8-e4m3", "fp16"]  # fewest bits first
    seeds = space.seeds()  # each sparsity at the widest level, then each level unpruned
    first_block = {key: value for key, value in seeds[1].items() if key.startswith("model.layers.0.")}
    assert first_block == {"model.layers.0.sparsity": 0.5, "model.layers.0.format": "fp16"}
    assert [seed["model.layers.1.format"] for seed in seeds[2:]] == space.precision_levels[:-1]
    plan = space.plan_from_params({"model.layers.0.format": "nvfp4", "model.layers.1.format": "int4"})
    assert plan.layers["model.layers.0"] == LayerCompression(format="nvfp4")
    assert plan.layers["model.layers.1"] == LayerCompression(bits=4)
    dense = space.plan_from_params(space.dense_params())
    assert all(setting.is_identity for setting in dense.layers.values())
    trial = optuna.create_study().ask()
    sampled = space.plan_for(trial)
    assert set(trial.params) == {f"model.layers.{i}.{field}" for i in (0, 1) for field in ("sparsity", "format")}
    assert sampled.layers["model.layers.1"].level.name == trial.params["model.layers.1.format"]


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"formats": ["int4", "fp5"]}, "search.formats: unknown precision level 'fp5'; use fp16, int<bits>"),
        ({"formats": ["nf4"], "bits": [4, 16]}, "search: give the precision levels in bits or in formats, not both"),
        ({"formats": []}, "search: formats lists at least one precision level"),
        (
            {"formats": ["nf4"], "sparsity": [0.4, 0.5, 0.6], "budget": {"sparsity": 0.5}},
            "search: an average budget chooses among bits, not formats",
        ),
    ],
)
def test_a_bad_formats_list_is_one_line_and_exit_2_from_the_cli(search, message, tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(format_search_config(tiny_model_dir, tmp_path, **search)))
    with pytest.raises(SystemExit) as exit_:
        main(["search", str(path), "--study", "bad", "--results", str(tmp_path / "results")])
    error = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in error and "Traceback" not in error
    assert error.startswith("autocompress: error: config ") and message in error, error


def test_an_integer_format_with_a_number_format_method_is_refused(tmp_path, tiny_model_dir):
    raw = format_search_config(tiny_model_dir, tmp_path)
    raw["compression"]["quantization"] = "nf4"
    with pytest.raises(ValidationError, match=r"search\.formats: int4 is an integer grid, but compression"):
        Config.model_validate(raw)


def test_apply_takes_a_format_and_refuses_an_unknown_one(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({key: value for key, value in format_search_config(tiny_model_dir, tmp_path).items()
                                    if key != "search"}))  # fmt: skip
    main(["apply", str(path), "--format", "nvfp4", "--json"])
    result = json.loads(capsys.readouterr().out)
    tiny = CompressionSession(Config.model_validate(yaml.safe_load(path.read_text())))
    assert result["size_bytes"] == model_size(tiny.model, CompressionPlan.uniform(format="nvfp4")).total_bytes
    with pytest.raises(SystemExit) as exit_:
        main(["apply", str(path), "--format", "nf3"])
    error = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and error.startswith("autocompress: error: plan: ") and "'nf3'" in error


def test_the_formats_recipe_searches_named_levels_under_int4_g128s_size():
    config = load_config(Path(__file__).parent.parent / "search_spaces" / "smollm2-formats.yaml")
    assert config.search.precision_levels() == ["int3-g128", "int4-g128", "nf4-g128", "nf4", "nvfp4", "fp8-e4m3"]
    assert config.search.max_size == 112_023_936 and config.compression.quantization == "gptq"
