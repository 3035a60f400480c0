"""Bit packing: unsigned integer codes of 1 to 8 bits in a byte stream, and boolean masks as 1-bit streams.

The bit order is little-endian: value i occupies stream bits [i·bits, (i+1)·bits), least significant bit first,
and stream bit k is bit k % 8 of byte k // 8 (numpy's `packbits(..., bitorder="little")` for 1 bit).
`n` values take exactly ceil(n·bits / 8) bytes. Eight values of `bits` bits fill exactly `bits` bytes, so
packing works on groups of eight values at a time (one 64-bit word each), in chunks that bound the memory used.
"""

from __future__ import annotations

import math

import torch

PACKABLE_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
_CHUNK = 1 << 22  # values per chunk; a multiple of 8, so chunks start on byte boundaries


def packed_length(count: int, bits: int) -> int:
    """Bytes that `count` values of `bits` bits take."""
    return math.ceil(count * bits / 8)


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"can pack 1 to 8 bits per value, got {bits}")


def _pack_chunk(values: torch.Tensor, bits: int) -> torch.Tensor:
    padding = -len(values) % 8
    groups = torch.nn.functional.pad(values.to(torch.int64), (0, padding)).reshape(-1, 8)
    shifts = torch.arange(8, device=values.device, dtype=torch.int64) * bits
    words = (groups << shifts).sum(-1, keepdim=True)  # at most 64 bits; 8-bit values wrap harmlessly below
    byte_shifts = torch.arange(bits, device=values.device, dtype=torch.int64) * 8
    return ((words >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def _unpack_chunk(data: torch.Tensor, bits: int) -> torch.Tensor:
    padding = -len(data) % bits
    groups = torch.nn.functional.pad(data.to(torch.int64), (0, padding)).reshape(-1, bits)
    byte_shifts = torch.arange(bits, device=data.device, dtype=torch.int64) * 8
    words = (groups << byte_shifts).sum(-1, keepdim=True)
    shifts = torch.arange(8, device=data.device, dtype=torch.int64) * bits
    return ((words >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes in [0, 2^bits), any shape and integer dtype, flattened row-major into a uint8 stream."""
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex:
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    values = codes.reshape(-1)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to pack at {bits} bits")
    if bits == 8:
        return values.to(torch.uint8).clone()
    chunks = [_pack_chunk(values[start : start + _CHUNK], bits) for start in range(0, len(values), _CHUNK)]
    packed = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8, device=codes.device)
    return packed[: packed_length(len(values), bits)]


def unpack(data: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """The `count` codes (uint8, flat) that `pack` wrote into `data` at `bits` bits."""
    _check_bits(bits)
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"packed data must be a flat uint8 tensor, got {data.dtype} of shape {tuple(data.shape)}")
    expected = packed_length(count, bits)
    if len(data) != expected:
        raise ValueError(f"{count} values of {bits} bits take {expected} bytes, got {len(data)}")
    if bits == 8:
        return data.clone()
    step = _CHUNK * bits // 8  # bytes per chunk of values
    chunks = [_unpack_chunk(data[start : start + step], bits) for start in range(0, len(data), step)]
    values = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8, device=data.device)
    return values[:count]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask, flattened row-major, one bit per position."""
    if mask.dtype != torch.bool:
        raise ValueError(f"a mask must be boolean, got {mask.dtype}")
    return pack(mask.to(torch.uint8), 1)


def unpack_mask(data: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The boolean mask of `shape` that `pack_mask` wrote into `data`."""
    return unpack(data, math.prod(shape), 1).bool().reshape(shape)
