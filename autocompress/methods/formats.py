"""Number formats beside the integer grids: FP8 (E4M3, E5M2), FP4 E2M1 in MXFP4 and NVFP4 blocks, and NF4.

Each format is a registered quantizer whose `QuantizedWeight` dequantizes to exactly the format's representable
values times its scales (computed in float32). Scales are fitted to the kept weights only (a pruned weight is
quantized as 0 and re-masked by the caller).

Elements (the values a code stands for, at unit scale):
- `e4m3`: OCP FP8 E4M3FN: bias 7, no infinities, max ±448, subnormals down to 2^-9, NaN only S.1111.111;
- `e5m2`: OCP FP8 E5M2 (IEEE-like): bias 15, max ±57344, subnormals down to 2^-16, ±inf and NaNs;
- `e2m1`: OCP FP4: {0, 0.5, 1, 1.5, 2, 3, 4, 6} and negatives (0.5 is its one subnormal);
- `nf4`: QLoRA NormalFloat4: the 16 published levels in [-1, 1], 0 exact.

Codes are uint8 indices into a code-ordered `levels` table: for the floating-point elements the code is the
format's own bit pattern (sign bit highest), so `levels[code]` is what hardware reads from those bits (the
tables hold NaN and ±inf at their special codes, which are never produced); NF4's 16 levels are ascending, so
its code order is sorted order (code 7 is 0). Zero is always the positive zero code.

Rounding goes to the representable value nearest to the quotient weight / scale (computed in float32): for the
minifloats by arithmetic (a power-of-two quantum per binade, exact division, torch.round), for NF4 by searching
its table against exact float64 midpoints (`encode_by_table`, which the tests also hold the arithmetic to).
Ties: round half to even (even mantissa, i.e. even code) for the floating-point elements, as IEEE and OCP
specify; for NF4, which has no such rule, toward the level of smaller magnitude. Beyond the largest finite
value every element saturates (E5M2 too, rather than overflow to inf). NaN is refused with ValueError, by the
element functions and by the quantizers, which also refuse ±inf weights.

Scales (see `FORMATS`):
- `fp8-e4m3`, `fp8-e5m2`: amax / max_finite per row (`spec.group_size` -1, the canonical level), per group of
  `group_size` inputs (positive), or per tensor (`PER_TENSOR`, 0); row and group scales are stored in float16,
  a tensor scale in float32 (`QuantizedWeight.tensor_scale`, `scale_format` "none").
- `mxfp4`: blocks of 32, a shared E8M0 scale 2^(floor(log2 amax) − 2) (exponent clamped to [-127, 127]);
  elements above 6 (after the scale) saturate to 6, as the OCP MX specification prescribes.
- `nvfp4`: blocks of 16; tensor_scale = amax_tensor / (6 · 448) in float32; block scale amax_block / (6 ·
  tensor_scale), computed in float64 and rounded once to E4M3 (saturating at 448).
- `nf4`: absmax per block of `spec.group_size` inputs (-1: per row; the canonical level uses 64, as
  bitsandbytes does), stored in float16 (bitsandbytes keeps float32 absmax without double quantization).
A block whose kept weights are all 0 gets scale 1; a positive scale that would round to 0 in its stored type
is stored as that type's smallest positive value. MXFP4 and NVFP4 fix their block size: `spec.group_size` is
ignored for them. Every format checks `spec.bits` against its own bit count and raises ValueError on a mismatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from autocompress.methods.registry import LayerStatistics, QuantizedWeight, QuantSpec, register_quantizer

PER_TENSOR = 0  # spec.group_size for one scale per tensor (FP8 only)
PER_ROW = -1  # spec.group_size for one scale per output row

Ties = Literal["even", "toward-zero"]
ScaleFormat = Literal["float16", "e8m0", "e4m3", "none"]
SCALE_BITS: dict[str, int] = {"float16": 16, "float32": 32, "e8m0": 8, "e4m3": 8, "none": 0}
TENSOR_SCALE_BITS = 32  # a per-tensor scale is one float32

_FLOAT16_TINY = 2.0**-24  # the smallest positive float16 (a subnormal)
_FLOAT16_MAX = 65504.0
_E8M0_MIN_EXPONENT, _E8M0_MAX_EXPONENT = -127, 127  # 0xFF is NaN


def _minifloat(exponent_bits: int, mantissa_bits: int, bias: int) -> list[float]:
    """The magnitude of every bit pattern without its sign, in code order, with IEEE-style subnormals."""
    values = []
    for code in range(1 << (exponent_bits + mantissa_bits)):
        exponent, mantissa = code >> mantissa_bits, code & ((1 << mantissa_bits) - 1)
        if exponent == 0:
            values.append(math.ldexp(mantissa, 1 - bias - mantissa_bits))
        else:
            values.append(math.ldexp((1 << mantissa_bits) + mantissa, exponent - bias - mantissa_bits))
    return values


def _sign_magnitude_levels(magnitudes: list[float]) -> tuple[float, ...]:
    return (*magnitudes, *(-value for value in magnitudes))


@dataclass(frozen=True)
class Element:
    """What a code stands for at unit scale, and how a value is rounded to one."""

    name: str
    bits: int
    levels: tuple[float, ...]  # code-ordered: levels[code], 2^bits entries (NaN/inf at special codes)
    grid: tuple[float, ...]  # the finite values rounding chooses from, ascending (magnitudes if sign_magnitude)
    sign_magnitude: bool  # the top bit is a sign and grid[i] is the magnitude of code i
    ties: Ties
    minifloat: tuple[int, int] | None = None  # (mantissa bits, exponent bias) of a sign-exponent-mantissa float

    @property
    def max(self) -> float:
        return self.grid[-1]

    @property
    def min_positive(self) -> float:
        return min(value for value in self.grid if value > 0)


_E4M3 = _minifloat(4, 3, 7)
_E4M3[0x7F] = math.nan  # E4M3FN: S.1111.111 is NaN, and there are no infinities
_E5M2 = _minifloat(5, 2, 15)
_E5M2[0x7C:] = [math.inf, math.nan, math.nan, math.nan]
_E2M1 = _minifloat(2, 1, 1)
NF4_LEVELS = (  # Dettmers et al. 2023 (QLoRA), as bitsandbytes publishes them
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

ELEMENTS: dict[str, Element] = {
    "e4m3": Element("e4m3", 8, _sign_magnitude_levels(_E4M3), tuple(_E4M3[:0x7F]), True, "even", (3, 7)),
    "e5m2": Element("e5m2", 8, _sign_magnitude_levels(_E5M2), tuple(_E5M2[:0x7C]), True, "even", (2, 15)),
    "e2m1": Element("e2m1", 4, _sign_magnitude_levels(_E2M1), tuple(_E2M1), True, "even", (1, 1)),
    "nf4": Element("nf4", 4, NF4_LEVELS, NF4_LEVELS, False, "toward-zero"),
}


def _element(element: str | Element) -> Element:
    if isinstance(element, Element):
        return element
    if element not in ELEMENTS:
        raise ValueError(f"unknown element format {element!r}; known: {', '.join(ELEMENTS)}")
    return ELEMENTS[element]


def _nearest(values: torch.Tensor, grid: torch.Tensor, ties: Ties) -> torch.Tensor:
    """Index of the grid value (ascending, float64) nearest to each of `values` (float64); beyond the ends,
    the end (saturation). A tie (a value exactly at a midpoint) goes by `ties`."""
    midpoints = (grid[1:] + grid[:-1]) / 2  # exact: grid values are float32 numbers
    index = torch.searchsorted(midpoints, values.contiguous())  # a value at a midpoint lands on the lower side
    inside = index < len(midpoints)
    tie = inside & (values == midpoints[index.clamp(max=len(midpoints) - 1)])
    if ties == "even":
        up = tie & (index % 2 == 1)
    else:  # toward the neighbour of smaller magnitude: the upper one below zero
        up = tie & (grid[(index + 1).clamp(max=len(grid) - 1)].abs() < grid[index].abs())
    return index + up.long()


def _minifloat_magnitude_codes(magnitudes: torch.Tensor, element: Element) -> torch.Tensor:
    """Codes of non-negative values in a minifloat, by arithmetic: in the binade 2^e (subnormals share the
    lowest), the quantum is 2^(e − mantissa bits); magnitude / quantum is exact and torch.round rounds it half to
    even; a carry past the binade's last mantissa moves into the next exponent, as it does in the bit pattern."""
    assert element.minifloat is not None
    mantissa_bits, bias = element.minifloat
    magnitudes = magnitudes.clamp(max=element.max)  # saturation (max is representable, so rounding keeps it)
    exponent = torch.frexp(magnitudes).exponent - 1  # frexp: m · 2^x with m in [0.5, 1); 0 for 0
    exponent = torch.where(magnitudes > 0, exponent, 1 - bias).clamp(min=1 - bias)
    steps = torch.round(magnitudes / _power_of_two(exponent - mantissa_bits))
    return ((exponent + bias) << mantissa_bits).long() + steps.long() - (1 << mantissa_bits)


def encode(values: torch.Tensor, element: str | Element) -> torch.Tensor:
    """The uint8 code of the representable value nearest to each value (unit scale), ties and saturation as
    the element specifies; ±inf saturates to ±max; NaN raises ValueError."""
    element = _element(element)
    if torch.isnan(values).any():
        raise ValueError(f"cannot encode NaN in {element.name}: weights must not be NaN")
    if element.minifloat is None:
        return encode_by_table(values, element)
    values = values if values.dtype == torch.float64 else values.to(torch.float32)
    index = _minifloat_magnitude_codes(values.abs(), element)
    negative = (values < 0) & (index > 0)  # a value rounding to zero takes the positive zero code
    return (index + negative.long() * (1 << (element.bits - 1))).to(torch.uint8)


def encode_by_table(values: torch.Tensor, element: str | Element) -> torch.Tensor:
    """`encode` by searching the sorted table of representable values against exact midpoints (float64):
    NF4's only way, and the reference the minifloats' arithmetic is tested against."""
    element = _element(element)
    if torch.isnan(values).any():
        raise ValueError(f"cannot encode NaN in {element.name}: weights must not be NaN")
    values = values.to(torch.float64)
    grid = torch.tensor(element.grid, dtype=torch.float64, device=values.device)
    if not element.sign_magnitude:
        return _nearest(values, grid, element.ties).to(torch.uint8)
    index = _nearest(values.abs(), grid, element.ties)
    negative = (values < 0) & (index > 0)  # a value rounding to zero takes the positive zero code
    return (index + negative.long() * (1 << (element.bits - 1))).to(torch.uint8)


def levels_tensor(element: str | Element, device: torch.device | str | None = None) -> torch.Tensor:
    """The element's code-ordered lookup table, float32."""
    return torch.tensor(_element(element).levels, dtype=torch.float32, device=device)


def decode(codes: torch.Tensor, element: str | Element) -> torch.Tensor:
    """The float32 value of each code."""
    return levels_tensor(element, codes.device)[codes.long()]


def round_to(values: torch.Tensor, element: str | Element) -> torch.Tensor:
    """Each value rounded to the element's nearest representable value (unit scale), as float32."""
    return decode(encode(values, element), element)


@dataclass(frozen=True)
class Format:
    """A quantization level name, its element and how it is scaled and stored."""

    name: str  # the canonical level name, and the registered quantizer's
    element: Element
    scale_format: ScaleFormat  # the type of the per-block (or per-row) scales
    block_size: int | None  # fixed by the format; None: set by spec.group_size
    default_group_size: int  # the group size of the canonical level (-1: per row)
    tensor_scale: bool  # always one float32 per-tensor scale besides the block scales
    allows_per_tensor: bool = False  # group_size PER_TENSOR: one float32 scale for the whole tensor

    @property
    def bits(self) -> int:
        return self.element.bits

    @property
    def scale_bits(self) -> int:
        return SCALE_BITS[self.scale_format]


FORMATS: dict[str, Format] = {
    "fp8-e4m3": Format("fp8-e4m3", ELEMENTS["e4m3"], "float16", None, PER_ROW, False, allows_per_tensor=True),
    "fp8-e5m2": Format("fp8-e5m2", ELEMENTS["e5m2"], "float16", None, PER_ROW, False, allows_per_tensor=True),
    "mxfp4": Format("mxfp4", ELEMENTS["e2m1"], "e8m0", 32, 32, False),
    "nvfp4": Format("nvfp4", ELEMENTS["e2m1"], "e4m3", 16, 16, True),
    "nf4": Format("nf4", ELEMENTS["nf4"], "float16", None, 64, False),
}


def _format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


def layout(name: str, in_features: int, group_size: int | None = None) -> tuple[int, int]:
    """(stored group size, groups per row) of a format's scales for rows of `in_features` inputs.

    The stored group size is -1 for one scale per row (and for `PER_TENSOR`, whose per-row scales are all
    ones and not stored), else the inputs per block; the last block of a row may be shorter.
    `group_size` None means the format's canonical one.
    """
    fmt = _format(name)
    if fmt.block_size is not None:
        size = fmt.block_size
    else:
        size = fmt.default_group_size if group_size is None else group_size
        if size == PER_TENSOR and fmt.allows_per_tensor:
            return PER_ROW, 1
        if size != PER_ROW and size < 1:
            allowed = "a positive integer, -1 (per row)" + (" or 0 (per tensor)" if fmt.allows_per_tensor else "")
            raise ValueError(f"{name}: group_size must be {allowed}, got {size}")
    if size == PER_ROW or size >= in_features:
        return (PER_ROW if size == PER_ROW else in_features), 1
    return size, math.ceil(in_features / size)


# --- scales -----------------------------------------------------------------------------------------------------


def _float16_scale(scale: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """A float32 scale rounded to float16 (to nearest even), kept positive; 1 for an all-zero block."""
    stored = scale.clamp(max=_FLOAT16_MAX).to(torch.float16).to(torch.float32)
    stored = torch.where(stored > 0, stored, torch.full_like(stored, _FLOAT16_TINY))
    return torch.where(amax > 0, stored, torch.ones_like(stored))


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent for integer exponents in [-127, 127], exactly, as float32 (2^-127 is a subnormal)."""
    exponent = exponent.to(torch.int32)
    bits = torch.where(exponent >= -126, (exponent + 127) << 23, torch.full_like(exponent, 1 << 22))
    return bits.view(torch.float32)


def e8m0_scale(amax: torch.Tensor, element: str | Element = "e2m1") -> torch.Tensor:
    """The OCP MX shared scale 2^(floor(log2 amax) − emax_element), float32; 1 where amax is 0."""
    emax = math.floor(math.log2(_element(element).max))
    exponent = torch.frexp(amax.to(torch.float32)).exponent - 1 - emax  # frexp: amax = m · 2^e, m in [0.5, 1)
    exponent = exponent.clamp(_E8M0_MIN_EXPONENT, _E8M0_MAX_EXPONENT)
    return _power_of_two(torch.where(amax > 0, exponent, torch.zeros_like(exponent)))


def nvfp4_scales(amax_blocks: torch.Tensor, amax_tensor: float) -> tuple[torch.Tensor, float]:
    """(E4M3 block scales as float32, the float32 tensor scale) of NVFP4 for the given absolute maxima."""
    tensor_scale = float(torch.tensor(amax_tensor, dtype=torch.float32) / (6 * 448))
    if tensor_scale == 0:
        tensor_scale = 1.0
    ratio = amax_blocks.to(torch.float64) / (6 * tensor_scale)
    block = round_to(ratio, "e4m3")
    block = torch.where(block > 0, block, torch.full_like(block, ELEMENTS["e4m3"].min_positive))
    return torch.where(amax_blocks > 0, block, torch.ones_like(block)), tensor_scale


def scale_codes(scale: torch.Tensor, scale_format: str) -> torch.Tensor:
    """The uint8 bytes an artifact stores for E8M0 (biased exponent) or E4M3 (bit pattern) scales."""
    if scale_format == "e8m0":
        exponent = torch.frexp(scale.to(torch.float32)).exponent - 1
        if not torch.equal(_power_of_two(exponent.clamp(-127, 127)), scale.to(torch.float32)):
            raise ValueError("E8M0 scales must be powers of two in [2^-127, 2^127]")
        return (exponent + 127).to(torch.uint8)
    if scale_format == "e4m3":
        codes = encode(scale, "e4m3")
        if not torch.equal(decode(codes, "e4m3"), scale.to(torch.float32)):
            raise ValueError("E4M3 scales must be E4M3 values")
        return codes
    raise ValueError(f"scale format {scale_format!r} is stored as a float, not as codes")


def scales_from_codes(codes: torch.Tensor, scale_format: str) -> torch.Tensor:
    """The inverse of `scale_codes`: float32 scales."""
    if scale_format == "e8m0":
        return _power_of_two(codes.to(torch.int32) - 127)
    if scale_format == "e4m3":
        return decode(codes, "e4m3")
    raise ValueError(f"scale format {scale_format!r} is stored as a float, not as codes")


# --- quantizers -------------------------------------------------------------------------------------------------


def quantize_format(weight: torch.Tensor, mask: torch.Tensor | None, spec: QuantSpec, name: str) -> QuantizedWeight:
    """Quantize `weight` (out × in) to the named format, fitting scales to the weights `mask` keeps."""
    fmt = _format(name)
    if spec.bits != fmt.bits:
        raise ValueError(f"{name} stores {fmt.bits}-bit values, but the plan asks for {spec.bits} bits")
    kept = torch.ones_like(weight, dtype=torch.bool) if mask is None else mask.to(weight.device, torch.bool)
    weight = torch.where(kept, weight.to(torch.float32), 0.0)
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name}: weights must be finite, found NaN or infinity")
    out_features, in_features = weight.shape
    per_tensor = fmt.allows_per_tensor and spec.group_size == PER_TENSOR
    group_size, groups = layout(name, in_features, None if fmt.block_size else spec.group_size)
    size = in_features if group_size == PER_ROW else group_size
    grouped = F.pad(weight, (0, groups * size - in_features)).reshape(out_features, groups, size)
    amax = grouped.abs().amax(-1)  # pruned weights and padding are 0 here
    tensor_scale = None
    if per_tensor:
        tensor_scale = float(amax.max() / fmt.element.max) if amax.numel() and amax.max() > 0 else 1.0
        tensor_scale = max(tensor_scale, 2.0**-149)  # the smallest float32, should amax / max underflow
        scale = torch.ones_like(amax)
        divisor = torch.full_like(amax, tensor_scale)
    elif fmt.scale_format == "float16":
        scale = _float16_scale(amax / fmt.element.max, amax)
        divisor = scale
    elif fmt.scale_format == "e8m0":
        scale = e8m0_scale(amax, fmt.element)
        divisor = scale
    else:  # e4m3 block scales under a float32 tensor scale
        scale, tensor_scale = nvfp4_scales(amax, float(amax.max()) if amax.numel() else 0.0)
        divisor = scale * torch.tensor(tensor_scale, dtype=torch.float32, device=scale.device)
    codes = encode(grouped / divisor.unsqueeze(-1), fmt.element).reshape(out_features, -1)[:, :in_features]
    return QuantizedWeight(
        codes=codes,
        scale=scale.to(torch.float16 if fmt.scale_format == "float16" and not per_tensor else torch.float32),
        zero=torch.zeros_like(scale),
        bits=fmt.bits,
        group_size=group_size,
        symmetric=False,  # zero is 0, not the 2^(bits-1) of a symmetric integer grid
        levels=levels_tensor(fmt.element, weight.device),
        format=name,
        scale_format="none" if per_tensor else fmt.scale_format,
        tensor_scale=tensor_scale,
    )


def _register(name: str) -> None:
    def quantizer(
        weight: torch.Tensor, mask: torch.Tensor | None, spec: QuantSpec, stats: LayerStatistics
    ) -> QuantizedWeight:
        return quantize_format(weight, mask, spec, name)

    quantizer.__name__ = quantizer.__qualname__ = name.replace("-", "_")
    quantizer.__doc__ = f"Round to nearest in {name} (see autocompress.methods.formats)."
    register_quantizer(name)(quantizer)


for _name in FORMATS:
    _register(_name)


# --- honest size ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FormatStorage:
    """Bytes one Linear's quantized weight takes in a format, each tensor rounded up to whole bytes.

    Not included: the bitmask of kept positions of a pruned weight (as for the integer grids), a bias, and the
    levels table, a constant of the format that an artifact names rather than stores.
    """

    codes: int  # the kept weights' codes, bit-packed at the format's bits
    scales: int  # the per-row or per-block scales, at the scale format's bits
    tensor_scale: int  # one float32, for NVFP4 and per-tensor FP8

    @property
    def total(self) -> int:
        return self.codes + self.scales + self.tensor_scale


def format_storage(
    name: str, out_features: int, in_features: int, kept: int | None = None, group_size: int | None = None
) -> FormatStorage:
    """Bytes of a weight of out × in, of which `kept` are stored (all when None), quantized to `name` with
    `group_size` (the canonical level's when None; ignored by MXFP4 and NVFP4, whose blocks are fixed)."""
    fmt = _format(name)
    kept = out_features * in_features if kept is None else kept
    per_tensor = fmt.allows_per_tensor and group_size == PER_TENSOR
    _, groups = layout(name, in_features, group_size)
    scale_count = 0 if per_tensor else out_features * groups
    return FormatStorage(
        codes=math.ceil(kept * fmt.bits / 8),
        scales=math.ceil(scale_count * fmt.scale_bits / 8),
        tensor_scale=TENSOR_SCALE_BITS // 8 if per_tensor or fmt.tensor_scale else 0,
    )


def bits_per_weight(name: str, in_features: int, group_size: int | None = None) -> float:
    """Bits a dense (unpruned) weight costs in the format, scales included, ignoring a per-tensor scale."""
    fmt = _format(name)
    if fmt.allows_per_tensor and group_size == PER_TENSOR:
        return float(fmt.bits)
    _, groups = layout(name, in_features, group_size)
    return fmt.bits + groups * fmt.scale_bits / in_features
