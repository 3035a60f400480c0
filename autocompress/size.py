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
from typing import TYPE_CHECKING

from torch import nn

from autocompress.codecs import resolve, stored_bytes
from autocompress.compress import kept_count
from autocompress.models import compressible_linears
from autocompress.plan import CompressionPlan, LayerCompression

if TYPE_CHECKING:
    from autocompress.targets.linear import LinearTarget

HALF_BYTES = 2

__all__ = ["HALF_BYTES", "SizeReport", "linear_bytes", "model_size", "packed_bytes"]


def packed_bytes(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


def linear_bytes(
    out_features: int, in_features: int, setting: LayerCompression, plan: CompressionPlan, bias: bool = False
) -> int:
    """Bytes one Linear takes in our artifact once compressed with `setting` under the plan-wide options of `plan`:
    what its codec writes (`codecs.encode_linear`), and its bias in 16 bits."""
    kept = kept_count(out_features, in_features, setting, plan)
    size = stored_bytes(resolve(setting, plan), out_features, in_features, kept)
    return size + (out_features * HALF_BYTES if bias else 0)


@dataclass(frozen=True)
class SizeReport:
    total_bytes: int
    dense_bytes: int  # the same model with every parameter in 16 bits
    per_layer: dict[str, int]  # compressed Linear name -> bytes

    @property
    def ratio(self) -> float:
        return self.total_bytes / self.dense_bytes


def model_size(model: nn.Module, plan: CompressionPlan, target: LinearTarget | None = None) -> SizeReport:
    """The plan's bytes as the deployment `target` stores them (by default our artifact, whose bytes are the ones
    this module counts); `dense_bytes` is always every parameter in 16 bits, the figure sizes are fractions of."""
    linears = compressible_linears(model)
    dtype = next(model.parameters()).dtype
    per_layer = {}
    for linear in linears:
        weight, bias = linear.module.weight, linear.module.bias
        setting = plan.setting(linear.name, linear.block)
        if target is None:
            per_layer[linear.name] = linear_bytes(*weight.shape, setting, plan, bias is not None)
        else:
            per_layer[linear.name] = target.linear_bytes(setting, plan, *weight.shape, bias is not None, dtype)
    compressed_ids = {id(parameter) for linear in linears for parameter in linear.module.parameters()}
    parameters = list(model.parameters())  # tied parameters appear once
    dense_bytes = sum(parameter.numel() for parameter in parameters) * HALF_BYTES
    untouched = [p.numel() for p in parameters if id(p) not in compressed_ids]
    if target is None:
        total = sum(untouched) * HALF_BYTES + sum(per_layer.values())
    else:
        tensors = sum(target.tensor_bytes(numel, dtype) for numel in untouched)
        total = tensors + sum(per_layer.values()) + target.overhead_bytes(model, plan)
    return SizeReport(total_bytes=total, dense_bytes=dense_bytes, per_layer=per_layer)
