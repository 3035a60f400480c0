"""GGUF blocks through llama.cpp's own quantizer where it is installed, with rows split across workers.

`quantize_rows` writes the bytes `llama-quantize` writes for a weight [out, in] in a GGUF type, with or without an
importance matrix. Where llama-cpp-python is installed it calls `ggml_quantize_chunk` of the `libggml-base` shared
library the wheel ships (found without importing `llama_cpp`, whose import loads all of llama.cpp); elsewhere it
runs `blocks.quantize_rows`, the numpy port of the same C code. Both write the same bytes, for every type,
with and without importance (`tests/test_gguf_quantize.py` compares them); the native one is several times faster.

Rows are independent in every GGUF type, so the rows are cut into contiguous ranges, one per worker. ctypes
releases the GIL for the length of a foreign call, so the native ranges run on threads. The numpy port holds the
GIL between its many small array operations, so threads barely help it (`benchmarks/blocks.py` measures both);
its ranges run in processes instead, for tensors large enough to repay starting them.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import itertools
import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autocompress.targets.gguf import blocks as gguf_blocks
from autocompress.targets.gguf.blocks import BLOCK_TYPES, row_bytes

# Each worker gets at least this many weights: below it, handing out the work costs more than it saves.
MIN_WEIGHTS_PER_WORKER = 1 << 16
# The numpy port splits across processes only from this many weights (each new process imports torch first).
MIN_WEIGHTS_PER_PROCESS = 1 << 22

# Byte offsets of the float16 fields (scales, minimums) within one block of each type: ggml-common.h's structs.
# llama.cpp writes inf into one that overflows; the numpy port refuses such a tensor, and so does this module.
_HALF_FIELDS: dict[str, tuple[int, ...]] = {
    "q8_0": (0,),
    "q4_0": (0,),
    "q4_1": (0, 2),
    "q5_0": (0,),
    "q5_1": (0, 2),
    "q2_k": (80, 82),
    "q3_k": (108,),
    "q4_k": (0, 2),
    "q5_k": (0, 2),
    "q6_k": (208,),
    "iq4_nl": (0,),
    "iq4_xs": (0,),
    "mxfp4": (),  # its scale is an 8-bit exponent
    "bf16": (),
}


@dataclass(frozen=True)
class NativeQuantizer:
    """llama.cpp's `libggml-base`, or why it cannot be used (`library` None)."""

    library: ctypes.CDLL | None
    missing: str | None = None

    def quantize(self, x: np.ndarray, name: str, importance: np.ndarray | None, out: np.ndarray) -> None:
        """`ggml_quantize_chunk` of the rows `x` [rows, in] (float32, C order) into `out` [rows, row_bytes]."""
        qtype = int(BLOCK_TYPES[name].qtype)
        if importance is None and self.library.ggml_quantize_requires_imatrix(qtype):
            raise ValueError(f"llama.cpp quantizes {name} only with an importance matrix")  # it would abort
        written = self.library.ggml_quantize_chunk(
            qtype,
            x.ctypes.data,
            out.ctypes.data,
            0,
            x.shape[0],
            x.shape[1],
            None if importance is None else importance.ctypes.data,
        )
        if written != out.nbytes:
            raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes of {name}, not {out.nbytes}")


@functools.cache
def native_quantizer() -> NativeQuantizer:
    """llama-cpp-python's `lib/libggml-base` shared library, loaded once, if the package is installed."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return NativeQuantizer(None, "llama-cpp-python is not installed (pip install llama-cpp-python)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "lib"
    libraries = sorted(folder.glob("libggml-base.*")) or sorted(folder.glob("ggml-base.*"))
    if not libraries:
        return NativeQuantizer(None, f"llama-cpp-python ships no libggml-base shared library in {folder}")
    try:
        library = ctypes.CDLL(str(libraries[0]))
        chunk = library.ggml_quantize_chunk
    except (OSError, AttributeError) as error:
        return NativeQuantizer(None, f"{libraries[0]} cannot be used: {error}")
    # size_t ggml_quantize_chunk(enum ggml_type, const float * src, void * dst, int64_t start, int64_t nrows,
    #                            int64_t n_per_row, const float * imatrix): ggml/include/ggml.h
    chunk.restype = ctypes.c_size_t
    chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    library.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    library.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return NativeQuantizer(library)


def default_workers() -> int:
    """The workers a quantization splits rows across: the CPU threads torch was given (`torch.set_num_threads`,
    OMP_NUM_THREADS; by default the machine's physical cores)."""
    return max(1, torch.get_num_threads())


def quantize_rows(
    weight: torch.Tensor,
    name: str,
    importance: torch.Tensor | np.ndarray | None = None,
    *,
    workers: int | None = None,
    native: bool | None = None,
) -> np.ndarray:
    """The GGUF bytes [out, row_bytes] of a weight [out, in] in type `name`, as `llama-quantize` writes them.

    `importance` is llama.cpp's imatrix entry of the tensor (mean x_j² per input column), ignored by the types
    whose quantizer takes none. `workers` (default `default_workers()`) split the rows. `native` True demands
    llama.cpp's own quantizer (ValueError without it), False the numpy port; None takes llama.cpp's where present.
    """
    bt = BLOCK_TYPES.get(name)
    if bt is None:
        raise ValueError(f"unknown GGUF block type {name!r}; known: {', '.join(BLOCK_TYPES)}")
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    quantizer = native_quantizer()
    if native and quantizer.library is None:
        raise ValueError(f"llama.cpp's quantizer is not available: {quantizer.missing}")
    # f16 is a rounding numpy does as fast, and its only float16 field is the weight, refused there on overflow
    use_native = quantizer.library is not None and native is not False and name != "f16"
    out_features, in_features = weight.shape
    nbytes = row_bytes(name, in_features)
    x = np.ascontiguousarray(weight.detach().to("cpu", torch.float32).numpy())
    if not np.isfinite(x).all():
        raise ValueError("weight has non-finite values")
    qw = gguf_blocks._importance_array(importance, in_features)  # checked even where unused: a mismatched imatrix
    if not bt.uses_importance:
        qw = None
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    parts = max(1, min(workers, out_features, x.size // MIN_WEIGHTS_PER_WORKER))
    if use_native:
        out = np.empty((out_features, nbytes), dtype=np.uint8)
        ranges = _row_ranges(out_features, parts)
        if parts == 1:
            quantizer.quantize(x, name, qw, out)
        else:
            with ThreadPoolExecutor(parts) as pool:
                for done in [pool.submit(quantizer.quantize, x[a:b], name, qw, out[a:b]) for a, b in ranges]:
                    done.result()
        _refuse_overflow(out, name, x)
        return out
    if parts == 1 or x.size < MIN_WEIGHTS_PER_PROCESS:
        return gguf_blocks.quantize_rows(torch.from_numpy(x), name, qw)
    pool = _process_pool(parts)
    futures = [pool.submit(_numpy_rows, x[a:b], name, qw) for a, b in _row_ranges(out_features, parts)]
    return np.concatenate([future.result() for future in futures])


def _row_ranges(rows: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous [start, stop) ranges covering the rows, as even as whole rows allow."""
    bounds = [rows * part // parts for part in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def _refuse_overflow(out: np.ndarray, name: str, x: np.ndarray) -> None:
    """The numpy port's refusal of a float16 field that overflows, on llama.cpp's bytes: they hold inf there."""
    block = BLOCK_TYPES[name].type_size
    blocks = out.reshape(-1, block)
    for offset in _HALF_FIELDS[name]:
        if not np.isfinite(blocks[:, offset : offset + 2].copy().view(np.float16)).all():
            raise ValueError(
                f"{name}: a float16 field (a block scale) overflows (|weight| up to {np.abs(x).max():g}); "
                "llama.cpp's validation rejects such a tensor too"
            )


def _numpy_rows(x: np.ndarray, name: str, importance: np.ndarray | None) -> np.ndarray:
    """One worker process's share of the numpy port."""
    return gguf_blocks.quantize_rows(torch.from_numpy(x), name, importance)


@functools.cache
def _process_pool(workers: int) -> Executor:
    """Worker processes for the numpy port, started once per size and kept for the next tensors. They are
    spawned, not forked: the parent holds torch's and other threads, whose locks a fork would copy held."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
