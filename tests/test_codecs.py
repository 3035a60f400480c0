"""One codec per stored form: for every registered level, the bytes accounted are the bytes encoded, and what is
encoded decodes to exactly the weight the compressed model computes with."""

from __future__ import annotations

import json

import pytest
import torch

from autocompress.codecs import CODECS, codec_of_entry, decode_linear, encode_linear, level_kind, resolve
from autocompress.compress import compress_weight, kept_count
from autocompress.methods import LayerStatistics
from autocompress.plan import BIT_WIDTHS, CompressionPlan, LayerCompression, parse_level
from autocompress.size import linear_bytes
from autocompress.variants import compress_variants, decode_variant

LEVELS = [
    "fp16",
    *(f"int{bits}" for bits in BIT_WIDTHS[:-1]),  # the plan's groups (32, which leaves a shorter last group)
    "int4-g64",
    "int3-g16",
    "int8-row",
    "fp8-e4m3",
    "fp8-e4m3-g32",
    "fp8-e4m3-tensor",
    "fp8-e5m2",
    "fp8-e5m2-tensor",
    "mxfp4",
    "nvfp4",
    "nf4",
    "nf4-g128",
    "nf4-row",
]
SHAPES = [(24, 80), (7, 200)]  # rows that groups and blocks do not divide evenly


def weight_of(shape: tuple[int, int]) -> torch.Tensor:
    """A float32 weight of values float16 holds, as a session rounds its dense model to what an artifact stores."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))).half().float()


def stored_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def test_the_levels_cover_every_registered_codec() -> None:
    plan = CompressionPlan(group_size=32)
    assert {level_kind(parse_level(name), plan) for name in LEVELS} == set(CODECS)
    assert level_kind(parse_level("int4"), CompressionPlan(quantization="nf4")) == "format"  # the plan's method


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
@pytest.mark.parametrize("name", LEVELS)
def test_accounted_bytes_are_the_encoded_bytes_and_decode_exactly(name: str, sparsity: float, symmetric: bool) -> None:
    plan = CompressionPlan(pruning="magnitude", quantization="rtn", group_size=32, symmetric=symmetric)
    setting = LayerCompression(sparsity=sparsity, format=name)
    codec = resolve(setting, plan)
    for shape in SHAPES:
        compressed = compress_weight(weight_of(shape), setting, plan, LayerStatistics())
        tensors, entry = encode_linear(codec, compressed)
        accounted = linear_bytes(*shape, setting, plan)
        assert stored_nbytes(tensors) == accounted, (name, shape)
        assert codec.nbytes(*shape, kept_count(*shape, setting, plan) or shape[0] * shape[1]) <= accounted
        entry = json.loads(json.dumps(entry))  # as a manifest holds it
        assert codec_of_entry(entry).nbytes(*shape, 1) == codec.nbytes(*shape, 1)
        assert torch.equal(decode_linear(tensors, entry), compressed.weight.float()), (name, shape)


def test_the_variant_database_stores_what_the_codec_encodes() -> None:
    plan = CompressionPlan(pruning="magnitude", quantization="rtn", group_size=32)
    settings = [LayerCompression(sparsity=sparsity, format=name) for sparsity in (0.0, 0.5) for name in LEVELS]
    settings = [setting for setting in settings if not setting.is_identity]
    weight = weight_of(SHAPES[0])
    for setting, (tensors, metadata) in compress_variants(weight, settings, plan, LayerStatistics()).items():
        direct = compress_weight(weight, setting, plan, LayerStatistics())
        assert torch.equal(decode_variant(dict(tensors), metadata), direct.weight), setting
        if setting.bits < 16:  # pruned-only values stay in the model's dtype there, 16 bits in an artifact
            assert stored_nbytes(tensors) == linear_bytes(*SHAPES[0], setting, plan), setting
