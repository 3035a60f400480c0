"""GGUF block quantizers that reproduce llama.cpp's own, byte for byte, with or without an importance matrix.

A GGUF level is one of llama.cpp's tensor types (Q4_K, IQ4_XS, ...). So that a searched plan scores what
`llama-quantize` would write, every quantizer here transcribes the C code of `ggml/src/ggml-quants.c` as
`ggml_quantize_chunk` runs it (`quantize_qX(src, dst, nrow, n_per_row, quant_weights)`): without an importance
matrix the `_ref` path (`quantize_row_q4_K_ref` with `make_qkx2_quants`, ...), with one the `_impl` path
(`quantize_row_q4_K_impl` with `make_qkx3_quants` and `make_qp_quants`, ...).

Byte-exactness rests on doing the same float32 arithmetic in the same order. ggml-base is compiled without
`-march` flags (no FMA contraction: the shipped library has no fused multiply-add), so each C expression maps
to float32 numpy operations evaluated left to right, and every C accumulation loop to a loop of vector adds in
the same order (never `np.sum`, whose pairwise order rounds differently). `nearest_int`'s float trick, float16
rounding (to nearest even), the uint8/int8 wrap-around of C stores and the first-occurrence tie-breaking of
`if (v > max)` scans (which fixes the sign of a zero) are reproduced as well. The candidate-scale searches loop
over their ~20-40 steps; each step works on all blocks of the tensor at once.

A float16 scale that overflows is refused with ValueError: llama.cpp writes inf there and `llama-quantize`'s
row validation then rejects the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

_F32 = np.float32
_QK_K = 256
_GROUP_MAX_EPS = _F32(1e-15)
_KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)
_CHUNK_ELEMENTS = 1 << 20  # rows are quantized in chunks of about this many weights, to bound temporary memory

_Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class BlockType:
    """One ggml tensor type as a quantization level: its block layout, taken from gguf's own size table."""

    name: str
    qtype: gguf.GGMLQuantizationType
    block_size: int
    type_size: int
    uses_importance: bool

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size


def _block_type(name: str, qtype: gguf.GGMLQuantizationType, uses_importance: bool) -> BlockType:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return BlockType(name, qtype, block_size, type_size, uses_importance)


BLOCK_TYPES: dict[str, BlockType] = {
    bt.name: bt
    for bt in (
        _block_type("f16", _Q.F16, False),
        _block_type("bf16", _Q.BF16, False),
        _block_type("q8_0", _Q.Q8_0, False),
        _block_type("q4_0", _Q.Q4_0, True),
        _block_type("q4_1", _Q.Q4_1, True),
        _block_type("q5_0", _Q.Q5_0, True),
        _block_type("q5_1", _Q.Q5_1, True),
        _block_type("q2_k", _Q.Q2_K, True),
        _block_type("q3_k", _Q.Q3_K, True),
        _block_type("q4_k", _Q.Q4_K, True),
        _block_type("q5_k", _Q.Q5_K, True),
        _block_type("q6_k", _Q.Q6_K, True),
        _block_type("iq4_nl", _Q.IQ4_NL, True),
        _block_type("iq4_xs", _Q.IQ4_XS, True),
    )
}
if hasattr(_Q, "MXFP4"):  # GGUF type 39, known to gguf >= 0.17 only
    BLOCK_TYPES["mxfp4"] = _block_type("mxfp4", _Q.MXFP4, False)


def _lookup(name: str) -> BlockType:
    try:
        return BLOCK_TYPES[name]
    except KeyError:
        raise ValueError(f"unknown GGUF block type {name!r}; known: {', '.join(BLOCK_TYPES)}") from None


def fits(name: str, in_features: int) -> bool:
    """Whether rows of `in_features` weights split into whole blocks of this type."""
    return in_features > 0 and in_features % _lookup(name).block_size == 0


def row_bytes(name: str, in_features: int) -> int:
    """Exact bytes of one row of `in_features` weights in this type."""
    bt = _lookup(name)
    if not fits(name, in_features):
        raise ValueError(f"{name} stores rows in blocks of {bt.block_size} weights; {in_features} is not a multiple")
    return in_features // bt.block_size * bt.type_size


def tensor_bytes(name: str, out_features: int, in_features: int) -> int:
    """Exact bytes of an [out_features, in_features] tensor in this type (GGUF adds no per-tensor overhead)."""
    return out_features * row_bytes(name, in_features)


# ---------------------------------------------------------------- the C helpers, as float32 numpy
#
# The searches work on "columns": blocks of n weights laid out as [n, blocks], so that position i of every
# block is one contiguous row. C's loops over a block's positions become Python loops over rows, each one
# vector operation across all blocks; that keeps C's order of accumulation and runs at numpy's full speed
# (reductions along a short last axis, np.where on random masks and searchsorted are all many times slower).


class _ScaleOverflow(ValueError):
    """Raised deep inside a quantizer; `quantize_rows` turns it into a message naming the type."""


def _columns(x: np.ndarray, n: int) -> np.ndarray:
    """Consecutive blocks of n weights (row-major) as columns [n, blocks]."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _seqsum(terms: np.ndarray) -> np.ndarray:
    """`float s = 0; for (i...) s += t[i];` over axis 0, in C's order (and +0, not -0, for all-(-0) terms)."""
    total = terms[0] + _F32(0)
    for term in terms[1:]:
        total += term
    return total


def _runsum(terms: np.ndarray) -> np.ndarray:
    """`float s = t[0]; for (i = 1; ...) s += t[i];` over axis 0."""
    total = terms[0].copy()
    for term in terms[1:]:
        total += term
    return total


def _nint(values: np.ndarray) -> np.ndarray:
    """ggml's `nearest_int`: round half to even through a float32 add, with its bit pattern even out of range."""
    bits = (values.astype(_F32, copy=False) + _F32(12582912.0)).view(np.int32)
    bits &= 0x007FFFFF
    bits -= 0x00400000
    return bits


def _roundf(values: np.ndarray) -> np.ndarray:
    """C's `roundf` (half away from zero); float64 holds every float32 plus one half exactly."""
    wide = values.astype(np.float64)
    return np.trunc(wide + np.copysign(0.5, wide)).astype(np.int32)


def _f16(values: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even); inf would fail llama.cpp's validation, so it is refused."""
    with np.errstate(over="ignore"):
        half = np.asarray(values, dtype=_F32).astype(np.float16)
    if not np.isfinite(half).all():
        raise _ScaleOverflow
    return half


def _f32(half: np.ndarray) -> np.ndarray:
    return half.astype(_F32)


def _bytes(values: np.ndarray, n_blocks: int) -> np.ndarray:
    """A little-endian field array as [n_blocks, its bytes per block]."""
    return np.ascontiguousarray(values).view(np.uint8).reshape(n_blocks, -1)


def _int8(values: np.ndarray) -> np.ndarray:
    """An int stored into int8_t wraps around."""
    return ((values + 128) & 0xFF) - 128


def _select(mask: np.ndarray, new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """`new` in the blocks (columns) where mask holds, else `old`: int32 codes, blended bitwise for speed."""
    keep = -mask.astype(np.int32)
    return (new & keep) | (old & ~keep)


def _first(x: np.ndarray, value: np.ndarray) -> np.ndarray:
    """The first entry of each column equal to `value`: what a strict-comparison C scan keeps (the sign of 0)."""
    index = (x == value).argmax(axis=0)
    return np.take_along_axis(x, index[None], axis=0)[0]


def _first_abs_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`if (fabsf(v) > amax) { amax = fabsf(v); max = v; }` from amax = max = 0: the first largest |v|."""
    ax = np.abs(x)
    amax = ax.max(axis=0)
    index = (ax == amax).argmax(axis=0)
    value = np.take_along_axis(x, index[None], axis=0)[0]
    return amax, np.where(amax > 0, value, _F32(0))


def _positive_max(x: np.ndarray) -> np.ndarray:
    """`if (v > m) m = v;` from m = 0 over axis 0: +0 (not -0) when nothing is positive."""
    high = x.max(axis=0)
    return np.where(high > 0, high, _F32(0))


def _make_qx_quants(x: np.ndarray, nmax: int, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """`make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`: symmetric codes in [0, 2·nmax), best of 19 scales."""
    amax, vmax = _first_abs_max(x)
    w = x * x if weights is None else weights
    wx = w * x

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        codes = np.clip(_nint(iscale * x), -nmax, nmax - 1)
        level = codes.astype(_F32)
        return codes, _seqsum(wx * level), _seqsum((w * level) * level)

    with np.errstate(all="ignore"):
        codes, sumlx, suml2 = trial(_F32(-nmax) / vmax)
        scale = np.where(suml2 != 0, sumlx / suml2, _F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            cand, slx, sl2 = trial(-(_F32(nmax) + _F32(0.1) * _F32(step)) / vmax)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            codes = _select(better, cand, codes)
            scale = np.where(better, slx / sl2, scale)
            best = np.where(better, scale * slx, best)
    zero = amax < _GROUP_MAX_EPS
    return np.where(zero, _F32(0), scale), np.where(zero, 0, codes + nmax)


def _refine(
    x: np.ndarray, w: np.ndarray, codes: np.ndarray, lo: int, hi: int, wrap: bool, need_sl2: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The coordinate descent of `make_q3_quants` and `make_qp_quants`: up to 5 passes over a block's codes.

    Each code moves to the one that, the others fixed, maximizes (Σw·x·l)² / Σw·l² (the weighted projection).
    `wrap`: codes are stored as uint8 (make_qp_quants), while the starting sums use the unwrapped ints.
    `need_sl2`: make_qp_quants also requires the remaining Σw·l² > 0 before trying a move.
    """
    wx = w * x
    level = codes.astype(_F32)
    sumlx = _seqsum(wx * level)
    suml2 = _seqsum((w * level) * level)
    if wrap:
        codes = codes & 0xFF
    active = np.ones(x.shape[1], dtype=bool)
    for _ in range(5):
        changed = np.zeros(x.shape[1], dtype=bool)
        for i in range(len(x)):
            old = codes[i].astype(_F32)
            slx = sumlx - wx[i] * old
            sl2 = suml2 - (w[i] * old) * old
            take = active & (slx > 0)
            if need_sl2:
                take &= sl2 > 0
            new = np.clip(_nint((x[i] * sl2) / slx), lo, hi)
            take &= new != codes[i]
            level = new.astype(_F32)
            slx = slx + wx[i] * level
            sl2 = sl2 + (w[i] * level) * level
            if not need_sl2:
                take &= sl2 > 0
            take &= (slx * slx) * suml2 > (sumlx * sumlx) * sl2
            codes[i] = np.where(take, new & 0xFF if wrap else new, codes[i])
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
            changed |= take
        active &= changed
        if not active.any():
            break
    return codes, sumlx, suml2


def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """`make_q3_quants(n, nmax, x, L, do_rmse=true)`: x²-weighted codes refined one at a time."""
    amax, vmax = _first_abs_max(x)
    with np.errstate(all="ignore"):
        codes = np.clip(_nint((_F32(-nmax) / vmax) * x), -nmax, nmax - 1)
        codes, sumlx, suml2 = _refine(x, x * x, codes, -nmax, nmax - 1, wrap=False, need_sl2=False)
        scale = np.where(suml2 > 0, sumlx / suml2, _F32(0))
    zero = amax < _GROUP_MAX_EPS
    return np.where(zero, _F32(0), scale), np.where(zero, 0, codes + nmax)


def _make_qkx_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`make_qkx2_quants` / `make_qkx3_quants` (the same with weights given): affine codes in [0, nmax].

    Returns (scale, the_min, codes); the block reads back as scale·code − the_min.
    """
    low = _first(x, x.min(axis=0))
    high = x.max(axis=0)
    sum_w = _runsum(weights)
    sum_x = _runsum(weights * x)
    low = np.where(low > 0, _F32(0), low)
    flat = high <= low

    def error(scale: np.ndarray, offset: np.ndarray, level: np.ndarray) -> np.ndarray:
        diff = scale * level  # then ((scale·l) + min) − x, |·| or squared, times w: in place, in C's order
        diff += offset
        diff -= x
        if use_mad:
            np.abs(diff, out=diff)
        else:
            diff *= diff
        diff *= weights
        return _seqsum(diff)

    with np.errstate(all="ignore"):
        iscale = _F32(nmax) / (high - low)
        scale = _F32(1) / iscale
        codes = np.clip(_nint(iscale * (x - low)), 0, nmax)
        best = error(scale, low, codes.astype(_F32))
        offset = low  # C's `min`: an accepted step moves it, and later steps search from there
        for step in range(nstep + 1):
            iscale = ((_F32(rmin) + _F32(rdelta) * _F32(step)) + _F32(nmax)) / (high - offset)
            shifted = x - offset
            shifted *= iscale
            cand = np.clip(_nint(shifted), 0, nmax)
            level = cand.astype(_F32)
            wl = weights * level
            sum_l = _seqsum(wl)
            sum_l2 = _seqsum(wl * level)
            sum_xl = _seqsum(np.multiply(wl, x, out=wl))
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clamp = this_min > 0
            this_min = np.where(clamp, _F32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, this_min, level)
            better = (det > 0) & (cur < best)
            codes = _select(better, cand, codes)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            offset = np.where(better, this_min, offset)
    return np.where(flat, _F32(0), scale), -np.where(flat, low, offset), np.where(flat, 0, codes)


def _make_qp_quants(x: np.ndarray, nmax: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`make_qp_quants(n, nmax, x, L, quant_weights)`: the super-block quantization of sub-block scales/mins."""
    vmax = np.maximum(_F32(0), x.max(axis=0))
    with np.errstate(all="ignore"):
        iscale = _F32(nmax) / vmax
        scale = _F32(1) / iscale
        diff = x - scale * (_nint(iscale * x) & 0xFF).astype(_F32)
        best = _seqsum((weights * diff) * diff)
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = (_F32(0.1) * _F32(step) + _F32(nmax)) / vmax
            scale_is = _F32(1) / iscale_is
            diff = x - scale_is * np.minimum(nmax, _nint(iscale_is * x)).astype(_F32)
            mse = _seqsum((weights * diff) * diff)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_is, iscale)
        codes = np.minimum(nmax, _nint(iscale * x))
        codes, sumlx, suml2 = _refine(x, weights, codes, np.iinfo(np.int32).min, nmax, wrap=True, need_sl2=True)
        scale = np.where(suml2 > 0, sumlx / suml2, _F32(0))
    zero = vmax < _GROUP_MAX_EPS
    return np.where(zero, _F32(0), scale), np.where(zero, 0, codes)


def _nearest_tables(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each integer k in [-128, 127]: the upper index `mu` that best_index_int8's binary search ends on for
    any x in [k, k + 1) (clamped to [1, n-1]), and the table entries below and at it."""
    grid = np.arange(-128, 128)
    upper = np.clip((values[None, :] <= grid[:, None]).sum(axis=1), 1, len(values) - 1).astype(np.int32)
    table = values.astype(_F32)
    return upper, table[upper - 1], table[upper]


_IQ4NL_TABLES = _nearest_tables(_KVALUES_IQ4NL)


def _best_index_iq4nl(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`best_index_int8(16, kvalues_iq4nl, x)` and the entry it picks: the upper one unless strictly nearer below.

    The table holds integers, so where the binary search ends depends on floor(x) only (NaN ends at the top,
    as in C); the picked entry is formed arithmetically, exact on these small integers.
    """
    upper, below, above = _IQ4NL_TABLES
    key = np.fmax(np.fmin(np.floor(x), _F32(127)), _F32(-128)).astype(np.int32)
    key += 128
    lo, hi = np.take(below, key), np.take(above, key)
    lower = (x - lo) < (hi - x)
    return np.take(upper, key) - lower, hi - lower * (hi - lo)


def _requantize(x: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, lo: int, hi: int, codes: np.ndarray):
    """The final pass of the K-quants: codes against the stored (rounded) sub-block scales, shifted by -lo.

    Sub-blocks whose stored scale is zero keep the codes of the search, as in C (`if (!d) continue;`).
    """
    with np.errstate(all="ignore"):
        shifted = x if offset is None else x + offset
        fresh = np.clip(_nint(shifted / scale), lo, hi) - lo
    return np.where(scale == 0, codes, fresh)


# ---------------------------------------------------------------- bit layouts (codes as [blocks, n])


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Blocks of 32 4-bit codes (along the last axis) as 16 bytes: code j in the low nibble, code j + 16 in the
    high one."""
    pairs = codes.reshape(*codes.shape[:-1], -1, 2, 16)
    return (pairs[..., 0, :] | (pairs[..., 1, :] << 4)).reshape(*codes.shape[:-1], -1).astype(np.uint8)


def fifth_bits(codes: np.ndarray) -> np.ndarray:
    """Bit 4 of each of a block's 32 codes (the last axis), as the little-endian uint32 `qh`."""
    return np.packbits(((codes >> 4) & 1).astype(np.uint8), axis=-1, bitorder="little")


def _pack_2bit(codes: np.ndarray) -> np.ndarray:
    """K-quant `qs` of 2-bit codes: byte 32·h + l holds codes 128·h + l + 32·k at bits 2k."""
    quarters = codes.reshape(len(codes), 2, 4, 32)
    packed = quarters[:, :, 0] | quarters[:, :, 1] << 2 | quarters[:, :, 2] << 4 | quarters[:, :, 3] << 6
    return packed.reshape(len(codes), 64).astype(np.uint8)


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12 bytes of 6-bit scales and mins of Q4_K/Q5_K ([blocks, 8] each), with C's uint8 truncation."""
    packed = np.zeros((len(ls), 12), dtype=np.int64)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return (packed & 0xFF).astype(np.uint8)


def _unpack_k4_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`get_scale_min_k4` for all 8 sub-blocks: the requantization reads back what was stored."""
    q = packed.astype(np.int64)
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def _pack_k3_scales(levels: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes of 6-bit scales (levels in [0, 64)): low nibbles, then 2-bit high parts four by four."""
    packed = np.zeros((len(levels), 12), dtype=np.int64)
    packed[:, :8] = (levels[:, :8] & 0xF) | ((levels[:, 8:] & 0xF) << 4)
    high = (levels >> 4).reshape(len(levels), 4, 4)
    packed[:, 8:] = high[:, 0] | high[:, 1] << 2 | high[:, 2] << 4 | high[:, 3] << 6
    return (packed & 0xFF).astype(np.uint8)


def _blocks(codes: np.ndarray, n_blocks: int) -> np.ndarray:
    """Column codes [n, sub-blocks] back to [blocks, weights per block], row-major."""
    return np.ascontiguousarray(codes.T).reshape(n_blocks, -1)


# ---------------------------------------------------------------- one function per type: rows [R, K] -> blocks


def _row_weights(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """`qw[j]·sqrt(σ² + x[j]²)` with σ² = Σx²/n_per_row: the weighting of the 32-block `_impl` quantizers."""
    xt = np.ascontiguousarray(x.T)
    sigma2 = _seqsum(xt * xt) / _F32(x.shape[1])
    return _columns(qw[None, :] * np.sqrt(sigma2[:, None] + x * x), 32)


def _q8_0(x: np.ndarray, _qw: np.ndarray | None) -> np.ndarray:
    xc = _columns(x, 32)
    d = np.abs(xc).max(axis=0) / _F32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, _F32(1) / d, _F32(0))
    qs = _int8(_roundf(xc * inv)).astype(np.int8)
    return np.concatenate([_bytes(_f16(d), len(d)), _blocks(qs, len(d)).view(np.uint8)], axis=1)


def _symmetric_32(x: np.ndarray, qw: np.ndarray | None, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0/Q5_0: (d, codes in [0, 2·nmax)) with w = d·(code − nmax)."""
    xc = _columns(x, 32)
    if qw is not None:
        d, codes = _make_qx_quants(xc, nmax, _row_weights(x, qw))
        return _f16(d), _blocks(codes, len(d))
    _, vmax = _first_abs_max(xc)
    d = vmax / _F32(-nmax)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, _F32(1) / d, _F32(0))
    codes = np.minimum(2 * nmax - 1, np.trunc(xc * inv + _F32(nmax + 0.5)).astype(np.int32))
    return _f16(d), _blocks(codes, len(d))


def _q4_0(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, codes = _symmetric_32(x, qw, 8)
    return np.concatenate([_bytes(d, len(d)), pack_nibbles(codes)], axis=1)


def _q5_0(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, codes = _symmetric_32(x, qw, 16)
    return np.concatenate([_bytes(d, len(d)), fifth_bits(codes), pack_nibbles(codes & 0xF)], axis=1)


def _affine_32(x: np.ndarray, qw: np.ndarray | None, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1/Q5_1: (d, m, codes) with w = d·code + m, from the block range or, weighted, from make_qkx3_quants."""
    xc = _columns(x, 32)
    if qw is not None:
        d, the_min, codes = _make_qkx_quants(xc, _row_weights(x, qw), nmax, -0.9, 0.05, 36, False)
        return _f16(d), _f16(-the_min), _blocks(codes, len(d))
    low = _first(xc, xc.min(axis=0))
    d = (_first(xc, xc.max(axis=0)) - low) / _F32(nmax)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, _F32(1) / d, _F32(0))
    codes = np.trunc((xc - low) * inv + _F32(0.5)).astype(np.int32) & 0xFF
    if nmax == 15:  # Q4_1 clamps with MIN(15, ...), Q5_1 does not
        codes = np.minimum(15, codes)
    return _f16(d), _f16(low), _blocks(codes, len(d))


def _q4_1(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, m, codes = _affine_32(x, qw, 15)
    return np.concatenate([_bytes(d, len(d)), _bytes(m, len(d)), pack_nibbles(codes)], axis=1)


def _q5_1(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, m, codes = _affine_32(x, qw, 31)
    low = pack_nibbles(codes & 0xF)
    return np.concatenate([_bytes(d, len(d)), _bytes(m, len(d)), fifth_bits(codes), low], axis=1)


def _superblocks(x: np.ndarray, qw: np.ndarray | None, sub: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Rows as (Σx² per super-block of 256, sub-block columns [sub, blocks], importance columns alike)."""
    xs = x.reshape(-1, _QK_K)
    whole = _columns(xs, _QK_K)
    sumx2 = _seqsum(whole * whole)
    if qw is None:
        return sumx2, _columns(xs, sub), None
    return sumx2, _columns(xs, sub), _columns(np.broadcast_to(qw, x.shape), sub)


def _by_superblock(values: np.ndarray, n_blocks: int) -> np.ndarray:
    """Per-sub-block values [blocks·k] as columns [k, blocks] for the super-block's own search."""
    return np.ascontiguousarray(values.reshape(n_blocks, -1).T)


def _q2_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    sumx2, xc, qc = _superblocks(x, qw, 16)
    nb = len(sumx2)
    if qc is None:
        scales, mins, codes = _make_qkx_quants(xc, np.abs(xc), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
        max_scale = _positive_max(scales.T)
        max_min = _positive_max(mins.T)
        with np.errstate(divide="ignore", invalid="ignore"):
            ls = np.where(max_scale[:, None] > 0, _nint((_F32(15) / max_scale)[:, None] * scales), 0)
            lm = np.where(max_min[:, None] > 0, _nint((_F32(15) / max_min)[:, None] * mins), 0)
        d = _f16(np.where(max_scale > 0, max_scale / _F32(15), _F32(0)))
        dmin = _f16(np.where(max_min > 0, max_min / _F32(15), _F32(0)))
    else:
        sigma2 = sumx2 / _F32(_QK_K)
        weight = qc * np.sqrt(np.repeat(sigma2, 16) + xc * xc)
        sw = _by_superblock(_seqsum(weight), nb)
        scales, mins, codes = _make_qkx_quants(xc, weight, 3, -0.9, 0.05, 36, False)
        dm, ls = _make_qp_quants(_by_superblock(scales, nb), 15, sw)
        mm, lm = _make_qp_quants(_by_superblock(mins, nb), 15, sw)
        d, dmin, ls, lm = _f16(dm), _f16(mm), ls.T, lm.T
    packed = ((ls & 0xFF) | (lm << 4)) & 0xFF
    scale = (_f32(d)[:, None] * (packed & 0xF).astype(_F32)).reshape(-1)
    offset = (_f32(dmin)[:, None] * (packed >> 4).astype(_F32)).reshape(-1)
    codes = _blocks(_requantize(xc, scale, offset, 0, 3, codes), nb)
    return np.concatenate([packed.astype(np.uint8), _pack_2bit(codes), _bytes(d, nb), _bytes(dmin, nb)], axis=1)


def _q3_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    sumx2, xc, qc = _superblocks(x, qw, 16)
    nb = len(sumx2)
    if qc is None:
        scales, codes = _make_q3_quants(xc, 4)
        scales = _by_superblock(scales, nb)
        _, max_scale = _first_abs_max(scales)
        nonzero = max_scale != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = _F32(-32) / max_scale
            levels = np.clip(_int8(_nint(iscale * scales)), -32, 31) + 32
            d = _f16(np.where(nonzero, _F32(1) / iscale, _F32(0)))
        levels = np.where(nonzero, levels, 0).T
    else:
        sigma2 = (_F32(2) * sumx2) / _F32(_QK_K)
        weight = qc * np.sqrt(np.repeat(sigma2, 16) + xc * xc)
        scales, codes = _make_qx_quants(xc, 4, weight)
        d_block, levels = _make_qx_quants(_by_superblock(scales, nb), 32, _by_superblock(_seqsum(weight), nb))
        d, levels = _f16(d_block), levels.T
    scale = (_f32(d)[:, None] * (levels - 32).astype(_F32)).reshape(-1)  # what the packed 6-bit scales decode to
    codes = _blocks(_requantize(xc, scale, None, -4, 3, codes), nb)
    high = (codes > 3).reshape(nb, 8, 32).astype(np.uint8)
    hmask = sum(high[:, k] << k for k in range(8)).astype(np.uint8)
    return np.concatenate([hmask, _pack_2bit(codes & 3), _pack_k3_scales(levels), _bytes(d, nb)], axis=1)


def _k4_scales(
    x: np.ndarray, qw: np.ndarray | None, nmax: int, ref_search: tuple[float, float, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K up to the bit layout of the codes: (d, dmin, packed scales, requantized codes [blocks, 256])."""
    sumx2, xc, qc = _superblocks(x, qw, 32)
    nb = len(sumx2)
    if qc is None:
        av_x = np.sqrt(_seqsum(xc * xc) / _F32(32))
        scales, mins, codes = _make_qkx_quants(xc, av_x + np.abs(xc), nmax, *ref_search, False)
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
        max_scale, max_min = _positive_max(scales.T), _positive_max(mins.T)
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0))
            inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0))
        ls = np.minimum(63, _nint(inv_scale[:, None] * scales) & 0xFF)
        lm = np.minimum(63, _nint(inv_min[:, None] * mins) & 0xFF)
        d, dmin = _f16(max_scale / _F32(63)), _f16(max_min / _F32(63))
    else:
        sigma2 = (_F32(2) * sumx2) / _F32(_QK_K)
        weight = qc * np.sqrt(np.repeat(sigma2, 8) + xc * xc)
        sw = _by_superblock(_seqsum(weight), nb)
        scales, mins, codes = _make_qkx_quants(xc, weight, nmax, -0.9, 0.05, 36, False)
        d_block, ls = _make_qp_quants(_by_superblock(scales, nb), 63, sw)
        m_block, lm = _make_qp_quants(_by_superblock(mins, nb), 63, sw)
        ls, lm = ls.T, lm.T
        if nmax == 31:  # quantize_row_q5_K_impl clamps, quantize_row_q4_K_impl does not
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)
        d, dmin = _f16(d_block), _f16(m_block)
    packed = _pack_k4_scales(ls, lm)
    sc, mn = _unpack_k4_scales(packed)
    scale = (_f32(d)[:, None] * sc.astype(_F32)).reshape(-1)
    offset = (_f32(dmin)[:, None] * mn.astype(_F32)).reshape(-1)
    return d, dmin, packed, _blocks(_requantize(xc, scale, offset, 0, nmax, codes), nb)


def _q4_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, dmin, packed, codes = _k4_scales(x, qw, 15, (-1.0, 0.1, 20))
    nb = len(d)
    pairs = codes.reshape(nb, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(nb, 128).astype(np.uint8)
    return np.concatenate([_bytes(d, nb), _bytes(dmin, nb), packed, qs], axis=1)


def _q5_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    d, dmin, packed, codes = _k4_scales(x, qw, 31, (-0.5, 0.1, 15))
    nb = len(d)
    pairs = codes.reshape(nb, 4, 2, 32)
    qs = ((pairs[:, :, 0] & 0xF) | ((pairs[:, :, 1] & 0xF) << 4)).reshape(nb, 128).astype(np.uint8)
    high = (pairs >> 4) & 1  # [blocks, chunk n, half h, 32] -> bit 2n + h of qh[j]
    qh = sum(high[:, n, h] << (2 * n + h) for n in range(4) for h in range(2)).astype(np.uint8)
    return np.concatenate([_bytes(d, nb), _bytes(dmin, nb), packed, qh, qs], axis=1)


def _q6_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    sumx2, xc, qc = _superblocks(x, qw, 16)
    nb = len(sumx2)
    scales, codes = _make_qx_quants(xc, 32, qc)  # the raw importance: quantize_row_q6_K_impl skips the σ² term
    scales = _by_superblock(scales, nb)
    max_abs, max_scale = _first_abs_max(scales)
    zero = max_abs < _GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = _F32(-128) / max_scale
        d = _f16(np.where(zero, _F32(0), _F32(1) / iscale))
        levels = np.where(zero, 0, _int8(np.minimum(127, _nint(iscale * scales)))).T
    scale = (_f32(d)[:, None] * levels.astype(_F32)).reshape(-1)
    codes = _blocks(_requantize(xc, scale, None, -32, 31, codes), nb)
    codes = np.where(zero[:, None], 0, codes)  # an all-zero super-block is written as zero bytes
    quarters = codes.reshape(nb, 2, 4, 32)
    low = quarters & 0xF
    ql = np.concatenate([low[:, :, 0] | low[:, :, 2] << 4, low[:, :, 1] | low[:, :, 3] << 4], axis=2)
    top = quarters >> 4
    qh = top[:, :, 0] | top[:, :, 1] << 2 | top[:, :, 2] << 4 | top[:, :, 3] << 6
    return np.concatenate(
        [
            ql.reshape(nb, 128).astype(np.uint8),
            qh.reshape(nb, 64).astype(np.uint8),
            levels.astype(np.int8).view(np.uint8),
            _bytes(d, nb),
        ],
        axis=1,
    )


def _iq4_scales(xc: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The per-32 scale search of `quantize_row_iq4_nl_impl` with ntry = 7, as `quantize_iq4_nl/xs` call it."""
    amax, vmax = _first_abs_max(xc)
    table = _KVALUES_IQ4NL.astype(_F32)

    def sums(inv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = _best_index_iq4nl(inv * xc)[1]
        wq = weight * q
        return _seqsum(wq * xc), _seqsum(wq * q)

    with np.errstate(all="ignore"):
        d = -vmax / table[0]
        sumqx, sumq2 = sums(_F32(1) / d)
        d = np.where(sumq2 > 0, sumqx / sumq2, _F32(0))
        best = d * sumqx
        for step in range(-7, 8):
            sumqx, sumq2 = sums(_F32(step + int(_KVALUES_IQ4NL[0])) / vmax)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d)
            best = np.where(better, d * sumqx, best)
    return np.where(amax < _GROUP_MAX_EPS, _F32(0), d)


def _iq4_weight(xc: np.ndarray, qc: np.ndarray | None, sumx2: np.ndarray, per_superblock: int) -> np.ndarray:
    """x² without importance, else qw·sqrt(σ² + x²) with σ² = 2·Σx²/super_block_size."""
    if qc is None:
        return xc * xc
    sigma2 = sumx2 * (_F32(2) / _F32(32 * per_superblock))
    return qc * np.sqrt(np.repeat(sigma2, per_superblock) + xc * xc)


def _iq4_nl(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    xc = _columns(x, 32)
    qc = None if qw is None else _columns(np.broadcast_to(qw, x.shape), 32)
    d = _iq4_scales(xc, _iq4_weight(xc, qc, _seqsum(xc * xc), 1))
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, _F32(1) / d, _F32(0))
    codes = _blocks(_best_index_iq4nl(inv * xc)[0], len(d))
    return np.concatenate([_bytes(_f16(d), len(d)), pack_nibbles(codes)], axis=1)


def _iq4_xs(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    sumx2, xc, qc = _superblocks(x, qw, 32)
    nb = len(sumx2)
    scales = _iq4_scales(xc, _iq4_weight(xc, qc, sumx2, 8))
    _, max_scale = _first_abs_max(_by_superblock(scales, nb))
    d = -max_scale / _F32(32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, _F32(1) / d, _F32(0))
        levels = np.clip(_nint(np.repeat(inv, 8) * scales), -32, 31)
        dl = np.repeat(d, 8) * levels.astype(_F32)
        idl = np.where(dl != 0, _F32(1) / dl, _F32(0))
    codes = _blocks(_best_index_iq4nl(idl * xc)[0], nb)
    levels = levels.reshape(nb, 8) + 32
    scales_l = ((levels[:, 0::2] & 0xF) | ((levels[:, 1::2] & 0xF) << 4)).astype(np.uint8)
    scales_h = sum((levels[:, ib] >> 4) << (2 * ib) for ib in range(8)).astype("<u2")
    return np.concatenate([_bytes(_f16(d), nb), _bytes(scales_h, nb), scales_l, pack_nibbles(codes)], axis=1)


def _mxfp4(x: np.ndarray, _qw: np.ndarray | None) -> np.ndarray:
    xb = x.reshape(-1, 32)
    amax = np.abs(xb).max(axis=-1)
    # floorf(log2f(amax)) with a correctly rounded float32 log2 (from float64), as glibc's log2f gives it;
    # the float -> uint8 store wraps like x86's truncating conversion.
    log2 = np.floor(np.log2(np.where(amax > 0, amax, _F32(1)).astype(np.float64)).astype(_F32))
    e = np.where(amax > 0, (log2 - _F32(2) + _F32(127)).astype(np.int32) & 0xFF, 0).astype(np.uint32)
    d = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23)).astype(np.uint32).view(_F32)
    # best_index_mxfp4: a linear scan keeping the first smallest |kvalue·d − x| (the table repeats 0)
    errors = np.abs(_KVALUES_MXFP4.astype(_F32) * d[:, None, None] - xb[..., None])
    codes = errors.argmin(axis=-1)
    return np.concatenate([e.astype(np.uint8)[:, None], pack_nibbles(codes)], axis=1)


def _f16_rows(x: np.ndarray, _qw: np.ndarray | None) -> np.ndarray:
    return _f16(x).view(np.uint8)


def _bf16_rows(x: np.ndarray, _qw: np.ndarray | None) -> np.ndarray:
    return gguf.quants.quantize(x, _Q.BF16).view(np.uint8)


_QUANTIZERS = {
    "f16": _f16_rows,
    "bf16": _bf16_rows,
    "q8_0": _q8_0,
    "q4_0": _q4_0,
    "q4_1": _q4_1,
    "q5_0": _q5_0,
    "q5_1": _q5_1,
    "q2_k": _q2_k,
    "q3_k": _q3_k,
    "q4_k": _q4_k,
    "q5_k": _q5_k,
    "q6_k": _q6_k,
    "iq4_nl": _iq4_nl,
    "iq4_xs": _iq4_xs,
    "mxfp4": _mxfp4,
}


def _importance_array(importance: torch.Tensor | np.ndarray | None, in_features: int) -> np.ndarray | None:
    if importance is None:
        return None
    values = importance.detach().to("cpu", torch.float32).numpy() if torch.is_tensor(importance) else importance
    values = np.ascontiguousarray(values, dtype=_F32)
    if values.shape != (in_features,):
        raise ValueError(f"importance must have shape [{in_features}] (one value per input column), got {values.shape}")
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError("importance must be finite and non-negative (a mean of squared activations)")
    return values


def quantize_rows(weight: torch.Tensor, name: str, importance: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """The GGUF bytes [out, row_bytes] of a weight [out, in], as llama.cpp's `ggml_quantize_chunk` writes them.

    `importance` is llama.cpp's imatrix entry for the tensor (mean x_j² per input column); types whose
    llama.cpp quantizer takes none (`uses_importance` False) ignore it, as llama.cpp does.
    """
    bt = _lookup(name)
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    nbytes = row_bytes(name, in_features)
    x = np.ascontiguousarray(weight.detach().to("cpu", torch.float32).numpy())
    if not np.isfinite(x).all():
        raise ValueError("weight has non-finite values")
    qw = _importance_array(importance, in_features)  # checked even where unused, to catch a mismatched imatrix
    if not bt.uses_importance:
        qw = None
    quantize = _QUANTIZERS[name]
    out = np.empty((out_features, nbytes), dtype=np.uint8)
    step = max(1, _CHUNK_ELEMENTS // in_features)
    try:
        for start in range(0, out_features, step):
            rows = x[start : start + step]
            out[start : start + len(rows)] = quantize(rows, qw).reshape(len(rows), nbytes)
    except _ScaleOverflow:
        raise ValueError(
            f"{name}: a float16 field (a block scale, or for f16 a weight) overflows (|weight| up to "
            f"{np.abs(x).max():g}); "
            "llama.cpp's validation rejects such a tensor too"
        ) from None
    return out


def dequantize_rows(data: np.ndarray, name: str, in_features: int) -> torch.Tensor:
    """The float32 weight [out, in] that the `gguf` package decodes from GGUF bytes [out, row_bytes]."""
    bt = _lookup(name)
    nbytes = row_bytes(name, in_features)
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != nbytes:
        raise ValueError(f"expected {name} bytes of shape [out, {nbytes}] for {in_features} inputs, got {data.shape}")
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, bt.qtype), dtype=_F32))


@dataclass(frozen=True)
class GgufBlocks:
    """One tensor as a GGUF file stores it: `type` a key of `BLOCK_TYPES` and `data` its bytes [out, row_bytes]
    (uint8), rows in the model's own order, as `quantize_rows(weight, type, importance)` returns them."""

    type: str
    data: np.ndarray

    @property
    def in_features(self) -> int:
        block = _lookup(self.type)
        return self.data.shape[1] // block.type_size * block.block_size

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight llama.cpp reads from these bytes, as the `gguf` package decodes it (float32), in `dtype`."""
        return dequantize_rows(self.data, self.type, self.in_features).to(dtype)
