"""Number formats (`methods.formats.FORMATS`: FP8 E4M3/E5M2, MXFP4, NVFP4, NF4): codes that index the format's own
table of values, under per-row or per-block scales in the format's scale type, and NVFP4's (or per-tensor FP8's)
float32 tensor scale.

Stored tensors: `codes` (the kept positions' codes, row-major, bit-packed), `scale` (float16, or the E8M0 / E4M3
bytes; none for per-tensor FP8, whose row scales are all ones) and `tensor_scale` (one float32) when the format has
one. The table of values is the format's constant, named in the entry rather than stored. Entry: bits, group_size (as
stored), symmetric (False), groups, levels (False), format, scale_format, tensor_scale (whether it is stored).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from autocompress.codecs.packing import pack, unpack
from autocompress.codecs.registry import Codec, CompressedLinear, Entry, _tensor, register, scatter_kept
from autocompress.methods import QUANTIZERS, LayerStatistics, QuantizedWeight, QuantSpec
from autocompress.methods.formats import (
    FORMATS,
    PER_ROW,
    PER_TENSOR,
    format_storage,
    layout,
    levels_tensor,
    scale_codes,
    scales_from_codes,
)

if TYPE_CHECKING:
    from autocompress.plan import CompressionPlan, Level


@register
@dataclass(frozen=True)
class NumberFormat(Codec):
    """A named number format at a scale layout: `group_size` inputs per scale, -1 per row, 0 (`PER_TENSOR`, FP8 only)
    one float32 scale for the tensor; MXFP4 and NVFP4 fix their blocks whatever it says."""

    kind: ClassVar[str] = "format"
    format: str
    group_size: int

    @property
    def name(self) -> str:
        spec = FORMATS[self.format]
        if spec.block_size is not None or self.group_size == spec.default_group_size:
            return self.format
        suffix = {PER_ROW: "row", PER_TENSOR: "tensor"}.get(self.group_size, f"g{self.group_size}")
        return f"{self.format}-{suffix}"

    @property
    def bits(self) -> int:
        return FORMATS[self.format].bits

    def quantize(self, weight: torch.Tensor, mask: torch.Tensor | None, stats: LayerStatistics) -> QuantizedWeight:
        spec = QuantSpec(bits=self.bits, group_size=self.group_size, symmetric=False)
        return QUANTIZERS[self.format].function(weight, mask, spec, stats)

    def encode(self, compressed: CompressedLinear, values_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], Entry]:
        quantized = compressed.quantized
        if quantized is None or quantized.format != self.format:
            raise ValueError(f"{self.name}: expected {self.format} codes")
        if not torch.all(quantized.zero == 0):
            raise ValueError(f"a {self.format} weight's zero-points must all be 0")
        codes = quantized.codes.detach().cpu()
        kept = codes.reshape(-1) if compressed.mask is None else codes[compressed.mask]
        tensors = {"codes": pack(kept, self.bits)}
        scale = quantized.scale.detach().cpu()
        if quantized.scale_format == "float16":
            tensors["scale"] = scale.to(torch.float16)
        elif quantized.scale_format in ("e8m0", "e4m3"):
            tensors["scale"] = scale_codes(scale, quantized.scale_format)
        if quantized.tensor_scale is not None:
            tensors["tensor_scale"] = torch.tensor([quantized.tensor_scale], dtype=torch.float32)
        entry = {
            "bits": self.bits,
            "group_size": quantized.group_size,
            "symmetric": False,
            "groups": int(quantized.scale.shape[1]),
            "levels": False,
            "format": self.format,
            "scale_format": quantized.scale_format,
            "tensor_scale": quantized.tensor_scale is not None,
        }
        return {key: value.contiguous() for key, value in tensors.items()}, entry

    def decode(
        self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int], mask: torch.Tensor | None
    ) -> torch.Tensor:
        out_features, in_features = shape
        spec = FORMATS[self.format]
        kept = out_features * in_features if mask is None else int(mask.sum())
        codes = scatter_kept(unpack(_tensor(tensors, "codes"), kept, self.bits), shape, mask)
        per_tensor = spec.allows_per_tensor and self.group_size == PER_TENSOR
        group_size, groups = layout(self.format, in_features, None if spec.block_size else self.group_size)
        scale_format = "none" if per_tensor else spec.scale_format
        if per_tensor:
            scale = torch.ones(out_features, groups, dtype=torch.float32, device=codes.device)
        else:
            stored = _tensor(tensors, "scale")
            scale = stored if scale_format == "float16" else scales_from_codes(stored, scale_format)
            scale = scale.reshape(out_features, groups)
        tensor_scale = float(_tensor(tensors, "tensor_scale")[0]) if per_tensor or spec.tensor_scale else None
        weight = QuantizedWeight(
            codes=codes,
            scale=scale,
            zero=torch.zeros_like(scale, dtype=torch.float32),
            bits=self.bits,
            group_size=group_size,
            symmetric=False,
            levels=levels_tensor(spec.element, codes.device),
            format=self.format,
            scale_format=scale_format,
            tensor_scale=tensor_scale,
        ).dequantize()
        return weight if mask is None else weight * mask

    def nbytes(self, out_features: int, in_features: int, kept: int) -> int:
        return format_storage(self.format, out_features, in_features, kept, self.group_size).total

    @classmethod
    def from_level(cls, level: Level, plan: CompressionPlan) -> NumberFormat:
        """A format level (its own canonical groups unless named), or a bit-width under a plan whose quantization
        is a number format (the plan's groups unless named)."""
        if level.method is None:
            if level.bits != FORMATS[plan.quantization].bits:
                raise ValueError(
                    f"{plan.quantization} stores {FORMATS[plan.quantization].bits}-bit values, but the plan asks for "
                    f"{level.bits} bits"
                )
            return cls(plan.quantization, plan.group_size if level.group_size is None else level.group_size)
        default = FORMATS[level.method].default_group_size
        return cls(level.method, default if level.group_size is None else level.group_size)

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> NumberFormat:
        if entry["format"] not in FORMATS:
            raise ValueError(f"unknown number format {entry['format']!r}")
        return cls(entry["format"], PER_TENSOR if entry["scale_format"] == "none" else int(entry["group_size"]))
