"""The codec base (`Codec`), its registry by kind (`CODECS`) and the functions that go through it: resolve a level,
encode, decode and count a compressed Linear. The families (`codecs.integer`, `codecs.number_formats`) import this
module to register; `autocompress.codecs` imports them, so importing the package registers every codec.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from autocompress.codecs.packing import pack_mask, packed_length, unpack_mask
from autocompress.methods import LayerStatistics, QuantizedWeight, Statistic

if TYPE_CHECKING:
    from autocompress.plan import CompressionPlan, LayerCompression, Level

Entry = dict[str, Any]  # a manifest entry's fields: JSON values


@dataclass
class CompressedLinear:
    """One Linear as a plan leaves it: the weight it computes with, and what its codec stores."""

    weight: torch.Tensor  # the dense-shaped weight the compressed model runs with
    mask: torch.Tensor | None  # kept positions, when pruned
    quantized: QuantizedWeight | None  # codes and scales, when quantized


class Codec(ABC):
    """A stored form of one Linear's weight (subclasses are frozen dataclasses; see the module docstring)."""

    kind: ClassVar[str]  # its key in `CODECS`

    @property
    @abstractmethod
    def name(self) -> str:
        """The level name it stands for, e.g. `int4-g128`."""

    @property
    @abstractmethod
    def bits(self) -> int:
        """Bits of each stored value."""

    @property
    def needs(self) -> frozenset[Statistic]:
        """The calibration statistics `quantize` needs."""
        return frozenset()

    @abstractmethod
    def quantize(
        self, weight: torch.Tensor, mask: torch.Tensor | None, stats: LayerStatistics
    ) -> QuantizedWeight | None:
        """What is stored of a float32 `weight` whose pruned positions (`mask` False) are zero; None: the values."""

    @abstractmethod
    def encode(self, compressed: CompressedLinear, values_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], Entry]:
        """The tensors of the kept positions (the mask is `encode_linear`'s) and the entry fields that decode them;
        unquantized values are stored in `values_dtype`."""

    @abstractmethod
    def decode(
        self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int], mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The float32 weight of `shape` that `encode`'s tensors hold, zero where `mask` is False."""

    @abstractmethod
    def nbytes(self, out_features: int, in_features: int, kept: int) -> int:
        """Bytes of `encode`'s tensors for a weight of out × in of which `kept` positions are stored (16-bit values)."""

    @classmethod
    @abstractmethod
    def from_level(cls, level: Level, plan: CompressionPlan) -> Codec:
        """The codec of a level under the plan-wide options (method, groups, symmetry) it depends on."""

    @classmethod
    @abstractmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> Codec:
        """The codec that decodes an entry `encode` wrote."""


CODECS: dict[str, type[Codec]] = {}


def register(codec: type[Codec]) -> type[Codec]:
    if codec.kind in CODECS:
        raise ValueError(f"a codec of kind {codec.kind!r} is already registered")
    CODECS[codec.kind] = codec
    return codec


def level_kind(level: Level, plan: CompressionPlan) -> str:
    """The `CODECS` kind of a level under `plan`: a bare bit-width is the plan's method, which may be a format."""
    from autocompress.methods.formats import FORMATS

    if level.method is None:
        return "fp16" if level.bits == 16 else "format" if plan.quantization in FORMATS else "int"
    return "format" if level.method in FORMATS else level.method


def resolve(setting: LayerCompression, plan: CompressionPlan) -> Codec:
    """The codec of a unit's setting under `plan`: its level, resolved once."""
    level = setting.level
    kind = level_kind(level, plan)
    if kind not in CODECS:
        raise ValueError(f"precision level {level.name!r}: no codec stores {kind!r} levels here")
    return CODECS[kind].from_level(level, plan)


def codec_of_entry(entry: Mapping[str, Any]) -> Codec:
    """The codec of a manifest entry (`encode_linear`'s), by the fields it holds."""
    kind = entry.get("codec") or ("format" if entry.get("format") else "fp16" if entry["bits"] == 16 else "int")
    if kind not in CODECS:
        raise ValueError(f"no codec of kind {kind!r}")
    return CODECS[kind].from_entry(entry)


def encode_linear(
    codec: Codec, compressed: CompressedLinear, values_dtype: torch.dtype = torch.float16
) -> tuple[dict[str, torch.Tensor], Entry]:
    """Everything one compressed Linear stores: its mask when pruned, then its codec's tensors; and its entry."""
    out_features, in_features = compressed.weight.shape
    mask = compressed.mask
    tensors: dict[str, torch.Tensor] = {}
    entry: Entry = {"shape": [out_features, in_features], "pruned": mask is not None}
    if mask is not None:
        mask = mask.detach().cpu().bool()
        if tuple(mask.shape) != (out_features, in_features):
            raise ValueError(f"mask of shape {tuple(mask.shape)} for a weight of {(out_features, in_features)}")
        tensors["mask"] = pack_mask(mask)
        entry["kept"] = int(mask.sum())
        compressed = CompressedLinear(compressed.weight, mask, compressed.quantized)
    own, fields = codec.encode(compressed, values_dtype)
    return tensors | own, entry | fields


def decode_linear(tensors: Mapping[str, torch.Tensor], entry: Mapping[str, Any]) -> torch.Tensor:
    """The float32 weight, exactly as the compressed model computed with it, of what `encode_linear` stored."""
    shape = (int(entry["shape"][0]), int(entry["shape"][1]))
    mask = unpack_mask(_tensor(tensors, "mask"), shape).to(_device(tensors)) if entry["pruned"] else None
    return codec_of_entry(entry).decode(tensors, shape, mask)


def stored_bytes(codec: Codec, out_features: int, in_features: int, kept: int | None = None) -> int:
    """Bytes `encode_linear` writes for a weight of out × in: all positions (`kept` None), or a mask and `kept`."""
    if kept is None:
        return codec.nbytes(out_features, in_features, out_features * in_features)
    return packed_length(out_features * in_features, 1) + codec.nbytes(out_features, in_features, kept)


def _tensor(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise KeyError(key)  # the caller names the file and the Linear
    return tensors[key]


def _device(tensors: Mapping[str, torch.Tensor]) -> torch.device:
    return next(iter(tensors.values())).device


def scatter_kept(kept: torch.Tensor, shape: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
    """The kept positions' values (flat, row-major) laid out in `shape`, zero where `mask` is False."""
    if mask is None:
        return kept.reshape(shape)
    return torch.zeros(shape, dtype=kept.dtype, device=kept.device).masked_scatter_(mask.to(kept.device), kept)


@register
@dataclass(frozen=True)
class Unquantized(Codec):
    """`fp16`: the kept values themselves, in 16 bits (the model's own dtype in the variant database)."""

    kind: ClassVar[str] = "fp16"

    @property
    def name(self) -> str:
        return "fp16"

    @property
    def bits(self) -> int:
        return 16

    def quantize(self, weight: torch.Tensor, mask: torch.Tensor | None, stats: LayerStatistics) -> None:
        return None

    def encode(self, compressed: CompressedLinear, values_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], Entry]:
        weight = compressed.weight.detach().cpu()
        values = weight.reshape(-1) if compressed.mask is None else weight[compressed.mask]
        return {"values": values.to(values_dtype).contiguous()}, {"bits": 16, "values_dtype": _dtype_name(values_dtype)}

    def decode(
        self, tensors: Mapping[str, torch.Tensor], shape: tuple[int, int], mask: torch.Tensor | None
    ) -> torch.Tensor:
        return scatter_kept(_tensor(tensors, "values"), shape, mask).float()

    def nbytes(self, out_features: int, in_features: int, kept: int) -> int:
        return packed_length(kept, 16)

    @classmethod
    def from_level(cls, level: Level, plan: CompressionPlan) -> Unquantized:
        return cls()

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> Unquantized:
        return cls()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
