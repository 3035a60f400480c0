"""The one entry point that applies a CompressionPlan to a model: prune, then quantize, layer by layer."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from autocompress.errors import UserError
from autocompress.methods import PRUNERS, QUANTIZERS, LayerStatistics, QuantSpec, SparsityPattern, Statistic
from autocompress.models import compressible_linears, unit_names
from autocompress.plan import CompressionPlan, LayerCompression


def sparsity_pattern(plan: CompressionPlan) -> SparsityPattern:
    return SparsityPattern(*plan.nm) if plan.nm else SparsityPattern()


def statistics_needed(plan: CompressionPlan) -> set[Statistic]:
    """The calibration statistics the plan's methods need for the levels it uses."""
    settings = [plan.default, *plan.layers.values()]
    needs: set[Statistic] = set()
    if any(setting.sparsity > 0 for setting in settings):
        needs |= PRUNERS[plan.pruning].needs
    if any(setting.bits < 16 for setting in settings):
        needs |= QUANTIZERS[plan.quantization].needs
    return needs


def compress_weight(
    weight: torch.Tensor, setting: LayerCompression, plan: CompressionPlan, stats: LayerStatistics
) -> torch.Tensor:
    """One Linear's weight (out × in) compressed as the plan says, computed in float32."""
    compressed = weight.float()
    mask = None
    if setting.sparsity > 0:
        compressed = PRUNERS[plan.pruning].function(compressed, setting.sparsity, sparsity_pattern(plan), stats)
        mask = compressed != 0
    if setting.bits < 16:
        spec = QuantSpec(bits=setting.bits, group_size=plan.group_size, symmetric=plan.symmetric)
        compressed = QUANTIZERS[plan.quantization].function(compressed, mask, spec, stats)
    return compressed.to(weight.dtype)


@torch.no_grad()
def apply_plan(model: nn.Module, plan: CompressionPlan, statistics: Mapping[str, LayerStatistics]) -> None:
    """Compress the model in place. The result runs in plain transformers (masked, fake-quantized weights)."""
    try:
        plan.check_units(unit_names(model, plan.granularity))
    except ValueError as error:
        raise UserError(f"plan: {error}") from error
    for linear in compressible_linears(model):
        setting = plan.setting(linear.name, linear.block)
        if setting.is_identity:
            continue
        stats = statistics.get(linear.name, LayerStatistics())
        try:
            compressed = compress_weight(linear.module.weight.data, setting, plan, stats)
        except ValueError as error:
            raise UserError(f"plan: cannot compress {linear.name}: {error}") from error
        linear.module.weight.data.copy_(compressed)
