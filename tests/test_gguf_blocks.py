"""GGUF block quantizers: llama.cpp's own bytes for every type, with and without an importance matrix.

The reference is llama.cpp itself (`ggml_quantize_chunk` in libggml-base, as shipped by llama-cpp-python) where it
is installed; without it, digests of llama.cpp's bytes for a fixed input, and gguf's own quantizers for the
types it has, pin the same behaviour.
"""

from __future__ import annotations

import hashlib

import gguf
import numpy as np
import pytest
import torch

from autocompress.targets.gguf.blocks import (
    BLOCK_TYPES,
    dequantize_rows,
    fits,
    quantize_rows,
    row_bytes,
    tensor_bytes,
)
from autocompress.targets.gguf.quantize import NativeQuantizer, native_quantizer

REQUIRED = ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
REQUIRED += ["iq4_nl", "iq4_xs"] + (["mxfp4"] if hasattr(gguf.GGMLQuantizationType, "MXFP4") else [])
TYPES = list(BLOCK_TYPES)
FLOAT16_SCALED = [name for name in TYPES if name not in ("bf16", "mxfp4")]  # every float16 field overflows alike


def gaussian(rows: int, cols: int, seed: int = 0, std: float = 0.02) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * std).astype(np.float32)


def mean_square(rows: int, cols: int, seed: int = 1) -> np.ndarray:
    """An imatrix-like importance: positive, spread over orders of magnitude, one value per input column."""
    return np.exp(2 * np.random.default_rng(seed).standard_normal(cols)).astype(np.float32)


def roundtrip(weight: np.ndarray, name: str, importance: np.ndarray | None = None) -> torch.Tensor:
    data = quantize_rows(torch.from_numpy(weight), name, None if importance is None else torch.from_numpy(importance))
    return dequantize_rows(data, name, weight.shape[1])


def hard_cases(block: int) -> dict[str, np.ndarray]:
    """Weights that exercise the corners of the C code: outliers, zero rows and blocks, signed zeros, extremes."""
    cols = 2 * max(block, 256)
    base = gaussian(6, cols, seed=7)
    outliers = base.copy()
    outliers[np.random.default_rng(8).random(outliers.shape) < 0.01] *= 100
    zeros = base.copy()
    zeros[1] = 0
    zeros[2, :block] = 0
    zeros[3, ::2] = -0.0  # what pruning by multiplication leaves on negative weights
    heavy = (np.random.default_rng(9).standard_t(2, (6, cols)) * 0.01).astype(np.float32)
    return {
        "gaussian": base,
        "outliers": outliers,
        "zeros": zeros,
        "heavy_tails": heavy,
        "all_positive": np.abs(base) + 0.5,
        "constant": np.full((2, cols), 0.37, np.float32),
        "tiny": base * np.float32(1e-30),
        "small": base * np.float32(1e-7),
        "large": base * np.float32(200),
        "integers": np.round(base * 200).astype(np.float32),
    }


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("name", REQUIRED)
def test_every_required_type_is_a_level_sized_like_gguf(name: str) -> None:
    bt = BLOCK_TYPES[name]
    block_size, type_size = gguf.GGML_QUANT_SIZES[bt.qtype]
    assert (bt.name, bt.block_size, bt.type_size) == (name, block_size, type_size)
    assert bt.bits_per_weight == type_size * 8 / block_size
    for blocks in (1, 3, 6):
        in_features = blocks * block_size
        assert fits(name, in_features)
        assert row_bytes(name, in_features) == blocks * type_size
        assert tensor_bytes(name, 5, in_features) == 5 * blocks * type_size
        expected_shape = gguf.quants.quant_shape_to_byte_shape((5, in_features), bt.qtype)
        data = quantize_rows(torch.from_numpy(gaussian(5, in_features)), name)
        assert data.dtype == np.uint8 and data.shape == expected_shape


def test_bits_per_weight_are_llama_cpps() -> None:
    expected = {"f16": 16, "bf16": 16, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5, "q5_0": 5.5, "q5_1": 6, "q2_k": 2.625}
    expected |= {"q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625, "iq4_nl": 4.5, "iq4_xs": 4.25}
    expected |= {"mxfp4": 4.25} if "mxfp4" in BLOCK_TYPES else {}
    assert {name: BLOCK_TYPES[name].bits_per_weight for name in expected} == expected


def test_importance_is_taken_where_llama_cpps_quantizer_takes_it() -> None:
    ignoring = {name for name, bt in BLOCK_TYPES.items() if not bt.uses_importance}
    assert ignoring == {"f16", "bf16", "q8_0"} | ({"mxfp4"} if "mxfp4" in BLOCK_TYPES else set())


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("name", ["q4_0", "q4_k", "iq4_xs"])
def test_rows_that_do_not_split_into_blocks_are_refused(name: str) -> None:
    in_features = BLOCK_TYPES[name].block_size + 16
    assert not fits(name, in_features)
    with pytest.raises(ValueError, match="not a multiple") as info:
        row_bytes(name, in_features)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="not a multiple"):
        tensor_bytes(name, 4, in_features)
    with pytest.raises(ValueError, match="not a multiple"):
        quantize_rows(torch.zeros(4, in_features), name)


def test_bad_inputs_are_refused() -> None:
    weight = torch.from_numpy(gaussian(4, 256))
    with pytest.raises(ValueError, match="unknown GGUF block type"):
        quantize_rows(weight, "q4_k_m")
    with pytest.raises(ValueError, match="2-D"):
        quantize_rows(weight.reshape(-1), "q4_k")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rows(weight.clone().index_fill_(1, torch.tensor([3]), float("nan")), "q4_k")
    with pytest.raises(ValueError, match=r"shape \[256\]"):
        quantize_rows(weight, "q4_k", torch.ones(128))
    with pytest.raises(ValueError, match="non-negative"):
        quantize_rows(weight, "q4_k", -torch.ones(256))
    with pytest.raises(ValueError, match=r"\[out, 144\]"):
        dequantize_rows(np.zeros((4, 143), np.uint8), "q4_k", 256)


@pytest.mark.parametrize("name", FLOAT16_SCALED)
def test_float16_overflow_is_refused_as_llama_quantize_does(name: str) -> None:
    """llama.cpp stores inf in the float16 scale, which `llama-quantize`'s row validation then rejects."""
    with pytest.raises(ValueError, match="float16"):
        quantize_rows(torch.from_numpy(gaussian(2, 512, std=1e9)), name)


def test_bf16_and_mxfp4_have_no_float16_field_to_overflow() -> None:
    weight = gaussian(2, 512, std=1e9)
    for name in ["bf16", "mxfp4"] if "mxfp4" in BLOCK_TYPES else ["bf16"]:
        assert torch.isfinite(roundtrip(weight, name)).all()


# ---------------------------------------------------------------- what is decoded


@pytest.mark.parametrize("name", TYPES)
def test_decoding_is_gguf_dequantize_of_the_bytes(name: str) -> None:
    """The values the project evaluates are exactly what gguf (and so the GGUF reader) decodes."""
    bt = BLOCK_TYPES[name]
    rng = np.random.default_rng(3)
    for blocks in (1, 2, 5):
        rows = int(rng.integers(1, 9))
        weight = gaussian(rows, blocks * max(bt.block_size, 32), seed=blocks)
        data = quantize_rows(torch.from_numpy(weight), name, torch.from_numpy(mean_square(1, weight.shape[1])))
        decoded = dequantize_rows(data, name, weight.shape[1])
        assert decoded.dtype == torch.float32 and decoded.shape == weight.shape
        assert torch.equal(decoded, torch.from_numpy(gguf.quants.dequantize(data, bt.qtype)))


@pytest.mark.parametrize("name", TYPES)
def test_hard_weights_decode_finite_and_close(name: str) -> None:
    """Outliers, zero rows, signed zeros, huge and tiny weights decode finite; in float16's normal range, close."""
    # relative RMS error, about 1.5x the worst case measured (heavy tails, outliers); a layout bug gives ~1
    bound = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 0.02, "q6_k": 0.05, "q5_0": 0.12, "q5_1": 0.08, "q5_k": 0.08}
    bound |= {"q4_0": 0.2, "q4_1": 0.15, "q4_k": 0.15, "iq4_nl": 0.18, "iq4_xs": 0.18, "mxfp4": 0.25}
    bound |= {"q3_k": 0.3, "q2_k": 0.45}
    for case, weight in hard_cases(BLOCK_TYPES[name].block_size).items():
        for importance in (None, mean_square(1, weight.shape[1])):
            decoded = roundtrip(weight, name, importance).numpy()
            assert np.isfinite(decoded).all(), case
            if case not in ("tiny", "small"):  # scales below float16's range flush to zero, in llama.cpp too
                error = np.sqrt(np.mean((decoded - weight) ** 2) / np.mean(weight**2))
                assert error < bound[name], (case, error)


def test_zero_rows_decode_to_zero_in_every_type() -> None:
    weight = np.zeros((3, 512), np.float32)
    for name in TYPES:
        assert not roundtrip(weight, name).any()
        assert not roundtrip(weight, name, mean_square(1, 512)).any()


# ---------------------------------------------------------------- quality


def test_reconstruction_error_falls_with_the_bits() -> None:
    weight = gaussian(64, 1024)

    def error(name: str) -> float:
        return float(((roundtrip(weight, name).numpy() - weight) ** 2).mean())

    ladder = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "bf16", "f16"]
    errors = [error(name) for name in ladder]
    assert errors == sorted(errors, reverse=True), dict(zip(ladder, errors, strict=True))
    assert error("q4_0") > error("q5_0") > error("q8_0")
    assert error("iq4_nl") < error("q4_0")  # the non-linear grid fits Gaussian weights better


@pytest.mark.parametrize("name", [name for name, bt in BLOCK_TYPES.items() if bt.uses_importance])
def test_importance_lowers_the_importance_weighted_error(name: str) -> None:
    weight = gaussian(64, 1024)
    importance = mean_square(1, 1024)

    def weighted_error(given: np.ndarray | None) -> float:
        return float((((roundtrip(weight, name, given).numpy() - weight) ** 2) * importance).sum())

    assert weighted_error(importance) < 0.8 * weighted_error(None)


@pytest.mark.parametrize("name", [name for name, bt in BLOCK_TYPES.items() if not bt.uses_importance])
def test_types_without_an_importance_quantizer_ignore_it(name: str) -> None:
    weight = torch.from_numpy(gaussian(4, 256))
    assert np.array_equal(quantize_rows(weight, name), quantize_rows(weight, name, torch.rand(256)))


# ---------------------------------------------------------------- llama.cpp's bytes


GGUF_QUANTIZERS = ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
GGUF_QUANTIZERS += ["mxfp4"] if "mxfp4" in BLOCK_TYPES else []


@pytest.mark.parametrize("name", GGUF_QUANTIZERS)
def test_no_importance_bytes_equal_gguf_quantize(name: str) -> None:
    """gguf's Python quantizers transcribe llama.cpp's reference ones; ours agree byte for byte."""
    for case, weight in hard_cases(BLOCK_TYPES[name].block_size).items():
        if case == "zeros" or (name == "f16" and case == "large"):
            continue  # gguf keeps a -0.0 maximum that llama.cpp's scan never picks; f16 of 1e4·N(0,1) overflows
        expected = gguf.quants.quantize(weight, BLOCK_TYPES[name].qtype).view(np.uint8).reshape(len(weight), -1)
        assert np.array_equal(quantize_rows(torch.from_numpy(weight), name), expected), case


def deterministic_weights(rows: int, cols: int) -> np.ndarray:
    """Integer hashing (splitmix64) mapped to float32 exactly, so the golden input is the same on any platform."""
    z = np.arange(rows * cols, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    parts = [((z >> np.uint64(shift)) & np.uint64(0xFFFF)).astype(np.float64) for shift in (0, 16, 32, 48)]
    weight = ((sum(parts) / 65536.0 - 2.0) * 0.03).astype(np.float32).reshape(rows, cols)  # roughly N(0, 0.017)
    weight.reshape(-1)[::61] *= 8  # outliers
    weight[2] = 0
    weight[3, :256] = 0
    return weight


def deterministic_importance(cols: int) -> np.ndarray:
    return (((np.arange(cols) * 7919) % 1000 + 1) / 125.0).astype(np.float32) ** 2


# sha256 (first 16 hex digits) of llama.cpp's bytes for deterministic_weights(8, 512), without and with
# deterministic_importance(512): ggml_quantize_chunk of llama-cpp-python 0.3.36 (ggml 0.25.3), x86-64.
LLAMA_CPP_DIGESTS: dict[str, tuple[str, str]] = {
    "f16": ("e170955d8bff4fe9", "e170955d8bff4fe9"),
    "bf16": ("c0b8ffa1fc076a88", "c0b8ffa1fc076a88"),
    "q8_0": ("2b87562542b31ff1", "2b87562542b31ff1"),
    "q4_0": ("3fe8581379808684", "d17ff5514aea62f5"),
    "q4_1": ("549aaa2208b1bdfd", "af4680da3c7c08d4"),
    "q5_0": ("f3c744b325e76bb4", "b34ac4ae75274ec9"),
    "q5_1": ("69f17eb664ea8b06", "0aa21363618f3782"),
    "q2_k": ("5aeb6f639f541aea", "f07788b1d0e0b845"),
    "q3_k": ("48e9be4f6b5b1ccd", "b6b161154bdc5693"),
    "q4_k": ("236bd7fd8165d715", "0a7858e645d5298f"),
    "q5_k": ("f335ccf7b12cf63b", "91f519c421c0b97e"),
    "q6_k": ("b8cb7a5533e4d431", "b274dcbc054a0916"),
    "iq4_nl": ("c3c5b07d10571ae7", "6f5560b1bb8465f0"),
    "iq4_xs": ("c5383b5c77205aa6", "4a53d71288cdb5aa"),
    "mxfp4": ("4c0081e9c63420d2", "4c0081e9c63420d2"),
}


@pytest.mark.parametrize("name", TYPES)
def test_bytes_equal_llama_cpps_recorded_digests(name: str) -> None:
    weight, importance = deterministic_weights(8, 512), deterministic_importance(512)
    digests = tuple(
        hashlib.sha256(quantize_rows(torch.from_numpy(weight), name, given).tobytes()).hexdigest()[:16]
        for given in (None, torch.from_numpy(importance))
    )
    assert digests == LLAMA_CPP_DIGESTS[name]


@pytest.fixture(scope="module")
def ggml() -> NativeQuantizer:
    quantizer = native_quantizer()
    if quantizer.library is None:
        pytest.skip(f"no llama.cpp to compare bytes with: {quantizer.missing}")
    return quantizer


def llama_cpp_bytes(ggml: NativeQuantizer, weight: np.ndarray, name: str, importance: np.ndarray | None) -> np.ndarray:
    """What `llama-quantize` writes for this tensor: ggml_quantize_chunk over all rows, with the imatrix."""
    weight = np.ascontiguousarray(weight, np.float32)
    out = np.zeros((len(weight), row_bytes(name, weight.shape[1])), np.uint8)
    ggml.quantize(weight, name, None if importance is None else np.ascontiguousarray(importance, np.float32), out)
    return out


@pytest.mark.parametrize("name", TYPES)
def test_bytes_equal_llama_cpps_ggml_quantize_chunk(ggml: NativeQuantizer, name: str) -> None:
    """Every type, with and without an imatrix, on hard and random weights: identical bytes, block for block."""
    assert not ggml.library.ggml_quantize_requires_imatrix(int(BLOCK_TYPES[name].qtype))
    cases = hard_cases(BLOCK_TYPES[name].block_size)
    cases |= {f"random{seed}": gaussian(16, 256 * (seed + 1), seed=seed) for seed in range(3)}
    for case, weight in cases.items():
        importance = mean_square(1, weight.shape[1])
        sparse = importance.copy()
        sparse[::3] = 0  # columns that calibration never activated
        for given in (None, importance, sparse):
            expected = llama_cpp_bytes(ggml, weight, name, given)
            ours = quantize_rows(torch.from_numpy(weight), name, None if given is None else torch.from_numpy(given))
            assert np.array_equal(ours, expected), (case, None if given is None else "imatrix")


def test_recorded_digests_are_llama_cpps(ggml: NativeQuantizer) -> None:
    weight, importance = deterministic_weights(8, 512), deterministic_importance(512)
    for name in TYPES:
        digests = tuple(
            hashlib.sha256(llama_cpp_bytes(ggml, weight, name, given).tobytes()).hexdigest()[:16]
            for given in (None, importance)
        )
        assert digests == LLAMA_CPP_DIGESTS[name], name


def test_overflow_refusals_are_where_llama_cpp_writes_non_finite_scales(ggml: NativeQuantizer) -> None:
    for std in (1e4, 3e6, 1e8, 1e9):
        weight = gaussian(4, 512, std=std)
        for name in TYPES:
            with np.errstate(all="ignore"):
                finite = np.isfinite(
                    gguf.quants.dequantize(llama_cpp_bytes(ggml, weight, name, None), BLOCK_TYPES[name].qtype)
                ).all()
            try:
                quantize_rows(torch.from_numpy(weight), name)
            except ValueError:
                assert not finite, (name, std)
            else:
                assert finite, (name, std)
