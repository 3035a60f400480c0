"""GGUF blocks through llama.cpp's own quantizer or the numpy port, rows split across workers, and a study's block
cache built up front: the same bytes whichever path and however many workers, every block quantized once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock

from autocompress.plan import CompressionPlan
from autocompress.targets.gguf import blocks as gguf_blocks
from autocompress.targets.gguf import quantize as gguf_quantize
from autocompress.targets.gguf.blocks import BLOCK_TYPES
from autocompress.targets.gguf.file import gguf_layout
from autocompress.targets.gguf.quantize import NativeQuantizer, native_quantizer, quantize_rows
from autocompress.targets.gguf.weights import GgufWeights, check_levels, importance
from tests.test_gguf_target import LEVELS, calibration, wide_llama

TYPES = list(BLOCK_TYPES)


def gaussian(rows: int, cols: int, seed: int = 0, std: float = 0.02) -> torch.Tensor:
    return torch.from_numpy((np.random.default_rng(seed).standard_normal((rows, cols)) * std).astype(np.float32))


def mean_square(cols: int, seed: int = 1) -> torch.Tensor:
    """An imatrix-like importance, some columns never activated."""
    values = np.exp(2 * np.random.default_rng(seed).standard_normal(cols)).astype(np.float32)
    values[::5] = 0
    return torch.from_numpy(values)


@pytest.fixture(scope="module")
def native() -> NativeQuantizer:
    quantizer = native_quantizer()
    if quantizer.library is None:
        pytest.skip(f"the native path needs llama.cpp: {quantizer.missing}")
    return quantizer


@pytest.mark.parametrize("name", TYPES)
def test_native_and_numpy_paths_write_the_same_bytes_for_every_type(native: NativeQuantizer, name: str) -> None:
    """With and without importance, on one worker and on rows split unevenly across three."""
    weight = gaussian(37, 512, seed=3)
    weight[5, :256] = 0
    weight[6] *= 300
    for given in (None, mean_square(512)):
        expected = quantize_rows(weight, name, given, native=False, workers=1)
        for workers in (1, 3):
            ours = quantize_rows(weight, name, given, native=True, workers=workers)
            assert np.array_equal(ours, expected), (workers, None if given is None else "importance")


def test_split_rows_write_the_bytes_of_one_worker(native: NativeQuantizer, monkeypatch) -> None:
    monkeypatch.setattr(gguf_quantize, "MIN_WEIGHTS_PER_WORKER", 256)
    weight, given = gaussian(64, 1024, seed=5), mean_square(1024)
    for name in ("q4_k", "iq4_xs", "q5_1"):
        expected = quantize_rows(weight, name, given, workers=1)
        for workers in (2, 5, 64, 100):
            assert np.array_equal(quantize_rows(weight, name, given, workers=workers), expected), (name, workers)


def test_numpy_rows_split_across_processes_write_the_bytes_of_one(monkeypatch) -> None:
    monkeypatch.setattr(gguf_quantize, "MIN_WEIGHTS_PER_WORKER", 256)
    monkeypatch.setattr(gguf_quantize, "MIN_WEIGHTS_PER_PROCESS", 256)
    weight, given = gaussian(9, 512, seed=6), mean_square(512)
    expected = gguf_blocks.quantize_rows(weight, "q3_k", given)
    assert np.array_equal(quantize_rows(weight, "q3_k", given, native=False, workers=2), expected)


def test_the_native_path_refuses_overflowing_scales_where_the_port_does(native: NativeQuantizer) -> None:
    for std in (1e4, 3e6, 1e9):
        weight = gaussian(4, 512, std=std)
        for name in TYPES:
            try:
                gguf_blocks.quantize_rows(weight, name)
            except ValueError:
                with pytest.raises(ValueError, match=f"{name}: a float16 field"):
                    quantize_rows(weight, name, native=True)
            else:
                quantize_rows(weight, name, native=True)


def test_bad_inputs_are_refused_in_one_line(monkeypatch) -> None:
    weight = gaussian(4, 256)
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        quantize_rows(weight, "q4_k", workers=0)
    with pytest.raises(ValueError, match="importance must have shape"):
        quantize_rows(weight, "q4_k", torch.ones(128))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rows(weight * float("inf"), "q8_0")
    with pytest.raises(ValueError, match="unknown GGUF block type 'q9_k'"):
        quantize_rows(weight, "q9_k")
    monkeypatch.setattr(gguf_quantize, "native_quantizer", lambda: NativeQuantizer(None, "not installed here"))
    with pytest.raises(ValueError, match=r"llama\.cpp's quantizer is not available: not installed here"):
        quantize_rows(weight, "q4_k", native=True)
    assert np.array_equal(quantize_rows(weight, "q4_k"), gguf_blocks.quantize_rows(weight, "q4_k"))


def study_weights(model, cache: Path, statistics) -> GgufWeights:
    return GgufWeights(model, "linear", statistics, cache, gguf_layout(model))


def test_a_build_stores_every_level_of_every_tensor_once(tmp_path: Path) -> None:
    model = wide_llama(tie_word_embeddings=False)
    stats = calibration(model)
    weights = study_weights(model, tmp_path, lambda: stats)
    allowed = check_levels(weights.tensors, LEVELS)
    built = weights.build(allowed)
    expected = {(tensor.module, level) for tensor in weights.tensors for level in allowed[tensor.unit]}
    assert built.blocks == built.computed == len(expected)
    assert {(path.parent.name, path.stem) for path in tmp_path.rglob("*.npy")} == expected
    for tensor in weights.tensors:
        for level in allowed[tensor.unit]:
            stored = np.load(tmp_path / tensor.module / f"{level}.npy")
            given = stats[tensor.statistics_of] if tensor.statistics_of else None
            expected_bytes = quantize_rows(weights.dense[tensor.module], level, importance(given) if given else None)
            assert np.array_equal(stored, expected_bytes), (tensor.module, level)
    # trials then find every block built: a second process needs neither statistics nor quantizing
    again = study_weights(wide_llama(tie_word_embeddings=False), tmp_path, lambda: pytest.fail("statistics"))
    assert again.build(allowed).computed == 0


def test_a_build_resumes_keeping_whole_blocks_and_requantizing_broken_ones(tmp_path: Path) -> None:
    model = wide_llama()
    weights = study_weights(model, tmp_path, lambda: calibration(model))
    allowed = check_levels(weights.tensors, ["q4_k", "q8_0"])
    weights.build(allowed)
    stored = sorted(tmp_path.rglob("*.npy"))
    originals = {path: path.read_bytes() for path in stored}
    stored[0].unlink()
    stored[1].write_bytes(originals[stored[1]][:-7])  # truncated
    stored[2].write_bytes(b"not numpy")
    (stored[1].parent / f".{stored[1].name}.abc123.npy").write_bytes(b"half")  # a killed writer's temporary
    kept = {path: path.stat().st_mtime_ns for path in stored[4:]}
    built = study_weights(wide_llama(), tmp_path, lambda: calibration(model)).build(allowed)
    assert built.computed == 3
    assert {path: path.read_bytes() for path in stored} == originals
    assert {path: path.stat().st_mtime_ns for path in stored[4:]} == kept
    assert not list(stored[1].parent.glob(f".{stored[1].name}.*"))


def test_a_block_file_that_does_not_match_its_digest_is_quantized_again_never_used(tmp_path: Path) -> None:
    model = wide_llama()
    stats = calibration(model)
    weights = study_weights(model, tmp_path, lambda: stats)
    allowed = check_levels(weights.tensors, ["q4_k", "q8_0"])
    weights.build(allowed)
    plan = CompressionPlan.uniform(format="q8_0", granularity="linear")
    weights.stitch(plan)
    expected = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    stored = sorted(tmp_path.rglob("q8_0.npy"))
    originals = {path: path.read_bytes() for path in stored}
    stored[0].write_bytes(flipped(originals[stored[0]]))  # one quant flipped, the length and header kept
    Path(f"{stored[1]}.blake2b").unlink()  # a writer killed between the blocks and their digest
    Path(f"{stored[2]}.blake2b").write_text("0" * 32)  # a digest of other bytes
    # a trial stitching these blocks quantizes them again rather than decode what the files hold
    healed = wide_llama()
    study_weights(healed, tmp_path, lambda: stats).stitch(plan)
    assert all(torch.equal(parameter, expected[name]) for name, parameter in healed.named_parameters())
    assert {path: path.read_bytes() for path in stored} == originals
    # and a build finds them whole again, as it finds a file corrupted in place broken
    stored[3].write_bytes(flipped(originals[stored[3]]))
    assert study_weights(wide_llama(), tmp_path, lambda: stats).build(allowed).computed == 1


def flipped(data: bytes) -> bytes:
    """`data` with its last byte's bits flipped: a block file corrupted in place, its size unchanged."""
    changed = bytearray(data)
    changed[-1] ^= 0xFF
    return bytes(changed)


def test_a_block_another_worker_is_quantizing_is_waited_for_not_quantized_again(tmp_path: Path) -> None:
    model = wide_llama()
    stats = calibration(model)
    ours, theirs = (study_weights(model, tmp_path, lambda: stats) for _ in range(2))
    allowed = check_levels(ours.tensors, ["q4_k", "q8_0"])
    busy = ours.tensors[0]
    lock = FileLock(tmp_path / busy.module / ".q8_0.lock")
    lock.acquire()  # the other worker holds this block's lock
    results = []
    builder = threading.Thread(target=lambda: results.append(ours.build(allowed)))
    builder.start()
    others = sum(len(allowed[tensor.unit]) for tensor in ours.tensors) - 1
    deadline = time.monotonic() + 120
    while len(list(tmp_path.rglob("*.npy"))) < others and time.monotonic() < deadline:
        time.sleep(0.05)
    assert builder.is_alive()  # everything else is built, and it waits for the busy block
    theirs._store(busy, "q8_0")
    lock.release()
    builder.join(timeout=120)
    assert results[0].computed == others
