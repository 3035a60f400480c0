"""Our integer grids: unsigned codes c at b bits, one float16 scale s per group and, for asymmetric grids, one
zero-point z per group packed at b bits (symmetric grids fix z at 2^(b−1) and store none); w = (c − z)·s.

Stored tensors: `codes` (the kept positions' codes, row-major, bit-packed), `scale` (float16 [out, groups]) and
`zero` (asymmetric only). Entry: bits, group_size (as stored: -1 per row, else the columns per group), symmetric,
groups, levels (False: the grid is uniform).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from autocompress.codecs.packing import pack, packed_length, unpack
from autocompress.codecs.registry import Codec, CompressedLinear, Entry, _tensor, register, scatter_kept
from autocompress.methods import QUANTIZERS, LayerStatistics, QuantizedWeight, QuantSpec, Statistic
from autocompress.methods.quantization import effective_group_size, group_count

if TYPE_CHECKING:
    from autocompress.plan import CompressionPlan, Level

SCALE_BYTES = 2  # float16


@register
@dataclass(frozen=True)
class IntegerGrid(Codec):
    """`int<b>[-g<size>|-row]` with the plan's integer method, symmetry and (unless named) groups."""

    kind: ClassVar[str] = "int"
    bit_width: int
    group_size: int  # -1: one group per row
    symmetric: bool
    method: str = "rtn"  # the registered quantizer (rtn, gptq, gptq-actorder); decoding needs none

    @property
    def name(self) -> str:
        return f"int{self.bit_width}-" + ("row" if self.group_size == -1 else f"g{self.group_size}")

    @property
    def bits(self) -> int:
        return self.bit_width

    @property
    def needs(self) -> frozenset[Statistic]:
        return QUANTIZERS[self.method].needs

    def quantize(self, weight: torch.Tensor, mask: torch.Tensor | None, stats: LayerStatistics) -> QuantizedWeight:
        spec = QuantSpec(bits=self.bit_width, group_size=self.group_size, symmetric=self.symmetric)
        return QUANTIZERS[self.method].function(weight, mask, spec, stats)

    def encode(self, compressed: CompressedLinear, values_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], Entry]:
        quantized = compressed.quantized
        if quantized is None or quantized.format is not None or quantized.bits != self.bit_width:
            raise ValueError(f"{self.name}: expected {self.bit_width}-bit integer codes")
        codes = quantized.codes.detach().cpu()
        if tuple(codes.shape) != tuple(compressed.weight.shape):
            raise ValueError(f"codes of shape {tuple(codes.shape)} for a weight of {tuple(compressed.weight.shape)}")
        kept = codes.reshape(-1) if compressed.mask is None else codes[compressed.mask]
        tensors = {"codes": pack(kept, self.bit_width), "scale": quantized.scale.detach().cpu().to(torch.float16)}
        zero = quantized.zero.detach().cpu()
        if self.symmetric:
            if not torch.all(zero == 2 ** (self.bit_width - 1)):
                raise ValueError(f"a symmetric grid's zero-points must all be {2 ** (self.bit_width - 1)}")
        else:
            if not torch.equal(zero, zero.round()):
                raise ValueError(f"zero-points must be integers to be stored at {self.bit_width} bits")
            tensors["zero"] = pack(zero.to(torch.int64), self.bit_width)
        entry = {
            "bits": self.bit_width,
            "group_size": quantized.group_size,
            "symmetric": self.symmetric,
            "groups": int(quantized.scale.shape[1]),
            "levels": False,
        }
        return {key: value.contiguous() for key, value in tensors.items()}, entry

    def decode(
        self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int], mask: torch.Tensor | None
    ) -> torch.Tensor:
        out_features, in_features = shape
        kept = out_features * in_features if mask is None else int(mask.sum())
        codes = scatter_kept(unpack(_tensor(tensors, "codes"), kept, self.bit_width), shape, mask)
        scale = _tensor(tensors, "scale").reshape(out_features, -1)
        if self.symmetric:
            zero = torch.full(scale.shape, 2 ** (self.bit_width - 1), dtype=torch.float32, device=scale.device)
        else:
            zero = unpack(_tensor(tensors, "zero"), scale.numel(), self.bit_width).reshape(scale.shape).float()
        group_size = -1 if self.group_size == -1 else effective_group_size(in_features, self.group_size)
        weight = QuantizedWeight(codes, scale, zero, self.bit_width, group_size, self.symmetric).dequantize()
        return weight if mask is None else weight * mask

    def nbytes(self, out_features: int, in_features: int, kept: int) -> int:
        groups = out_features * group_count(in_features, self.group_size)
        zeros = 0 if self.symmetric else packed_length(groups, self.bit_width)
        return packed_length(kept, self.bit_width) + groups * SCALE_BYTES + zeros

    @classmethod
    def from_level(cls, level: Level, plan: CompressionPlan) -> IntegerGrid:
        group_size = plan.group_size if level.group_size is None else level.group_size
        return cls(level.bits, group_size, plan.symmetric, plan.quantization)

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> IntegerGrid:
        if entry.get("levels"):
            raise ValueError("non-uniform integer grids are not stored by this autocompress")
        return cls(int(entry["bits"]), int(entry["group_size"]), bool(entry["symmetric"]))
