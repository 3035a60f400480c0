"""Honest size: bytes as an exported artifact really stores them.

A compressed Linear stores
- its kept values at their bit-width, bit-packed (16-bit floats when not quantized);
- a bitmask of kept positions (one bit per weight) when pruned;
- on an integer grid, one float16 scale per group, and for asymmetric grids one zero-point per group packed
  at the bit-width; in a number format (FP8, MXFP4, NVFP4, NF4), its scales in the format's scale type
  (float16, E8M0 or E4M3 bytes) and its float32 tensor scale if it has one, no zero-points
  (`methods.formats.format_storage`);
- its bias, if any, in 16 bits.
Each of these is a separate tensor rounded up to whole bytes. Everything that is not compressed
(embeddings, norms, lm_head) is stored in 16 bits; tied weights count once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from autocompress.compress import quantizer_for, sparsity_pattern
from autocompress.methods.formats import FORMATS, format_storage
from autocompress.methods.pruning import pruned_per_row
from autocompress.methods.quantization import group_count
from autocompress.models import compressible_linears
from autocompress.plan import CompressionPlan, LayerCompression

HALF_BYTES = 2


def packed_bytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


def linear_bytes(
    out_features: int, in_features: int, setting: LayerCompression, plan: CompressionPlan, bias: bool = False
) -> int:
    """Bytes one Linear takes once compressed with `setting` under the plan-wide options of `plan`."""
    total = out_features * in_features
    kept = total - out_features * pruned_per_row(in_features, setting.sparsity, sparsity_pattern(plan))
    size = packed_bytes(total, 1) if setting.sparsity > 0 else 0
    if setting.bits == 16:
        size += packed_bytes(kept, 16)
    else:
        method, spec = quantizer_for(setting, plan)
        if method in FORMATS:
            size += format_storage(method, out_features, in_features, kept, spec.group_size).total
        else:
            groups = out_features * group_count(in_features, spec.group_size)
            size += packed_bytes(kept, spec.bits) + groups * HALF_BYTES
            if not spec.symmetric:
                size += packed_bytes(groups, spec.bits)
    if bias:
        size += out_features * HALF_BYTES
    return size


@dataclass(frozen=True)
class SizeReport:
    total_bytes: int
    dense_bytes: int  # the same model with every parameter in 16 bits
    per_layer: dict[str, int]  # compressed Linear name -> bytes

    @property
    def ratio(self) -> float:
        return self.total_bytes / self.dense_bytes


def model_size(model: nn.Module, plan: CompressionPlan) -> SizeReport:
    linears = compressible_linears(model)
    per_layer = {}
    for linear in linears:
        weight, bias = linear.module.weight, linear.module.bias
        setting = plan.setting(linear.name, linear.block)
        per_layer[linear.name] = linear_bytes(*weight.shape, setting, plan, bias=bias is not None)
    compressed_ids = {id(parameter) for linear in linears for parameter in linear.module.parameters()}
    parameters = list(model.parameters())  # tied parameters appear once
    dense_bytes = sum(parameter.numel() for parameter in parameters) * HALF_BYTES
    untouched = sum(p.numel() for p in parameters if id(p) not in compressed_ids) * HALF_BYTES
    return SizeReport(total_bytes=untouched + sum(per_layer.values()), dense_bytes=dense_bytes, per_layer=per_layer)
